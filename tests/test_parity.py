"""Parity: every locked pipelined schedule must equal one process on every parameter.

This is the backbone test of the engine: naive, GPipe and 1F1B with N = 2 and 4 stages and
M = 1 and 4 microbatches train an mlp (no BatchNorm), and a transformer language model with one
label per position, for a few SGD steps on the same data as the single-process reference; the
merged per-stage checkpoints must match it by name. torch's own GPipe and 1F1B driving the same
stages (the benchmark's peer) must match it too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipedni.engine import Trainer
from pipedni.export import merge_checkpoints
from helpers import assert_same_parameters, make_config, run_distributed, train_single, write_kjv

CASES = [(schedule, m) for schedule in ("naive", "gpipe", "1f1b") for m in (1, 4)]

# A tiny character LM on a small kjv.jsonl fixture: 6 layers (embed, 4 blocks, head), [B, T, V] scores.
TRANSFORMER = ("--model.name=transformer", "--model.depth=4", "--model.width=32", "--model.heads=2",
               "--data.name=kjv", "--data.seq_len=16")


def _train_cases(rank: int, world_size: int, root: str, cases: list, extra: tuple) -> list:
    from pipedni.runtime import Runtime

    summaries = []
    runtime = Runtime(rank, world_size, rank, world_size, torch.device("cpu"), "gloo")
    for schedule, m in cases:
        cfg = make_config(Path(root) / f"{schedule}-{m}", schedule, m, *extra)
        trainer = Trainer(cfg, runtime)
        summaries.append(trainer.fit())
        trainer.close()
    return summaries


def check_locked_schedules(tmp_path: Path, num_stages: int, extra: tuple) -> None:
    expected, reference = train_single(tmp_path / "single", *extra)
    summaries = run_distributed(_train_cases, num_stages, str(tmp_path), CASES, extra)
    for i, (schedule, m) in enumerate(CASES):
        merged = merge_checkpoints(tmp_path / f"{schedule}-{m}")
        assert_same_parameters(merged, expected, f"{schedule} N={num_stages} M={m}")
        last = summaries[-1][i]
        assert last["test_loss"] == pytest.approx(reference["test_loss"], rel=1e-4)
        assert last["num_stages"] == num_stages and last["schedule"] == schedule


@pytest.mark.parametrize("num_stages", [2, 4])
def test_locked_schedules_match_single_process(tmp_path, num_stages):
    check_locked_schedules(tmp_path, num_stages, ())


@pytest.mark.parametrize("num_stages", [2, 4])
def test_locked_schedules_match_single_process_on_a_transformer(tmp_path, num_stages):
    """Per-position labels: the loss is the mean over batch x seq_len labels, and the microbatch
    weights (rows / batch) must still make accumulated gradients equal one full-batch step;
    30 sequences in 4 microbatches also gives uneven ones (8, 8, 7, 7)."""
    write_kjv(tmp_path / "kjv.jsonl")
    check_locked_schedules(tmp_path, num_stages, (*TRANSFORMER, f"--data.root={tmp_path}"))


@pytest.mark.parametrize("num_stages,workload", [(2, "mlp"), (4, "mlp"), (2, "transformer")])
def test_the_peer_matches_single_process(tmp_path, num_stages, workload):
    """torch.distributed.pipelining's GPipe and 1F1B driving our stages (pipedni.schedules.peer) is the
    benchmark's yardstick, so it must train exactly what the others train. torch averages equal
    microbatches, hence a batch that M divides."""
    extra = ("--data.batch_size=32",)
    if workload == "transformer":
        write_kjv(tmp_path / "kjv.jsonl")
        extra += (*TRANSFORMER, f"--data.root={tmp_path}")
    expected, reference = train_single(tmp_path / "single", *extra)
    cases = [("torch_gpipe", 4), ("torch_1f1b", 4)]
    summaries = run_distributed(_train_cases, num_stages, str(tmp_path), cases, extra)
    for i, (schedule, m) in enumerate(cases):
        assert_same_parameters(merge_checkpoints(tmp_path / f"{schedule}-{m}"), expected, f"{schedule} N={num_stages}")
        last = summaries[-1][i]
        assert last["test_loss"] == pytest.approx(reference["test_loss"], rel=1e-4)
        assert last["schedule"] == schedule and all(s["busy_fraction"] > 0 for s in last["stages"])


def test_parity_with_clipping_adam_and_cosine(tmp_path):
    """Gradient clipping must use the whole model's norm (an all-reduce over stages), or a
    pipelined run clips each stage differently from one process."""
    extra = ("--optim.name=adam", "--optim.lr=0.01", "--optim.grad_clip=0.5",
             "--optim.lr_schedule=cosine", "--optim.warmup_steps=2")
    expected, _ = train_single(tmp_path / "single", *extra)
    norms = [json.loads(line)["grad_norm"] for line in (tmp_path / "single/metrics/stage0.jsonl").read_text().splitlines()
             if "grad_norm" in line]
    assert max(norms) > 0.5, "the clip must be active for this test to mean anything"
    run_distributed(_train_cases, 2, str(tmp_path), [("1f1b", 4)], extra)
    # Adam divides by sqrt(v): where a gradient is ~0, microbatch summation order shows at 1e-6.
    assert_same_parameters(merge_checkpoints(tmp_path / "1f1b-4"), expected, "1f1b clipped", atol=1e-5)


def test_initial_weights_do_not_depend_on_the_split():
    from pipedni.config import ModelConfig
    from pipedni.models import build_model
    from pipedni.split.partition import partition

    whole = build_model(ModelConfig(name="cnn", channels=[4, 8], hidden=16, batchnorm=True), (1, 28, 28), 10, seed=5).state_dict()
    for n in (1, 2, 4):
        model = build_model(ModelConfig(name="cnn", channels=[4, 8], hidden=16, batchnorm=True), (1, 28, 28), 10, seed=5)
        merged = {}
        for stage in partition(model, n, method="parameters" if n < 4 else "uniform"):
            merged.update(stage.state_dict())
        assert_same_parameters(merged, whole, f"N={n}")
