"""Activation memory: what a stage keeps for backward, counted through saved-tensor hooks."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipedni.config import load_config
from pipedni.engine import Trainer
from pipedni.metrics.memory import ActivationMeter, NullMeter
from pipedni.runtime import Runtime
from helpers import run_distributed


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))


def test_counts_saved_activations_not_parameters_until_backward_frees_them():
    """Linear saves its input (8x10 floats) and its weight (a parameter: not counted); ReLU
    saves its output (8x20 floats); the second Linear saves the ReLU output again (counted once)."""
    net = _net()
    meter = ActivationMeter(net.parameters())
    x = torch.randn(8, 10)
    with meter:
        out = net(x)
    assert meter.saved_bytes == (8 * 10 + 8 * 20) * 4
    out.sum().backward()
    assert meter.saved_bytes == 0 and meter.peak_bytes == (8 * 10 + 8 * 20) * 4


def test_graphs_in_flight_add_up_and_a_dropped_graph_is_released():
    net = _net()
    meter = ActivationMeter(net.parameters())
    x = torch.randn(8, 10)
    with meter:
        outs = [net(x) for _ in range(3)]  # x is shared: three ReLU outputs, one input
    assert meter.peak_bytes == (8 * 10 + 3 * 8 * 20) * 4
    del outs  # dropped without backward: no reference cycle keeps the saves alive
    assert meter.saved_bytes == 0


def test_metering_does_not_change_gradients():
    net, x = _net(), torch.randn(8, 10)
    net(x).pow(2).sum().backward()
    expected = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    with ActivationMeter(net.parameters()):
        out = net(x)
    out.pow(2).sum().backward()
    for want, p in zip(expected, net.parameters()):
        assert torch.equal(want, p.grad)


def test_held_bytes_count_towards_the_peak_and_the_null_meter_has_no_figure():
    meter = ActivationMeter([])
    meter.hold(1000)
    assert meter.peak_bytes == 1000
    with NullMeter() as null:
        null.hold(5)
    assert null.peak_bytes is None


def _peaks(rank: int, world_size: int, root: str, schedules: list[str]) -> dict:
    runtime = Runtime(rank, world_size, rank, world_size, torch.device("cpu"), "gloo")
    peaks = {}
    for schedule in schedules:
        cfg = load_config(None, [
            f"--run.dir={Path(root) / schedule}", "--run.activation_memory=true", "--run.log_every=1000",
            "--model.depth=3", "--model.width=64", "--data.name=synthetic", "--data.synthetic_size=512",
            "--data.batch_size=64", "--train.microbatches=4", f"--train.schedule={schedule}", "--train.steps=3",
            "--dni.kind=linear", "--dni.max_staleness=2", "--checkpoint.enabled=false",
        ])
        trainer = Trainer(cfg, runtime)
        trainer.fit()
        trainer.close()
        peaks[schedule] = trainer.totals.peak_activation_bytes
    return peaks


def test_gpipe_keeps_every_microbatch_1f1b_few_and_dni_counts_its_store(tmp_path):
    """The last of 2 stages: GPipe runs all 4 forwards before the first backward; 1F1B follows
    each forward with its backward (one microbatch in flight); the peer's schedules must show the
    same, since the benchmark compares them by this figure. A DNI stage frees its graph at once
    but keeps outputs awaiting their gradient: its store counts."""
    schedules = ["gpipe", "1f1b", "torch_gpipe", "torch_1f1b", "dni"]
    first, last = run_distributed(_peaks, 2, str(tmp_path), schedules)
    assert last["gpipe"] > 3 * last["1f1b"] and last["torch_gpipe"] > 3 * last["torch_1f1b"]
    assert first["gpipe"] >= first["1f1b"] > 0
    store_bytes = 2 * 2 * 64 * 64 * 4  # up to 2 steps of outputs and predictions, 64 x 64 floats each
    assert first["dni"] >= store_bytes
