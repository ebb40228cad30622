"""The async schedule (delayed true gradients) equals one process applying the same delays.

The reference is tests/references.py's, written apart from the engine: plain modules, a deep
copy of a stage for each forward whose backward comes later (weight stashing) or a
recomputation on the current weights (features replay), and every stage's update of step s at
"time" s + d_i. A pipelined run over real gloo processes must match it parameter by parameter,
send every message exactly once and end with nothing in flight.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipedni.config import OptimConfig, load_config
from pipedni.engine import Trainer
from pipedni.errors import ConfigError
from pipedni.export import merge_checkpoints
from pipedni.runtime import Runtime
from pipedni.stage import Stage
from helpers import assert_every_message_received, read_steps, run_distributed
from references import mixed_reference

STEPS = 6


def make_config(run_dir: Path, *extra: str):
    return load_config(None, [
        f"--run.dir={run_dir}", "--run.seed=5", "--run.log_every=1000", "--model.name=mlp", "--model.depth=4",
        "--model.width=24", "--data.name=synthetic", "--data.synthetic_size=256", "--data.batch_size=20",
        "--partition.method=uniform", "--train.schedule=async", f"--train.steps={STEPS}", "--optim.name=sgd",
        "--optim.lr=0.1", "--optim.momentum=0.9", *extra,
    ])


def delayed_reference(cfg, num_stages: int) -> dict:
    """One process: stage i updates at time t with the gradient of step t - delay x (N-1-i), the
    mixed reference with every boundary async and whole batches."""
    return mixed_reference(cfg, num_stages, ["async"] * (num_stages - 1), 1, STEPS)[0]


CASES = [("stash", ()), ("replay", ("--delayed.weight_stashing=false",)), ("delay2", ("--delayed.delay=2",)),
         ("unpredicted", ("--delayed.weight_prediction=false",))]


def _train_cases(rank: int, world_size: int, root: str) -> list:
    runtime = Runtime(rank, world_size, rank, world_size, torch.device("cpu"), "gloo")
    out = []
    for name, extra in CASES:
        trainer = Trainer(make_config(Path(root) / name, *extra), runtime)
        summary = trainer.fit()
        trainer.close()  # raises if any message was left unconsumed
        out.append((summary, trainer.worker.transport.counts()))
    return out


def test_async_equals_a_single_process_applying_the_same_delays(tmp_path):
    """Three stages (delays 2, 1, 0 steps; 4, 2, 0 with delay 2), with and without weight
    stashing, with and without weight prediction: every parameter equals the delayed
    reference, every stage made one update per batch (the drain included), and the store held
    exactly d_i steps between steps."""
    num_stages = 3
    results = run_distributed(_train_cases, num_stages, str(tmp_path), timeout=240)
    for c, (name, extra) in enumerate(CASES):
        cfg = make_config(tmp_path / name, *extra)
        expected = delayed_reference(cfg, num_stages)
        merged = merge_checkpoints(tmp_path / name)
        assert merged.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(merged[key], expected[key], rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{name} {key}: {m}")
        assert_every_message_received([per_rank[c][1] for per_rank in results])
        summary = results[-1][c][0]
        assert summary["schedule"] == "async"
        for i in range(num_stages - 1):
            delay = cfg.delayed.delay * (num_stages - 1 - i)
            assert summary["stages"][i]["max_store_size"] == delay
            assert {r["staleness"] for r in read_steps(tmp_path / name, i)} == {delay}
        assert len(read_steps(tmp_path / name, num_stages - 1)) == STEPS


def test_the_reference_is_not_plain_backprop(tmp_path):
    """The parity above would prove little if delays changed nothing: they do."""
    cfg = make_config(tmp_path)
    delayed = delayed_reference(cfg, 3)
    cfg.delayed.delay = 0  # the reference with no delay is one process's backprop
    exact = delayed_reference(cfg, 3)
    assert any(not torch.allclose(delayed[k], exact[k]) for k in exact)
    cfg.delayed.delay = 1
    cfg.delayed.weight_prediction = False
    unpredicted = delayed_reference(cfg, 3)
    assert any(not torch.allclose(delayed[k], unpredicted[k]) for k in exact)


def test_weight_prediction_extrapolates_the_last_update():
    """A stash ``ahead`` updates on is w + ahead x (w - w before the last update), and only then."""
    torch.manual_seed(0)
    stage = Stage(torch.nn.Linear(3, 2), 0, 2, torch.device("cpu"), OptimConfig(name="sgd", lr=0.5), 10)
    first = {n: p.detach().clone() for n, p in stage.module.named_parameters()}
    assert all(torch.equal(stage.stash(ahead=2)[n], first[n]) for n in first)  # nothing to extrapolate yet
    stage.track_updates()
    assert all(torch.equal(stage.stash(ahead=2)[n], first[n]) for n in first)  # no update yet
    stage.module(torch.randn(4, 3)).sum().backward()
    stage.step()
    for name, p in stage.module.named_parameters():
        moved = p.detach() - first[name]
        assert moved.abs().sum() > 0
        torch.testing.assert_close(stage.stash(ahead=2)[name], p.detach() + 2 * moved)
        torch.testing.assert_close(stage.stash()[name], p.detach())
        assert stage.stash(ahead=1)[name].requires_grad


@pytest.mark.parametrize("override,message", [
    ("--delayed.delay=0", "delayed.delay = 0; must be >= 1"),
    ("--delayed.delay=70", "raise dist.queue_size to at least 72"),
])
def test_impossible_delays_are_refused_at_load(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["--train.schedule=async", override])
