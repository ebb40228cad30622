"""The DNI schedule over real gloo processes: first update, predictor quality, learning,
back-pressure under an unbalanced pipeline, and exact message accounting."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from pipedni.config import load_config
from pipedni.engine import Trainer
from pipedni.errors import ConfigError
from pipedni.export import merge_checkpoints
from pipedni.models import build_model
from pipedni.runtime import Runtime
from helpers import RankFailed, Slow, assert_every_message_received, assert_same_parameters, gloo_runtime, make_config, read_steps, run_distributed, train_run, train_single, write_kjv

FASHION = Path("/usr/share/datasets/fashion-mnist")


def test_zero_initialised_predictors_give_a_zero_first_update(tmp_path):
    """Step 0: every non-last stage backpropagates a zero synthetic gradient, so its weights do
    not move; the last stage backpropagates the true loss, exactly as a locked step would."""
    args = ["--data.name=synthetic", "--data.synthetic_size=256", "--data.batch_size=32", "--train.steps=1",
            "--model.depth=3", "--model.width=32", "--partition.method=uniform", "--run.seed=3",
            "--optim.lr=0.1", "--optim.momentum=0.9"]
    # min_cosine 0: every stage uses its (zero) predictor from the start, no true-gradient fallback
    run_distributed(train_run, 4, str(tmp_path / "dni"), ["--train.schedule=dni", "--dni.min_cosine=0", *args])
    dni = merge_checkpoints(tmp_path / "dni")
    cfg = load_config(None, args)
    initial = build_model(cfg.model, (1, 28, 28), 10, seed=3).state_dict()
    single = load_config(None, [f"--run.dir={tmp_path / 'single'}", "--train.schedule=single", *args])
    Trainer(single, Runtime(0, 1, 0, 1, torch.device("cpu"), "none")).fit()
    locked = merge_checkpoints(tmp_path / "single")
    for name, tensor in dni.items():
        if name.startswith("head"):  # the last stage
            torch.testing.assert_close(tensor, locked[name])  # float32 noise only (thread counts differ)
            assert not torch.equal(tensor, initial[name])
        else:
            torch.testing.assert_close(tensor, initial[name], rtol=0, atol=0)


def test_warm_up_trains_locked_then_decouples(tmp_path):
    """dni.warmup_steps runs 1F1B: with as many warm-up steps as steps, DNI equals 1F1B exactly,
    and the predictors have fitted true gradients (staleness 0) all along."""
    extra = ("--dni.warmup_steps=4", "--dni.condition_on_labels=true")
    cfg = make_config(tmp_path / "dni", "dni", 2, *extra)
    run_distributed(_train_cfg, 2, cfg)
    expected, _ = train_single(tmp_path / "single")
    assert_same_parameters(merge_checkpoints(tmp_path / "dni"), expected, "dni warm-up")
    fits = [r for r in read_steps(tmp_path / "dni", 0) if "sg_loss" in r]
    assert len(fits) == 4 and all(r["staleness"] == 0 for r in fits)
    state = torch.load(tmp_path / "dni/checkpoints/step_00000004/stage0.pt", weights_only=False)
    assert "synthetic_gradient" in state  # the predictor is checkpointed beside the stage


def _train_cfg(rank, world_size, cfg):
    trainer = Trainer(cfg, gloo_runtime(rank, world_size))
    trainer.fit()
    trainer.close()


def test_predictor_learns_the_true_gradient(tmp_path):
    """With 2 stages, stage 0's targets are exact gradients from the loss: the cosine between
    its predictions and those targets starts near 0 (the predictor starts at zero; fits within
    the first step already move it) and must rise far above the ~0 of an uninformed guess."""
    args = ["--train.schedule=dni", "--data.name=synthetic", "--data.synthetic_size=4096", "--data.batch_size=64",
            "--train.steps=300", "--model.depth=2", "--model.width=64", "--partition.balance=[2,1]",
            "--optim.name=adam", "--optim.lr=1e-4", "--dni.lr=1e-3", "--dni.condition_on_labels=true", "--dni.kind=mlp",
            "--dni.min_cosine=0.5", "--run.timeline_steps=3"]
    run_distributed(train_run, 2, str(tmp_path), args)
    trace = json.loads((tmp_path / "timeline.json").read_text())["traceEvents"]
    calls = [e for e in trace if e["ph"] == "X"]
    assert {e["args"]["step"] for e in calls} == {1, 2, 3}
    assert {"forward", "backward", "optimizer", "predictor", "send"} <= {e["cat"] for e in calls if e["tid"] == 0}
    steps = [r for r in read_steps(tmp_path, 0) if "sg_cosine" in r]
    late = [r["sg_cosine"] for r in steps[-50:]]
    assert sum(late) / len(late) > 0.8, late
    assert steps[0]["sg_cosine"] < 0.25, steps[0]
    # dni.min_cosine 0.5: stage 0 learns from delayed true gradients until its predictor agrees
    untrusted = [r["sg_untrusted"] for r in read_steps(tmp_path, 0) if "sg_untrusted" in r]
    assert untrusted[0] == 1 and untrusted[-50:] == [0] * 50, untrusted


@pytest.mark.slow
@pytest.mark.skipif(not FASHION.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
@pytest.mark.parametrize("num_stages,conditioned", [(2, False), (4, True)])
def test_dni_and_cdni_learn_fashion_mnist(tmp_path, num_stages, conditioned):
    args = ["--train.schedule=dni", "--model.depth=3", "--model.width=256", "--model.batchnorm=true",
            "--data.batch_size=128", "--data.test_limit=2000", "--train.steps=300", "--optim.name=adam",
            "--partition.method=parameters",  # the split this accuracy was set on, not one timing picks
            "--optim.lr=1e-4", f"--dni.condition_on_labels={str(conditioned).lower()}", "--dni.kind=linear"]
    results = run_distributed(train_run, num_stages, str(tmp_path), args, timeout=240)
    summary = results[-1][0]
    assert summary["test_accuracy"] > 0.70, summary["test_accuracy"]  # chance: 0.10
    assert_every_message_received([counts for _, counts in results])


def _unbalanced_model():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), Slow(0.02), nn.Linear(32, 32), nn.Linear(32, 10))


def test_slow_stage_causes_back_pressure_not_deadlock_or_growth(tmp_path):
    """Stage 1 sleeps 20 ms per step; stage 0 computes in well under that. Stage 0 must run at
    most dni.max_staleness steps ahead (its store and the mailboxes stay bounded), wait on
    back-pressure instead, and the run must finish with every message received.

    Regression: gradient clipping used to all-reduce the norm over all stages at every step,
    which put DNI stages back in lockstep (stage 0 could never get ahead)."""
    args = ["--train.schedule=dni", "--data.name=synthetic", "--data.synthetic_size=1024", "--data.batch_size=32",
            "--train.steps=60", "--partition.balance=[3,1,2]", "--dni.max_staleness=3", "--dist.queue_size=8",
            "--optim.grad_clip=1.0",  # per-stage under dni: a whole-model all-reduce would re-lock the stages
            "--dni.min_cosine=0"]  # the synthetic path throughout: untrusted steps wait for their gradient instead
    results = run_distributed(train_run, 3, str(tmp_path), args, _unbalanced_model(), timeout=120)
    store_sizes = [r["store_size"] for r in read_steps(tmp_path, 0)]
    assert max(store_sizes) == 3  # the bound is reached (stage 0 is ahead) and never exceeded
    summary = results[-1][0]
    first = summary["stages"][0]
    assert first["wait_grad_sec"] > 0.3  # stage 0 was held back by the store bound
    assert max(s["peak_queued_messages"] for s in summary["stages"]) <= 8
    assert_every_message_received([counts for _, counts in results])


def _train_language_model(rank, world_size, run_dir, overrides):
    cfg = load_config(None, [f"--run.dir={run_dir}", "--run.log_every=100000", *overrides])
    trainer = Trainer(cfg, gloo_runtime(rank, world_size))
    summary = trainer.fit()
    trainer.close()
    end = trainer.worker.gradients
    return summary, trainer.worker.transport.counts(), None if end is None else end.sg.model.net[0].in_features


@pytest.mark.parametrize("conditioned", [False, True])
def test_dni_and_cdni_train_a_transformer_with_per_position_predictors(tmp_path, conditioned):
    """Two stages of a character LM, cut between blocks: the boundary carries [B, T, C]
    activations and one label per position. The predictor works per position (C inputs, plus V
    for cDNI, not T*C), is fitted on every step's gradient, and the model learns."""
    text = write_kjv(tmp_path / "kjv.jsonl")
    args = ["--train.schedule=dni", "--model.name=transformer", "--model.depth=4", "--model.width=32",
            "--model.heads=2", "--data.name=kjv", f"--data.root={tmp_path}", "--data.seq_len=16",
            "--data.batch_size=16", "--train.steps=40", "--partition.balance=[3,3]", "--optim.name=adam",
            "--optim.lr=3e-3", "--dni.kind=mlp", "--dni.hidden_width=64", f"--dni.condition_on_labels={str(conditioned).lower()}"]
    results = run_distributed(_train_language_model, 2, str(tmp_path / "run"), args, timeout=120)
    vocab_size = len(set(text))
    assert results[0][2] == 32 + (vocab_size if conditioned else 0) and results[1][2] is None
    fits = [r for r in read_steps(tmp_path / "run", 0) if "sg_loss" in r]
    assert len(fits) >= 10 and all(math.isfinite(r["sg_loss"]) for r in fits)  # a step may fit several
    losses = [r["loss"] for r in read_steps(tmp_path / "run", 1)]
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5, losses  # ln(31) = 3.4 at the start
    assert math.isfinite(results[1][0]["test_loss"])
    assert_every_message_received([counts for _, counts, _ in results])


def _train_per_sample_labels_on_a_sequence_boundary(rank, world_size, run_dir):
    model = nn.Sequential(nn.Linear(8, 8), nn.Flatten(), nn.Linear(32, 10))  # [B, 4, 8] between stages
    args = ["--train.schedule=dni", "--data.name=synthetic", "--data.synthetic_shape=[4,8]",
            "--data.synthetic_size=64", "--data.batch_size=16", "--train.steps=2", "--partition.balance=[1,2]",
            "--dist.timeout_sec=30"]
    return train_run(rank, world_size, run_dir, args, model)


def test_sequence_boundary_with_one_label_per_sample_is_refused(tmp_path):
    """A [B, T, C] boundary gets a per-position predictor whose targets are scaled by B*T labels;
    with one label per sample that scale would silently be T times too large, so it is an error."""
    results = run_distributed(_train_per_sample_labels_on_a_sequence_boundary, 2, str(tmp_path),
                              allow_failures=True, timeout=60)
    err = results[0]
    assert isinstance(err, RankFailed) and isinstance(err.error, ConfigError), err
    assert "stage 0's output [*, 4, 8] float32 is a sequence boundary expecting 4 label(s) per sample" in str(err.error)
    assert "but the data has 1" in str(err.error)


def test_dni_microbatches_give_the_same_update_with_a_fraction_of_the_activations(tmp_path):
    """[Note: DNI microbatches]: after 2 locked warm-up steps the predictors are non-zero; the
    first decoupled step run as 4 microbatches must update every stage exactly as one
    whole-batch pass does (per-sample predictions, loss shares on the last stage), while the
    last stage keeps a quarter of the activations alive. Every message, now one per
    microbatch, is consumed (cDNI: labels are split alike)."""
    args = ["--train.schedule=dni", "--data.name=synthetic", "--data.synthetic_size=256", "--data.batch_size=32",
            "--train.steps=3", "--dni.warmup_steps=2", "--model.depth=3", "--model.width=32", "--run.seed=3",
            "--partition.method=uniform", "--optim.name=sgd", "--optim.lr=0.1", "--dni.kind=linear",
            "--dni.condition_on_labels=true", "--dni.lr=0.01", "--run.activation_memory=true"]
    whole = run_distributed(train_run, 3, str(tmp_path / "m1"), [*args, "--dni.microbatches=1"])
    split = run_distributed(train_run, 3, str(tmp_path / "m4"), [*args, "--dni.microbatches=4"])
    assert_same_parameters(merge_checkpoints(tmp_path / "m4"), merge_checkpoints(tmp_path / "m1"), "dni M=4 vs 1")
    assert_every_message_received([counts for _, counts in split])
    assert split[0][1]["sent_next"] == whole[0][1]["sent_next"] + 3  # step 2: 4 activations instead of 1
    last_whole, last_split = whole[-1][0]["stages"][-1], split[-1][0]["stages"][-1]
    assert last_split["peak_activation_bytes"] < 0.5 * last_whole["peak_activation_bytes"]
