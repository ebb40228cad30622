"""partition.method time: measured layer costs, what a decoupled stage pays at its cut, auto's
choice of method, and one balance for every rank (measured on rank 0 alone, saved for reruns).

No test asserts a time: each compares splits whose costs differ by far more than timing noise.
"""

from __future__ import annotations

import contextlib
import io
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from pipedni import data as datasets
from pipedni.config import load_config
from pipedni.dni.sizing import BUDGET
from pipedni.engine import Trainer
from pipedni.errors import PartitionError
from pipedni.models import build_model
from pipedni.runtime import Runtime
from pipedni.schedules import registry
from pipedni.split import cost
from pipedni.split.cost import LayerCosts, microbatch_of, run_costs
from pipedni.split.cut import cut_model, partition_method
from pipedni.split.partition import partition
from helpers import RankFailed, run_distributed


class Mixing(nn.Module):
    """No parameters, yet far costlier than a 32-wide Linear: ``rounds`` fixed mixings of the features."""

    def __init__(self, width: int, rounds: int):
        super().__init__()
        self.rounds = rounds
        draw = torch.randn(width, width, generator=torch.Generator().manual_seed(0))
        self.register_buffer("mix", torch.linalg.qr(draw)[0])  # orthogonal: values stay O(1) however many rounds

    def forward(self, x):
        for _ in range(self.rounds):
            x = torch.tanh(x @ self.mix)
        return x


def heavy_in_the_middle() -> nn.Sequential:
    """Parameters split it [l0 | l1 | heavy, l2, head] (a tie with [1, 2, 2]: the earliest cut); time must
    give the costly layer its own stage."""
    torch.manual_seed(0)  # every rank builds the same weights
    return nn.Sequential(OrderedDict(l0=nn.Linear(32, 32), l1=nn.Linear(32, 32), heavy=Mixing(32, 100),
                                     l2=nn.Linear(32, 32), head=nn.Linear(32, 10)))


def _refuse_timing(*args):
    raise AssertionError("only rank 0 may time the layers; the others take its balance")


def cpu_runtime(rank: int, world_size: int, backend: str = "gloo") -> Runtime:
    return Runtime(rank, world_size, rank, world_size, torch.device("cpu"), backend)


def test_time_puts_a_costly_layer_alone_and_leaves_the_model_as_it_was():
    """One wide block among narrow Linears (over 10x their cost): it gets a stage of its own. The
    timing runs on copies: weights, BatchNorm statistics, gradients and the global RNG are untouched."""
    model = nn.Sequential(OrderedDict(
        n0=nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU()), n1=nn.Linear(64, 64),
        wide=nn.Sequential(nn.Linear(64, 4096), nn.ReLU(), nn.Linear(4096, 64)), n2=nn.Linear(64, 64),
        head=nn.Linear(64, 4),
    ))
    sample = (torch.randn(64, 64), torch.randint(0, 4, (64,)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(5)
    expected_draw = torch.rand(3)
    torch.manual_seed(5)
    stages = partition(model, 3, method="time", sample=sample)
    assert torch.equal(torch.rand(3), expected_draw)
    assert [[name for name, _ in s.named_children()] for s in stages] == [["n0", "n1"], ["wide"], ["n2", "head"]]
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[key]), key
    assert all(p.grad is None for p in model.parameters())


def test_the_line_says_what_was_measured_and_whether_it_differs():
    costs = LayerCosts(("a", "b", "c"), (0.001, 0.004, 0.001), (0.0, 0.0005, 0.0005), rows=32)
    line = costs.describe([2, 1], [1, 2])
    assert line.startswith("partition.method time: stage costs 5.50, 1.00 ms per microbatch of 32 samples")
    assert "(layer costs ms: a 1.00, b 4.00, c 1.00; predictor ms at the cut after a 0.50, b 0.50)" in line
    assert line.endswith("; differs from the parameter split [1, 2]")
    auto = LayerCosts(("a", "b"), (0.001, 0.001), (0.0, 0.0), rows=8, scale=1.0 + BUDGET)
    assert "x 1.12 for its dni.kind auto predictor" in auto.describe([1, 1], [1, 1])
    assert auto.describe([1, 1], [1, 1]).endswith("; the same as the parameter split")


def _config(*overrides: str):
    return load_config(None, ["--data.name=synthetic", "--data.synthetic_size=64", "--data.batch_size=16",
                              "--train.microbatches=2", *overrides])


def _costs(cfg, num_stages: int) -> LayerCosts:
    train_set, _ = datasets.load_datasets(cfg.data, cfg.run.seed)
    model = build_model(cfg.model, tuple(train_set.inputs.shape[1:]), train_set.num_classes, cfg.run.seed)
    sample = microbatch_of(cfg, train_set, torch.device("cpu"))
    return run_costs(cfg, registry.get(cfg.train.schedule), model, sample, train_set.num_classes, num_stages)


def test_no_stage_ends_where_its_dni_predictor_cannot_run():
    """A conv predictor needs feature maps: on [conv0, conv1, fc, head] the cut before head (a
    [*, 16] boundary) is impossible, so 3 stages must be [1, 1, 2] whatever the timings; 4 stages
    cannot avoid it and say so."""
    cfg = _config("--train.schedule=dni", "--model.name=cnn", "--model.channels=[2,4]", "--model.hidden=16",
                  "--dni.kind=conv", "--dni.hidden_layers=1", "--dni.hidden_width=4")
    costs = _costs(cfg, 3)
    assert costs.cut_sec[0] == 0 and costs.cut_sec[1] > 0 and costs.cut_sec[2] > 0
    assert costs.cut_sec[3] == float("inf") and costs.scale == 1.0
    assert costs.balance(3) == [1, 1, 2]
    with pytest.raises(PartitionError, match=r"no split of \[conv0, conv1, fc, head\] into 4 stages") as info:
        costs.balance(4)
    assert "dni.kind = 'conv' needs 4-D activations" in str(info.value)
    assert "set partition.balance or another dni.kind" in str(info.value)


@pytest.mark.parametrize("overrides,scale,cuts", [
    (["--train.schedule=dni"], 1.0 + BUDGET, False),  # dni.kind auto: at most BUDGET of each stage
    (["--train.schedule=dni", "--dni.kind=linear"], 1.0, True),
    (["--train.schedule=async"], 1.0, False),
    (["--partition.method=time"], 1.0, False),  # 1f1b: layers only
])
def test_what_a_stage_pays_beyond_its_layers_follows_the_schedule(overrides, scale, cuts):
    costs = _costs(_config("--model.depth=2", "--model.width=16", *overrides), 2)
    assert costs.rows == 8 and len(costs.layer_sec) == 3 and min(costs.layer_sec) > 0
    assert costs.scale == scale
    assert (min(costs.cut_sec[1:]) > 0) if cuts else not any(costs.cut_sec)


@pytest.mark.parametrize("overrides,num_stages,method", [
    (["--train.schedule=dni"], 2, "time"),
    (["--train.schedule=async"], 3, "time"),
    (["--train.schedule=1f1b"], 2, "parameters"),
    (["--train.schedule=gpipe"], 4, "parameters"),
    (["--train.schedule=1f1b"], 1, "parameters"),
    (["--train.schedule=dni", "--partition.method=uniform"], 2, "uniform"),
    (["--train.schedule=1f1b", "--partition.method=time"], 2, "time"),
])
def test_auto_times_decoupled_schedules_and_counts_parameters_for_locked_ones(overrides, num_stages, method):
    cfg = load_config(None, overrides)
    assert partition_method(cfg, registry.get(cfg.train.schedule), num_stages) == method


def test_auto_is_the_default():
    assert load_config(None, []).partition.method == "auto"


def test_the_saved_balance_reproduces_the_split_without_timing(tmp_path, monkeypatch):
    """A run records the balance it used; rerun from that config, nothing is timed again."""
    cfg = _config(f"--run.dir={tmp_path}", "--partition.method=time", "--data.synthetic_shape=[32]")
    train_set, _ = datasets.load_datasets(cfg.data, cfg.run.seed)
    runtime = cpu_runtime(0, 3, backend="none")
    cut = cut_model(cfg, registry.get(cfg.train.schedule), runtime, heavy_in_the_middle(), train_set)
    recorded = cut.cfg
    assert [len(s) for s in cut.stages] == [2, 1, 2] and "differs from the parameter split [1, 1, 3]" in cut.description
    assert recorded.partition.balance == [2, 1, 2] and cfg.partition.balance is None  # a copy, not a mutation

    monkeypatch.setattr(cost, "_timed_layers", _refuse_timing)
    again = cut_model(recorded, registry.get(recorded.train.schedule), runtime, heavy_in_the_middle(), train_set)
    assert [len(s) for s in again.stages] == [2, 1, 2] and "differs" not in again.description
    assert again.cfg is recorded  # a balance given is kept as given


# --------------------------------------------------------------------------- real processes


def _timed_run(rank, world_size, run_dir):
    if rank != 0:
        cost._timed_layers = _refuse_timing
    cfg = load_config(None, [f"--run.dir={run_dir}", "--run.log_every=1000", "--data.name=synthetic",
                             "--data.synthetic_shape=[32]", "--data.synthetic_size=256", "--data.batch_size=32",
                             "--train.steps=2", "--partition.method=time", "--dist.timeout_sec=60"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        trainer = Trainer(cfg, cpu_runtime(rank, world_size), model=heavy_in_the_middle())
    trainer.fit()
    trainer.close()
    names = [name for name, _ in trainer.worker.stage.module.named_children()]
    return names, trainer.cfg.partition.balance, out.getvalue()


@pytest.mark.timeout(180)
def test_every_rank_cuts_by_the_balance_rank_0_measured(tmp_path):
    results = run_distributed(_timed_run, 3, str(tmp_path), timeout=150)
    assert [names for names, _, _ in results] == [["l0", "l1"], ["heavy"], ["l2", "head"]]
    assert all(balance == [2, 1, 2] for _, balance, _ in results)
    printed = results[0][2]
    assert "stage 1:          0 params  [heavy]" in printed
    assert "partition.method time: stage costs" in printed and "differs from the parameter split [1, 1, 3]" in printed
    assert all("partition.method" not in text for _, _, text in results[1:])  # rank 0 alone prints
    assert load_config(Path(tmp_path) / "config.yaml").partition.balance == [2, 1, 2]


def _impossible_cut(rank, world_size, run_dir):
    cfg = load_config(None, [f"--run.dir={run_dir}", "--data.name=synthetic", "--data.synthetic_size=64",
                             "--data.batch_size=16", "--model.depth=1", "--model.width=8", "--train.steps=1",
                             "--train.schedule=dni", "--dni.kind=conv", "--dist.timeout_sec=30"])
    Trainer(cfg, cpu_runtime(rank, world_size))


@pytest.mark.timeout(120)
def test_a_measuring_error_on_rank_0_fails_every_rank_alike(tmp_path):
    """The other ranks wait for rank 0's balance: its error must reach them, not leave them waiting."""
    results = run_distributed(_impossible_cut, 2, str(tmp_path), allow_failures=True, timeout=90)
    assert all(isinstance(r, RankFailed) and isinstance(r.error, PartitionError) for r in results), results
    assert str(results[0].error) == str(results[1].error)
    assert "predictor at every cut" in str(results[1].error)
