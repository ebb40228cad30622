"""train.precision: bf16 and fp16 forwards under autocast with fp32 master weights, fp16's agreed
loss scale, the wire dtype that follows the compute dtype, and every schedule honouring it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipedni.config import OptimConfig, load_config
from pipedni.dni import Boundary
from pipedni.engine import Trainer
from pipedni.errors import ConfigError
from pipedni.export import merge_checkpoints
from pipedni.precision import LossScale, Precision
from pipedni.schedules import registry
from pipedni.stage import Stage
from helpers import CPU, assert_same_parameters, gloo_runtime, make_config, run_distributed, train_single

torch.set_num_threads(1)

BF16, FP16 = Precision("bf16"), Precision("fp16")


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def test_precision_settings_are_checked():
    with pytest.raises(ConfigError, match="train.precision"):
        load_config(None, ["--train.precision=fp8"])
    for schedule in ("dni", "async", "mixed"):
        cfg = load_config(None, [f"--train.schedule={schedule}", "--train.precision=fp16"])
        with pytest.raises(ConfigError, match="--train.precision=bf16"):
            registry.check_config(cfg)
    for schedule in ("1f1b", "torch_gpipe", "dni"):  # bf16 needs no scale: every schedule takes it
        registry.check_config(load_config(None, [f"--train.schedule={schedule}", "--train.precision=bf16"]))


def test_a_bf16_stage_computes_in_bf16_and_keeps_fp32_master_weights():
    """The output is bf16, the loss fp32, the gradients and the update fp32; a forward after an
    update runs on the new weights (no low-precision copy outlives its autocast region)."""
    first = Stage(_mlp()[:2], 0, 2, CPU, OptimConfig(lr=0.5), 10, precision=BF16)
    last = Stage(_mlp()[2:], 1, 2, CPU, OptimConfig(lr=0.5), 10, precision=BF16)
    x, y = torch.randn(4, 8), torch.tensor([0, 1, 2, 0])
    h = first.forward(0, x)
    assert h.dtype == torch.bfloat16
    loss = last.forward(0, torch.randn(4, 16).to(torch.bfloat16), y)
    assert loss.dtype == torch.float32
    grad = last.backward(0)
    assert grad.dtype == torch.bfloat16
    first.backward(0, grad)  # the same [4, 16] shape
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in first.module.parameters())
    first.step()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = first.module(x)
    torch.testing.assert_close(first.evaluate(x), expected, rtol=0, atol=0)


def test_loss_scale_moves_as_torchs_grad_scaler():
    """The same scale after every step as torch.amp.GradScaler, given the same finite/inf steps."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=3)
    ours = LossScale(init=2.0 ** 10, interval=3)
    p = nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.0)
    for finite in (True, True, True, False, True, True, True, True, False, False, True):
        opt.zero_grad()
        scaler.scale((p * (1.0 if finite else math.inf)).sum()).backward()
        scaler.step(opt)
        scaler.update()
        ours.update(finite)
        assert ours.value == scaler.get_scale()


def _skip_together(rank: int, world_size: int) -> list:
    """Two fp16 stages; stage 1's gradient overflows at the first step, neither's at the second."""
    from pipedni.schedules.worker import grad_norm
    from pipedni.transport import Transport

    transport = Transport(rank, world_size, CPU, CPU, timeout=30.0)
    stage = Stage(nn.Linear(2, 2), rank, world_size, CPU, OptimConfig(name="sgd", lr=0.1, momentum=0.0), 10,
                  precision=Precision("fp16"))
    seen = []
    for overflow in (rank == 1, False):
        before = stage.module.weight.detach().clone()
        scale = stage.loss_scale.value
        for p in stage.module.parameters():
            p.grad = torch.full_like(p, math.inf if overflow else scale)  # a scaled gradient of 1
        updated = stage.step(grad_norm(stage, transport))
        seen.append((updated, stage.loss_scale.value, float((before - stage.module.weight).max())))
    transport.close()
    return seen


def test_fp16_stages_skip_an_overflowing_step_together():
    """One stage's inf is every stage's skip, and every stage's scale halves; the next step
    unscales (the update is lr x 1, not lr x the scale)."""
    for seen in run_distributed(_skip_together, 2):
        (skipped, halved, moved), (updated, kept, step) = seen
        assert not skipped and halved == 2.0 ** 15 and moved == 0.0
        assert updated and kept == 2.0 ** 15 and step == pytest.approx(0.1)


LOCKED = [("naive", 1, "bf16"), ("gpipe", 4, "bf16"), ("1f1b", 4, "bf16"), ("torch_1f1b", 4, "bf16"),
          ("naive", 1, "fp16"), ("1f1b", 4, "fp16"), ("torch_gpipe", 4, "fp16")]
DECOUPLED = [("dni", ()), ("async", ()), ("mixed", ("--train.boundaries=[dni]", "--dni.synthetic_inputs=true"))]
EXTRA = ("--data.batch_size=32",)  # torch's schedules take equal microbatches


def _train_cases(rank: int, world_size: int, root: str) -> list:
    summaries = []
    for schedule, m, precision in LOCKED:
        cfg = make_config(Path(root) / f"{schedule}-{precision}", schedule, m, *EXTRA, f"--train.precision={precision}")
        trainer = Trainer(cfg, gloo_runtime(rank, world_size))
        summaries.append(trainer.fit())
        trainer.close()
    for schedule, extra in DECOUPLED:
        cfg = make_config(Path(root) / schedule, schedule, 1, *EXTRA, "--train.precision=bf16", "--train.steps=30",
                          "--optim.lr=0.02", *extra)
        trainer = Trainer(cfg, gloo_runtime(rank, world_size))
        summaries.append(trainer.fit())
        trainer.close()
    return summaries


def test_every_schedule_honours_the_precision(tmp_path):
    """Locked schedules and torch's train what one process trains at the same precision (fp16
    with its loss scale, saved in the checkpoint): exactly at M = 1, and exactly as each other at
    M = 4, whose microbatch sums round in 16 bits apart from one whole batch's, hence close to
    one process. Activations travel in the compute dtype; dni, async and mixed with synthetic
    inputs train in bf16."""
    references = {p: train_single(tmp_path / f"single-{p}", *EXTRA, f"--train.precision={p}") for p in ("bf16", "fp16")}
    summaries = run_distributed(_train_cases, 2, str(tmp_path), timeout=240)[-1]
    microbatched = {}
    for (schedule, m, precision), summary in zip(LOCKED, summaries):
        label = f"{schedule} M={m} {precision}"
        expected, reference = references[precision]
        merged = merge_checkpoints(tmp_path / f"{schedule}-{precision}")
        if m == 1:
            assert_same_parameters(merged, expected, label)
        else:
            assert_same_parameters(merged, microbatched.setdefault(precision, merged), label)
            assert_same_parameters(merged, expected, label, atol=3e-3)
        assert summary["test_loss"] == pytest.approx(reference["test_loss"], rel=1e-2), label
        assert summary["precision"] == precision
        width, itemsize = 32, 2  # a [32, width] activation per step in 16 bits, and no more
        if not schedule.startswith("torch"):
            assert summary["stages"][0]["bytes_sent_per_step"] == 32 * width * itemsize, label
    state = torch.load(tmp_path / "1f1b-fp16/checkpoints/step_00000004/stage1.pt", weights_only=False)
    assert state["loss_scale"]["value"] == 2.0 ** 16  # no overflow in these four steps
    for (schedule, _), summary in zip(DECOUPLED, summaries[len(LOCKED):]):
        assert summary["precision"] == "bf16" and summary["test_accuracy"] > 0.5, schedule  # chance: 0.1


def _boundary_loop(autocast: bool) -> tuple[list[float], nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(256, 10)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    net = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), Boundary((32,), num_classes=3, min_cosine=0.0),
                        nn.Linear(32, 3))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for step in range(150):
        i = (step * 32) % 256
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = net(x[i:i + 32])
        loss = F.cross_entropy(out.float(), y[i:i + 32])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses, net, out


def test_a_boundary_in_a_bf16_autocast_loop_trains_as_in_fp32():
    """pipedni.dni.Boundary in a user's own bf16 autocast loop: bf16 activations, an fp32
    predictor, synthetic gradients of the activation's dtype; the loss falls as in fp32."""
    losses, net, out = _boundary_loop(autocast=True)
    reference, _, _ = _boundary_loop(autocast=False)
    assert out.dtype == torch.bfloat16 and net[2].predictor.net[0].weight.dtype == torch.float32
    assert net[2].num_fits == 150 and sum(losses[-20:]) < 0.85 * sum(losses[:20])
    assert sum(losses[-20:]) == pytest.approx(sum(reference[-20:]), rel=0.05)


def test_the_loss_scale_is_checkpointed_and_gives_up_after_forty_overflows(tmp_path):
    """The scale and its count of finite steps come back on resume; 40 overflowing steps in a row
    (the scale from 2^16 down to 2^-24) are divergence, not overflow."""
    from pipedni import checkpoint
    from pipedni.config import CheckpointConfig
    from pipedni.stage import MAX_SCALED_SKIPS_IN_A_ROW, NonFinite

    stage = Stage(_mlp(), 0, 1, CPU, OptimConfig(), 10, precision=FP16)
    stage.loss_scale.value, stage.loss_scale.finite_in_a_row = 1024.0, 7
    saver = checkpoint.Checkpointer(tmp_path, CheckpointConfig(), rank=0, distributed=False)
    saver.save(stage, 3, 1, load_config(None, []).to_dict(), {})
    resumed = Stage(_mlp(), 0, 1, CPU, OptimConfig(), 10, precision=FP16)
    checkpoint.restore(resumed, checkpoint.find(tmp_path / "checkpoints", "latest"), 1)
    assert resumed.loss_scale.state_dict() == {"value": 1024.0, "finite_in_a_row": 7}
    for _ in range(MAX_SCALED_SKIPS_IN_A_ROW - 1):
        assert resumed.step(math.inf) is False
    with pytest.raises(NonFinite, match="at every loss scale"):
        resumed.step(math.inf)
