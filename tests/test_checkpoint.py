"""Checkpoints in one process: optimizer state by name across splits, the atomic folder protocol,
metrics on resume, and what a non-finite update does (the multi-process runs: test_resume.py)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from pipedni import checkpoint
from pipedni.config import CheckpointConfig, OptimConfig, load_config
from pipedni.errors import CheckpointError
from pipedni.metrics import MetricsWriter
from pipedni.split.partition import partition
from pipedni.stage import MAX_SKIPPED_IN_A_ROW, NonFinite, Stage


def model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def stages_of(net: nn.Sequential, balance: list[int], **kwargs) -> list[Stage]:
    parts = partition(net, len(balance), balance)
    return [Stage(p, i, len(parts), torch.device("cpu"), OptimConfig(name="adam", lr=0.01), 100, **kwargs)
            for i, p in enumerate(parts)]


def train_a_little(stages: list[Stage], steps: int = 3) -> None:
    for _ in range(steps):
        h = torch.randn(5, 4)
        for s in stages:
            h = s.module(h)
        h.pow(2).mean().backward()
        for s in stages:
            s.step()


def test_optimizer_state_goes_by_name_into_any_split():
    """Adam's moments saved under 3 stages land on the same parameters under 1 and 2 stages."""
    three = stages_of(model(), [2, 2, 1])
    train_a_little(three)
    saved = [checkpoint.optimizer_by_name(s) for s in three]
    assert set(saved[1]["state"]) == {"2.weight", "2.bias"}
    for balance in ([5], [3, 2]):
        fresh = stages_of(model(), balance)
        for s in fresh:
            checkpoint.load_optimizer_by_name(s, saved)
        got = {n: st for s in fresh for n, st in checkpoint.optimizer_by_name(s)["state"].items()}
        want = {n: st for by_name in saved for n, st in by_name["state"].items()}
        assert got.keys() == want.keys()
        for name in want:
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(got[name][key], want[name][key]), (balance, name, key)


def save_step(root, step, num_stages=2, token="a"):
    for i in range(num_stages):
        state = {"model": {f"w{i}": torch.full((2,), float(step))}, "stage_index": i, "num_stages": num_stages,
                 "step": step, "run_token": token}
        checkpoint.save_atomic(state, checkpoint.step_dir(root, step) / f"stage{i}.pt")


def test_latest_skips_a_folder_left_half_written(tmp_path):
    """A kill during a checkpoint leaves `.step_<n>.partial`: nothing reads it, the previous
    complete folder stays the latest, and the next completed save removes the leftover."""
    root = tmp_path / "checkpoints"
    save_step(root, 4)
    partial = root / ".step_00000008.partial"
    partial.mkdir()
    (partial / "stage0.pt").write_bytes(b"half a file")
    assert checkpoint.complete_steps(root) == [4]
    assert checkpoint.find(root, "latest") == checkpoint.step_dir(root, 4)
    assert checkpoint.load_folder(checkpoint.find(root, "latest"))[1]["step"] == 4
    with pytest.raises(CheckpointError, match=r"no checkpoint of step 8 .*steps there: 4"):
        checkpoint.find(root, "8")
    with pytest.raises(CheckpointError, match="is not a checkpoint folder"):
        checkpoint.find(root, str(partial.parent / "elsewhere"))
    # rank 0 completing step 12 with keep_last 2 keeps 4 and 12 and drops the leftover
    saver = checkpoint.Checkpointer(root.parent, CheckpointConfig(keep_last=2), rank=0, distributed=False)
    stage = stages_of(model(), [5])[0]
    saver.save(stage, 12, 1, load_config(None, []).to_dict(), {})
    assert checkpoint.complete_steps(root) == [4, 12] and not partial.exists()
    assert checkpoint.read_meta(checkpoint.step_dir(root, 12))["step"] == 12
    saver.save(stage, 16, 1, load_config(None, []).to_dict(), {})
    assert checkpoint.complete_steps(root) == [12, 16]


def test_a_checkpoint_that_cannot_be_written_is_one_clear_error(tmp_path):
    blocker = tmp_path / "run" / "checkpoints"
    blocker.parent.mkdir()
    blocker.write_text("a file where the folder should be")
    saver = checkpoint.Checkpointer(tmp_path / "run", CheckpointConfig(), rank=0, distributed=False)
    with pytest.raises(CheckpointError, match=r"stage 0: cannot write checkpoint of step 3 .*last complete "
                                              r"checkpoint \(none\) is kept"):
        saver.save(stages_of(model(), [5])[0], 3, 1, load_config(None, []).to_dict(), {})


def test_metrics_on_resume_keep_the_lines_before_the_checkpoint(tmp_path):
    writer = MetricsWriter(tmp_path, 0)
    for step in range(6):
        writer.log({"step": step, "loss": 1.0})
    writer.log({"eval_step": 4, "test_accuracy": 0.5})
    writer.log({"eval_step": 6, "test_accuracy": 0.6})
    writer.file.write('{"step": 6, "lo')  # torn by a kill
    writer.close()
    writer = MetricsWriter(tmp_path, 0, resume_step=4)
    writer.log({"step": 4, "loss": 2.0})
    writer.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics/stage0.jsonl").read_text().splitlines()]
    assert [r.get("step", r.get("eval_step")) for r in lines] == [0, 1, 2, 3, 4, 4]
    assert lines[-1]["loss"] == 2.0


def test_a_non_finite_gradient_stops_or_is_skipped():
    stage = stages_of(model(), [5])[0]
    before = {n: p.detach().clone() for n, p in stage.module.named_parameters()}
    stage.module(torch.full((2, 4), float("nan"))).sum().backward()
    with pytest.raises(NonFinite, match=r"gradient \(norm nan\)"):
        stage.step()
    skipping = stages_of(model(), [5], on_nonfinite="skip")[0]
    lr_before = skipping.scheduler.last_epoch
    for i in range(MAX_SKIPPED_IN_A_ROW - 1):
        skipping.module(torch.full((2, 4), float("inf"))).sum().backward()
        assert skipping.step(source="synthetic gradient of boundary 0") is False
    assert skipping.skipped_updates == MAX_SKIPPED_IN_A_ROW - 1
    assert skipping.scheduler.last_epoch == lr_before + MAX_SKIPPED_IN_A_ROW - 1  # the LR schedule moves on
    assert all(p.grad is None for p in skipping.module.parameters())
    for n, p in skipping.module.named_parameters():
        assert torch.equal(p, before[n])  # nothing applied
    skipping.module(torch.ones(2, 4)).sum().backward()
    assert skipping.step() is True  # a finite update resets the count
    for _ in range(MAX_SKIPPED_IN_A_ROW - 1):
        skipping.module(torch.full((2, 4), float("nan"))).sum().backward()
        skipping.step()
    skipping.module(torch.full((2, 4), float("nan"))).sum().backward()
    with pytest.raises(NonFinite, match=f"synthetic gradient of boundary 0 .*{MAX_SKIPPED_IN_A_ROW} updates in a row"):
        skipping.step(source="synthetic gradient of boundary 0")


def test_resume_shorthand_and_checks():
    assert load_config(None, ["--resume"]).checkpoint.resume == "latest"
    assert load_config(None, ["--resume=40"]).checkpoint.resume == "40"
    with pytest.raises(Exception, match="checkpoint.every_minutes = 5.0 is checked at evaluations"):
        load_config(None, ["--checkpoint.every_minutes=5"])
    with pytest.raises(Exception, match="checkpoint.keep_last = -1"):
        load_config(None, ["--checkpoint.keep_last=-1"])


def test_time_based_checkpoints_come_at_evaluations(tmp_path):
    """checkpoint.every_minutes is checked where the ranks already agree on the clock: at an
    evaluation. With a tiny interval, every evaluation writes one; keep_last 0 keeps them all."""
    from pipedni.engine import Trainer
    from pipedni.runtime import Runtime

    cfg = load_config(None, [f"--run.dir={tmp_path}", "--data.name=synthetic", "--data.synthetic_size=256",
                             "--train.schedule=single", "--train.steps=7", "--train.eval_every=2",
                             "--checkpoint.every_minutes=0.00001", "--checkpoint.keep_last=0"])
    Trainer(cfg, Runtime(0, 1, 0, 1, torch.device("cpu"), "none")).fit()
    assert checkpoint.complete_steps(tmp_path / "checkpoints") == [2, 4, 6, 7]
    meta = checkpoint.read_meta(checkpoint.step_dir(tmp_path / "checkpoints", 7))
    assert meta["num_stages"] == 1 and meta["schedule"] == "single"


def test_tensorboard_gets_the_same_numbers_and_a_resume_purges_the_redone_steps(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pipedni.engine import Trainer
    from pipedni.runtime import Runtime

    args = [f"--run.dir={tmp_path}", "--data.name=synthetic", "--data.synthetic_size=256", "--train.steps=6",
            "--train.schedule=single", "--train.eval_every=3", "--run.tensorboard=true",
            "--checkpoint.every_steps=3", "--checkpoint.keep_last=0"]
    Trainer(load_config(None, args), Runtime(0, 1, 0, 1, torch.device("cpu"), "none")).fit()
    Trainer(load_config(None, [*args, "--resume=3"]), Runtime(0, 1, 0, 1, torch.device("cpu"), "none")).fit()
    events = EventAccumulator(str(tmp_path / "tensorboard/stage0"))
    events.Reload()
    losses = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [s for s, _ in losses] == list(range(1, 7))  # at steps done; steps 4-6 once, from the resumed run
    lines = [json.loads(x) for x in (tmp_path / "metrics/stage0.jsonl").read_text().splitlines()]
    assert [v for _, v in losses] == pytest.approx([r["loss"] for r in lines if "loss" in r])
    assert [e.step for e in events.Scalars("eval/test_accuracy")] == [3, 6]
    assert "time/step_sec" in events.Tags()["scalars"]
