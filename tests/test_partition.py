"""Cutting models into stages: exact balances, clear errors, shared named layers, seeded models."""

import itertools
import random
from collections import OrderedDict

import pytest
import torch
from torch import nn

import pipedni
from pipedni.config import ModelConfig
from pipedni.errors import ConfigError, PartitionError
from pipedni.models import MODELS, build_model, has_batchnorm
from pipedni.split.balance import min_max_balance, part_costs, uniform_balance
from pipedni.split.partition import describe, partition, resolve_balance
from pipedni.stage import num_params

MNIST_SHAPE = (1, 28, 28)


def part_sums(costs, balance):
    sums, start = [], 0
    for count in balance:
        sums.append(sum(costs[start : start + count]))
        start += count
    return sums


def brute_force_min_max(costs, k, cut_costs=None, scale=1.0):
    """The smallest largest-part cost over every contiguous split into k non-empty parts; a part
    ending before layer j < n costs its sum x scale + cut_costs[j]."""
    n = len(costs)
    cut_costs = cut_costs or [0] * n
    best = None
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = (0,) + cuts + (n,)
        worst = max(sum(costs[a:b]) if b == n else sum(costs[a:b]) * scale + cut_costs[b]
                    for a, b in zip(bounds, bounds[1:]))
        best = worst if best is None else min(best, worst)
    return best


def toy(num_layers=4):
    """A named Sequential with distinct parameter counts per layer."""
    return nn.Sequential(OrderedDict((f"l{i}", nn.Linear(i + 2, i + 3)) for i in range(num_layers)))


# --------------------------------------------------------------------------- balances


@pytest.mark.parametrize(
    "layers,stages,expected",
    [(8, 4, [2, 2, 2, 2]), (7, 3, [3, 2, 2]), (5, 5, [1, 1, 1, 1, 1]), (4, 1, [4]), (10, 4, [3, 3, 2, 2])],
)
def test_uniform_balance_gives_the_remainder_to_the_first_stages(layers, stages, expected):
    assert uniform_balance(layers, stages) == expected


def test_min_max_balance_is_optimal_against_brute_force():
    rng = random.Random(1234)
    for _ in range(400):
        n = rng.randint(1, 8)
        k = rng.randint(1, n)
        costs = [rng.randint(0, 30) for _ in range(n)]
        balance = min_max_balance(costs, k)
        case = f"costs={costs} k={k} -> {balance}"
        assert len(balance) == k, case
        assert sum(balance) == n, case
        assert min(balance) >= 1, case
        assert max(part_sums(costs, balance)) == brute_force_min_max(costs, k), case


def test_min_max_balance_with_cut_costs_is_optimal_against_brute_force():
    """partition.method time: a stage also pays for its outgoing boundary (a DNI predictor on the
    cut layer's output, or a share of its own cost), the last stage for none."""
    rng = random.Random(99)
    for _ in range(400):
        n = rng.randint(1, 8)
        k = rng.randint(1, n)
        costs = [rng.randint(0, 30) for _ in range(n)]
        cut_costs = [rng.randint(0, 40) for _ in range(n)]
        scale = rng.choice([1.0, 1.12, 2.0])
        balance = min_max_balance(costs, k, cut_costs, scale)
        case = f"costs={costs} cut_costs={cut_costs} scale={scale} k={k} -> {balance}"
        assert len(balance) == k and sum(balance) == n and min(balance) >= 1, case
        best = brute_force_min_max(costs, k, cut_costs, scale)
        assert max(part_costs(costs, balance, cut_costs, scale)) == best, case


def test_a_costly_cut_moves_the_boundary():
    """Cuts before layers 1 and 2 are dearer than the layers themselves: the split moves off them."""
    assert min_max_balance([1, 1, 1, 1], 2) == [2, 2]
    assert min_max_balance([1, 1, 1, 1], 2, cut_costs=[0, 50, 50, 0]) == [3, 1]


def test_impossible_cuts_are_avoided_and_an_all_impossible_split_is_still_a_split():
    """An infinite cut cost marks a boundary no stage may end at (a predictor that cannot serve it)."""
    inf = float("inf")
    assert min_max_balance([5, 1, 1, 5], 2, cut_costs=[0, inf, inf, 0]) == [3, 1]
    balance = min_max_balance([1, 1, 1], 3, cut_costs=[0, inf, inf])
    assert balance == [1, 1, 1] and max(part_costs([1, 1, 1], balance, [0, inf, inf])) == inf


def test_min_max_balance_isolates_a_heavy_layer():
    assert min_max_balance([1, 1, 100, 1, 1], 3) == [2, 1, 2]
    assert min_max_balance([100, 1, 1, 1], 2) == [1, 3]


def test_min_max_balance_ties_go_to_the_earliest_cut():
    """All ranks compute the balance independently, so ties must break the same documented way."""
    assert min_max_balance([1, 1, 1], 2) == [1, 2]


def test_resolve_balance_by_parameters_and_uniform():
    model = toy(4)
    costs = [num_params(layer) for layer in model]
    by_params = resolve_balance(model, 2, method="parameters")
    assert max(part_sums(costs, by_params)) == brute_force_min_max(costs, 2)
    assert resolve_balance(model, 2, method="uniform") == [2, 2]


def test_explicit_balance_overrides_method():
    assert resolve_balance(toy(4), 2, balance=(3, 1), method="uniform") == [3, 1]


# --------------------------------------------------------------------------- errors that say what to do


def test_balance_with_wrong_length_names_both_counts_and_the_fix():
    with pytest.raises(PartitionError) as info:
        resolve_balance(toy(4), 3, balance=[2, 2])
    msg = str(info.value)
    assert "partition.balance = [2, 2]" in msg
    assert "2 stages but 3 processes" in msg
    assert "give 3 entries" in msg
    assert "--nproc_per_node=2" in msg


def test_balance_with_an_empty_stage():
    with pytest.raises(PartitionError, match=r"\[3, 0, 1\] leaves a stage empty"):
        resolve_balance(toy(4), 3, balance=[3, 0, 1])


def test_balance_with_wrong_sum_lists_the_layer_names():
    with pytest.raises(PartitionError) as info:
        resolve_balance(toy(4), 2, balance=[2, 3])
    msg = str(info.value)
    assert "sums to 5 but the model has 4 layers" in msg
    assert "(l0, l1, l2, l3)" in msg
    assert "make it sum to 4" in msg


@pytest.mark.parametrize("method", ["uniform", "parameters"])
def test_more_stages_than_layers(method):
    with pytest.raises(PartitionError, match="cannot cut a model of 4 layers into 5 stages; use at most 4"):
        resolve_balance(toy(4), 5, method=method)


def test_zero_stages():
    with pytest.raises(PartitionError, match="num_stages = 0"):
        resolve_balance(toy(4), 0)


def test_unknown_method_names_the_choices():
    with pytest.raises(PartitionError, match="partition.method = 'flops' is unknown; "
                                             "use 'uniform', 'parameters', 'time' or 'auto'"):
        resolve_balance(toy(4), 2, method="flops")


def test_time_without_a_sample_says_what_to_pass():
    with pytest.raises(PartitionError, match=r"pass sample=\(inputs, targets\)") as info:
        partition(toy(4), 2, method="time")
    assert "method='parameters'" in str(info.value)


def test_auto_without_a_sample_splits_by_parameters_and_one_stage_needs_no_timing():
    model = toy(4)
    assert resolve_balance(model, 2, method="auto") == resolve_balance(model, 2, method="parameters")
    assert resolve_balance(model, 1, method="time") == [4]  # nothing to balance: no sample needed


def test_non_sequential_model_is_refused_with_the_wrapping_hint():
    with pytest.raises(PartitionError) as info:
        partition(nn.Linear(3, 4), 1)
    assert "got Linear" in str(info.value)
    assert "nn.Sequential(OrderedDict(...))" in str(info.value)


def test_partition_errors_are_value_errors():
    """The CLI and users catching ValueError both see partition mistakes."""
    assert issubclass(PartitionError, ValueError)


# --------------------------------------------------------------------------- stages share named layers


@pytest.mark.parametrize("balance", [[1, 3], [2, 2], [3, 1]])
def test_stage_state_dicts_concatenate_to_the_model_state_dict(balance):
    """Checkpoints merge by name for any split, so stage keys must be the model's own keys."""
    model = toy(4)
    stages = partition(model, 2, balance=balance)
    merged_keys = [k for stage in stages for k in stage.state_dict()]
    assert merged_keys == list(model.state_dict())
    full = model.state_dict()
    for stage in stages:
        for key, tensor in stage.state_dict().items():
            assert tensor.data_ptr() == full[key].data_ptr(), f"{key} was copied"


def test_stages_share_the_model_layer_objects():
    """Training a stage trains the model: parameters are the same Parameter objects, not copies."""
    model = build_model(ModelConfig(name="mlp", depth=3, width=16, batchnorm=True), MNIST_SHAPE, 10, seed=0)
    stages = partition(model, 2, method="uniform")
    model_params = dict(model.named_parameters())
    for stage in stages:
        for name, param in stage.named_parameters():
            assert param is model_params[name]
        for name, child in stage.named_children():
            assert child is getattr(model, name)
    with torch.no_grad():
        stages[0].layer0[1].weight.add_(1.0)
    assert torch.equal(model.layer0[1].weight, stages[0].layer0[1].weight)


def test_stages_compose_back_to_the_model():
    model = build_model(ModelConfig(name="mlp", depth=4, width=32), MNIST_SHAPE, 10, seed=3)
    stages = partition(model, 3)
    x = torch.randn(5, *MNIST_SHAPE)
    y = x
    for stage in stages:
        y = stage(y)
    torch.testing.assert_close(y, model(x))


def test_user_sequential_via_package_entry_point():
    """The README promise: pipedni.partition works on a user's own named nn.Sequential."""
    model = nn.Sequential(
        OrderedDict(
            [
                ("embed", nn.Linear(8, 64)),
                ("act", nn.ReLU()),
                ("big", nn.Linear(64, 64)),
                ("act2", nn.Tanh()),
                ("out", nn.Linear(64, 2)),
            ]
        )
    )
    stages = pipedni.partition(model, 2, method="parameters")
    assert all(isinstance(s, nn.Sequential) for s in stages)
    assert [name for s in stages for name, _ in s.named_children()] == ["embed", "act", "big", "act2", "out"]
    assert "big" in dict(stages[1].named_children()), "the heaviest layer should not share stage 0 with embed"
    assert stages[1].big is model.big
    costs = [num_params(layer) for layer in model]
    assert max(num_params(s) for s in stages) == brute_force_min_max(costs, 2)


def test_describe_lists_names_and_parameter_counts():
    model = toy(3)  # l0: 2*3+3=9, l1: 3*4+4=16, l2: 4*5+5=25 params
    text = describe(partition(model, 2, balance=[2, 1]))
    assert text.splitlines() == [
        "stage 0:         25 params  [l0, l1]",
        "stage 1:         25 params  [l2]",
    ]


def test_describe_uses_thousands_separators():
    stage = nn.Sequential(OrderedDict(big=nn.Linear(1000, 1000)))
    assert describe([stage]) == "stage 0:  1,001,000 params  [big]"


# --------------------------------------------------------------------------- built-in models


@pytest.mark.parametrize("depth", [1, 3, 6])
@pytest.mark.parametrize("batchnorm", [False, True])
def test_mlp_layers_and_forward_shape(depth, batchnorm):
    cfg = ModelConfig(name="mlp", depth=depth, width=24, batchnorm=batchnorm)
    model = build_model(cfg, MNIST_SHAPE, 10, seed=0)
    names = [name for name, _ in model.named_children()]
    assert names == [f"layer{i}" for i in range(depth)] + ["head"]
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == depth + 1
    assert sum(isinstance(m, nn.BatchNorm1d) for m in model.modules()) == (depth if batchnorm else 0)
    assert has_batchnorm(model) == batchnorm
    assert model.layer0[1].in_features == 28 * 28
    assert model(torch.randn(4, *MNIST_SHAPE)).shape == (4, 10)


@pytest.mark.parametrize("hidden", [0, 32])
@pytest.mark.parametrize("batchnorm", [False, True])
def test_cnn_layers_and_forward_shape(hidden, batchnorm):
    cfg = ModelConfig(name="cnn", channels=[4, 8], hidden=hidden, batchnorm=batchnorm)
    model = build_model(cfg, MNIST_SHAPE, 10, seed=0)
    names = [name for name, _ in model.named_children()]
    assert names == ["conv0", "conv1"] + (["fc"] if hidden else []) + ["head"]
    assert has_batchnorm(model) == batchnorm
    assert model(torch.randn(3, *MNIST_SHAPE)).shape == (3, 10)


def test_cnn_stops_pooling_on_tiny_feature_maps():
    """Five conv blocks on 28x28 pool 28->14->7->3->1 and then must not pool a 1x1 map."""
    cfg = ModelConfig(name="cnn", channels=[2, 2, 2, 2, 2])
    model = build_model(cfg, MNIST_SHAPE, 10, seed=0)
    assert model(torch.randn(2, *MNIST_SHAPE)).shape == (2, 10)


def test_cnn_needs_image_shaped_inputs():
    with pytest.raises(ConfigError, match="needs \\(channels, height, width\\)"):
        build_model(ModelConfig(name="cnn"), (784,), 10, seed=0)


def test_unknown_model_name_lists_the_choices():
    cfg = ModelConfig()
    cfg.name = "resnet"
    with pytest.raises(ConfigError) as info:
        build_model(cfg, MNIST_SHAPE, 10, seed=0)
    assert "model.name = 'resnet' is unknown" in str(info.value)
    for name in MODELS:
        assert name in str(info.value)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_same_seed_same_weights_different_seed_different(name):
    cfg = ModelConfig(name=name, width=16, channels=[4])
    a = build_model(cfg, MNIST_SHAPE, 10, seed=7).state_dict()
    b = build_model(cfg, MNIST_SHAPE, 10, seed=7).state_dict()
    c = build_model(cfg, MNIST_SHAPE, 10, seed=8).state_dict()
    assert list(a) == list(b) == list(c)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    weights = [k for k in a if k.endswith("weight")]
    assert any(not torch.equal(a[k], c[k]) for k in weights)
    assert all(not torch.equal(a[k], c[k]) for k in weights if a[k].numel() > 1)


def test_build_model_leaves_the_global_rng_alone():
    """Weights come from a forked RNG so building a model never shifts the data order or dropout."""
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    build_model(ModelConfig(width=8), MNIST_SHAPE, 10, seed=123)
    assert torch.equal(torch.rand(3), expected)


def test_weights_do_not_depend_on_the_number_of_stages():
    """Drawn once and then split: the stage-2 weights of a 2-way cut are the model's own."""
    cfg = ModelConfig(name="mlp", depth=3, width=16)
    whole = build_model(cfg, MNIST_SHAPE, 10, seed=5).state_dict()
    for n in (1, 2, 4):
        stages = partition(build_model(cfg, MNIST_SHAPE, 10, seed=5), n, method="uniform")
        for stage in stages:
            for key, tensor in stage.state_dict().items():
                assert torch.equal(tensor, whole[key]), (n, key)
