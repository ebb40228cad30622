"""train.activation_checkpointing: the same gradients as without it, fewer saved activations, and
every schedule (locked, torch's, dni, async) training exactly what it trains without it."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipedni import recompute
from pipedni.dni import Boundary
from pipedni.engine import Trainer
from pipedni.errors import ConfigError
from pipedni.export import merge_checkpoints
from pipedni.metrics.memory import ActivationMeter
from helpers import assert_same_parameters, gloo_runtime, make_config, run_distributed, train_single

torch.set_num_threads(1)


def _net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    block = lambda: nn.Sequential(nn.Linear(32, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2))  # noqa: E731
    return nn.Sequential(block(), block(), block(), nn.Linear(32, 4))


def _train_once(net: nn.Module, meter: ActivationMeter) -> dict:
    torch.manual_seed(1)  # dropout's masks
    x, y = torch.randn(64, 32), torch.arange(64) % 4
    with meter:
        loss = F.cross_entropy(net(x), y)
    loss.backward()
    return {**{n: p.grad for n, p in net.named_parameters()}, **dict(net.named_buffers())}


@pytest.mark.parametrize("mode", ["blocks", "stage"])
def test_recomputing_gives_the_same_gradients_and_statistics_with_less_saved(mode):
    """Bit for bit the gradients (dropout replayed) and batch-norm statistics (moved once) of the
    plain module, under its own parameter names; the saved activations shrink."""
    plain, meter = _net(), ActivationMeter([])
    expected = _train_once(plain, meter)
    net = recompute.apply(_net(), mode, 0)
    assert [n for n, _ in net.named_parameters()] == [n for n, _ in plain.named_parameters()]
    lighter = ActivationMeter([])
    got = _train_once(net, lighter)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)
    assert lighter.peak_bytes < 0.5 * meter.peak_bytes
    twin = copy.deepcopy(net)  # the replaced forward follows the copy, not the original
    with torch.no_grad():
        for p in twin.parameters():
            p.zero_()
    twin.eval()
    assert float(twin(torch.randn(2, 32)).detach().abs().sum()) == 0.0


def test_what_cannot_be_recomputed_is_refused():
    with pytest.raises(ConfigError, match="activation_checkpointing=stage"):
        recompute.apply(torch.fx.symbolic_trace(_net()), "blocks", 1)
    held = nn.Sequential(nn.Linear(4, 4), Boundary((4,)), nn.Linear(4, 2))
    with pytest.raises(ConfigError, match="stage 0 holds a pipedni.dni.Boundary"):
        recompute.apply(held, "stage", 0)


LOCKED = [("1f1b", 4, "blocks"), ("gpipe", 4, "stage"), ("torch_1f1b", 4, "stage")]
DECOUPLED = [("dni", "blocks"), ("async", "stage")]
EXTRA = ("--data.batch_size=32", "--dni.kind=linear", "--run.activation_memory=true")


def _train_cases(rank: int, world_size: int, root: str) -> list:
    cases = [(f"{s}-{mode}", s, m, mode) for s, m, mode in LOCKED]
    cases += [(f"{s}-{mode}", s, 1, mode) for s, mode in DECOUPLED] + [(s, s, 1, "none") for s, _ in DECOUPLED]
    summaries = []
    for name, schedule, m, mode in cases:
        cfg = make_config(Path(root) / name, schedule, m, *EXTRA, f"--train.activation_checkpointing={mode}")
        trainer = Trainer(cfg, gloo_runtime(rank, world_size))
        summaries.append(trainer.fit())
        trainer.close()
    return summaries


def test_every_schedule_trains_the_same_with_checkpointing(tmp_path):
    """Locked schedules and torch's recomputing equal one process that does not; dni and async
    recomputing equal themselves not recomputing; each stage saves fewer activations."""
    expected, _ = train_single(tmp_path / "single", *EXTRA)
    summaries = run_distributed(_train_cases, 2, str(tmp_path), timeout=240)
    for schedule, m, mode in LOCKED:
        assert_same_parameters(merge_checkpoints(tmp_path / f"{schedule}-{mode}"), expected, f"{schedule} {mode}")
    for schedule, mode in DECOUPLED:
        plain = merge_checkpoints(tmp_path / schedule)
        assert_same_parameters(merge_checkpoints(tmp_path / f"{schedule}-{mode}"), plain, f"{schedule} {mode}", atol=0)
    last = summaries[-1]
    for i, _ in enumerate(DECOUPLED):
        recomputed, plain = last[len(LOCKED) + i], last[len(LOCKED) + len(DECOUPLED) + i]
        assert recomputed["stages"][0]["peak_activation_bytes"] < plain["stages"][0]["peak_activation_bytes"]
