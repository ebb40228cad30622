"""``pipedni.split`` in one process: stage modules that compute what the model computes (train
and eval mode, batch-norm statistics, dropout's draws), keep its names, pass several tensors and
relay them, and the errors a user gets for cuts that cannot be made."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from pipedni.errors import PartitionError
from pipedni.split import split
from helpers import run_stages
from own_models import Lopsided, ResNet, SkipNet


def same_outputs(model, plan, *inputs, training: bool) -> None:
    """The chained stages give the model's output in this mode, drawing the same random numbers
    and moving batch-norm statistics alike."""
    for module in [model, *plan.stages]:
        module.train(training)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(7)
    got = run_stages(plan.stages, *inputs)
    after_stages = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(before)
    torch.manual_seed(7)
    expected = model(*inputs)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(after_stages[key], value, rtol=0, atol=0, msg=key)


def test_a_skip_over_every_stage_an_integer_tensor_and_dropout_in_forward():
    torch.manual_seed(0)
    model = SkipNet(batchnorm=True, dropout=0.3)
    x = torch.randn(6, 8)
    plan = split(model, 3, x)
    assert plan.tracer == "fx" and plan.input_names == ["x"]
    assert plan.split_points == [("blocks.1", "beginning"), ("blocks.3", "beginning")]  # by parameters
    for boundary in plan.boundaries:  # the stem's output skips to the head through stage 1
        by_name = {t.name: t for t in boundary}
        assert by_name["stem"].requires_grad and by_name["stem"].shape == (6, 16)
        ids = [t for t in boundary if t.dtype == torch.int64]
        assert len(ids) == 1 and not ids[0].requires_grad
    same_outputs(model, plan, x, training=True)
    same_outputs(model, plan, x, training=False)
    # the model's own names, the buffer kept out of state_dict, and merge giving exactly the model's keys
    keys = [list(s.state_dict()) for s in plan.stages]
    assert keys[0][:2] == ["stem.weight", "stem.bias"] and "scale" not in sum(keys, [])
    assert list(plan.merge([s.state_dict() for s in plan.stages])) == list(model.state_dict())
    assert all(p is q for p, q in zip(plan.stages[0].parameters(), [model.stem.weight, model.stem.bias]))
    assert "blocks_0 [6, 16] float32" in plan.describe()


def test_split_points_by_name_beginning_and_end_and_a_relayed_network_input():
    class ViewHead(nn.Module):
        """The head needs the input's batch size (a non-tensor value computed again where it is used)."""

        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(8, 3)

        def forward(self, x, mask):
            h = self.b(self.a(x) * mask)
            return self.c(torch.cat([h, x], dim=1).view(x.size(0), -1))

    model, x, mask = ViewHead(), torch.randn(5, 4), torch.ones(5, 4)
    plan = split(model, 3, {"x": x, "mask": mask}, split_points={"a": "end", "b": "end"})
    assert [[t.name for t in b] for b in plan.boundaries] == [["x", "mask", "a"], ["x", "b"]]
    assert not plan.boundaries[0][0].requires_grad  # a network input needs no gradient
    same_outputs(model, plan, x, mask, training=True)


def test_resnet_cut_at_layer2_and_layer4_keeps_torchvision_names_and_batch_norm():
    torch.manual_seed(0)
    model, x = ResNet(width=4), torch.randn(3, 1, 28, 28)
    plan = split(model, 3, x, split_points=["layer2", "layer4"])
    assert [list(dict(s.named_children())) for s in plan.stages] == [
        ["conv1", "bn1", "relu", "maxpool", "layer1"], ["layer2", "layer3"], ["layer4", "avgpool", "fc"]]
    assert [len(b) for b in plan.boundaries] == [1, 1]  # one tensor crosses: every schedule runs on it
    assert "layer4.0.downsample.1.running_mean" in plan.stages[2].state_dict()
    same_outputs(model, plan, x, training=True)
    same_outputs(model, plan, x, training=False)
    assert plan.merge([s.state_dict() for s in plan.stages]).keys() == model.state_dict().keys()


def test_a_forward_that_branches_on_training_runs_each_modes_graph():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))

        def forward(self, x):
            if self.training:
                x = x + 0.1 * torch.randn_like(x)
            return self.layers(x)

    model, x = Noisy(), torch.randn(3, 4)
    plan = split(model, 2, x, method="uniform")
    same_outputs(model, plan, x, training=True)
    same_outputs(model, plan, x, training=False)


def test_untraceable_forward_falls_back_to_the_chain_of_children():
    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.one, self.two, self.three = nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)

        def forward(self, x):
            for layer in self.children():
                x = layer(x)
                if x.sum() > 1e9:  # data-dependent: fx cannot follow it
                    break
            return x

    model, x = Chain(), torch.randn(3, 4)
    plan = split(model, 2, x, method="uniform")
    assert plan.tracer == "chain"
    same_outputs(model, plan, x, training=True)


def test_tied_weights_are_listed_with_the_stages_that_hold_them():
    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(11, 8)
            self.blocks = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
            self.head = nn.Linear(8, 11, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(self.blocks(self.embed(ids)))

    model = TiedLM()
    plan = split(model, 2, torch.randint(0, 11, (2, 5)), split_points=["blocks.2"])
    assert plan.tied == [[(0, "embed.weight"), (1, "head.weight")]]
    assert list(plan.merge([s.state_dict() for s in plan.stages])) == list(model.state_dict())


@pytest.mark.parametrize("points,kwargs,message", [
    (["blocks.9"], {}, "split point 'blocks.9' names no module of SkipNet; did you mean"),
    (["blocks.1", "blocks.0"], {"num_stages": 3}, "split point 'blocks.0' leaves a stage empty"),
    (["blocks.1"], {"num_stages": 3}, "1 split point(s) make 2 stages but 3 were asked for"),
    ({"blocks.1": "middle"}, {}, "'middle' is not a place to cut"),
    ("blocks.1", {}, "is one string; give a list"),
    (None, {"num_stages": 9}, "cannot cut SkipNet into 9 stages: cut between its blocks (stem, blocks.0, blocks.1, blocks.2, blocks.3, buckets, head) it makes at most 8"),
    (None, {"method": "balanced"}, "method = 'balanced' is no way to cut a model between its blocks; use 'uniform', "
                                   "'parameters', 'time', or name split_points"),
    (None, {"example_inputs": {"y": torch.zeros(2, 8)}}, "example_inputs names 'y', which SkipNet.forward does not take"),
    (None, {"example_inputs": ["text"]}, "example_inputs holds no tensor"),
    (None, {"example_inputs": {"x": [1]}}, "example_inputs['x'] is a list"),
])
def test_bad_split_requests_name_the_value_and_the_fix(points, kwargs, message):
    args = {"num_stages": 2, "example_inputs": torch.randn(2, 8), **kwargs}
    with pytest.raises(PartitionError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        split(SkipNet(), args.pop("num_stages"), args.pop("example_inputs"), split_points=points, **args)


def test_a_model_no_tracer_can_follow_names_each_tracer():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(self.a(x)) * 2 if x.sum() > 0 else self.b(self.a(x))

    with pytest.raises(PartitionError, match=r"cannot split Branchy: no tracer .*fx: TraceError.*; chain: calling its "):
        split(Branchy(), 2, torch.randn(3, 4) + 10, method="uniform")


def test_a_timed_split_cuts_by_measured_time_and_leaves_the_model_and_the_rng_as_they_were():
    """Lopsided's first block has few parameters but most of the compute: by parameters the cut
    falls after two blocks, by time right after the first; timing runs copies, so the weights,
    the gradients and the global RNG are untouched."""
    torch.manual_seed(0)
    model, x = Lopsided(repeats=120), torch.randn(16, 64)  # first block 4-5x the others: a wide margin for noise
    before, rng = {k: v.clone() for k, v in model.state_dict().items()}, torch.random.get_rng_state()
    timed = split(model, 2, x, method="time")
    assert timed.split_points == [("blocks.1", "beginning")]
    assert split(model, 2, x).split_points == [("blocks.2", "beginning")]
    assert timed.note.startswith("partition.method time: stage costs ") and "layer costs ms: blocks.0 " in timed.note
    assert timed.note.endswith("differs from the parameter split [2, 3]") and timed.note in timed.describe()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and torch.equal(rng, torch.random.get_rng_state())
    assert torch.equal(run_stages(timed.stages, x), model(x))


def test_a_sequential_splits_like_partition():
    model = nn.Sequential(OrderedDict(a=nn.Linear(4, 8), b=nn.ReLU(), c=nn.Linear(8, 8), d=nn.Linear(8, 2)))
    plan = split(model, 2, torch.randn(3, 4), split_points=["c"])
    assert [list(dict(s.named_children())) for s in plan.stages] == [["a", "b"], ["c", "d"]]
    same_outputs(model, plan, torch.randn(3, 4), training=True)


def test_torch_export_splits_alike_and_updates_batch_norm_statistics_on_the_stage_that_holds_them():
    """The export tracer sees every op (batch norm's statistic updates become graph nodes); each
    update must run on the stage that holds the buffer, in train mode, and not in eval mode."""
    torch.manual_seed(0)
    model, x = SkipNet(batchnorm=True, dropout=0.3), torch.randn(6, 8)
    plan = split(model, 3, x, tracer="export")
    assert plan.tracer == "export"
    assert [list(s.state_dict())[:2] for s in plan.stages][0] == ["stem.weight", "stem.bias"]
    same_outputs(model, plan, x, training=True)
    same_outputs(model, plan, x, training=False)
    assert list(plan.merge([s.state_dict() for s in plan.stages])) == list(model.state_dict())
    with pytest.raises(PartitionError, match="tracer = 'jit' is unknown"):
        split(model, 2, x, tracer="jit")
