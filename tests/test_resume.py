"""Long runs in real processes: resume equals not stopping, resume under another split, a
diverged run stops with one line, and a stage killed with SIGKILL under --max-restarts is
restarted from the last checkpoint and finishes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipedni import checkpoint
from pipedni.config import load_config
from pipedni.engine import Trainer
from pipedni.export import merge_checkpoints
from pipedni.runtime import Runtime
from helpers import free_port, run_distributed

REPO = Path(__file__).resolve().parent.parent
STEPS = 12
# (schedule, whether a resumed run must equal the uninterrupted one bit for bit)
CASES = [("1f1b", True), ("gpipe", True), ("async", True), ("dni", False)]


def make_config(run_dir: Path, schedule: str, *extra: str):
    return load_config(None, [
        f"--run.dir={run_dir}", "--run.log_every=1000", "--data.name=synthetic", "--data.synthetic_size=512",
        "--data.batch_size=32", "--model.depth=3", "--model.width=32", f"--train.schedule={schedule}",
        f"--train.steps={STEPS}", "--train.microbatches=2", "--checkpoint.every_steps=4", "--checkpoint.keep_last=0",
        "--optim.name=adam", "--optim.lr=0.01", "--partition.method=parameters", "--dni.kind=linear",
        "--dni.condition_on_labels=true", *extra])


def folder(run_dir: Path, step: int) -> Path:
    return checkpoint.step_dir(run_dir / "checkpoints", step)


def _runs(rank: int, world_size: int, root: str, cases: list, resume_from_four: str) -> list:
    """Each case run through, then again resumed from its own step-4 checkpoint; with
    ``resume_from_four``, also 1f1b resumed from that 4-stage run's step 4."""
    runtime = Runtime(rank, world_size, rank, world_size, torch.device("cpu"), "gloo")
    root, restored = Path(root), []
    jobs = [(root / schedule, schedule, ()) for schedule, _ in cases]
    jobs += [(root / f"{schedule}-resumed", schedule, (f"--resume={folder(root / schedule, 4)}",)) for schedule, _ in cases]
    if resume_from_four:
        jobs.append((root / "from4", "1f1b", (f"--resume={resume_from_four}",)))
    for run_dir, schedule, extra in jobs:
        trainer = Trainer(make_config(run_dir, schedule, *extra), runtime)
        if schedule == "dni" and extra and not trainer.runtime.is_last:  # the predictor came back with the stage
            saved = torch.load(folder(root / "dni", 4) / f"stage{rank}.pt", weights_only=False)["synthetic_gradient"]
            now = trainer.worker.gradients.state_dict()
            restored.append(saved["agreement"] == now["agreement"] and all(
                torch.equal(saved["model"][k], v) for k, v in now["model"].items()))
        trainer.fit()
        trainer.close()
    return restored


def assert_equal_states(a: Path, b: Path, exact: bool, label: str) -> None:
    ma, mb = merge_checkpoints(a), merge_checkpoints(b)
    assert ma.keys() == mb.keys(), label
    for name in ma:
        if exact:
            assert torch.equal(ma[name], mb[name]), f"{label}: {name} differs"
        else:
            torch.testing.assert_close(ma[name], mb[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{label} {name}: {m}")


def test_resume_equals_not_stopping_under_any_split(tmp_path):
    """Locked schedules and async resume bit for bit; a 4-stage checkpoint resumes under 2
    stages and a 2-stage one in one process, equal to the uninterrupted run up to float noise."""
    run_distributed(_runs, 4, str(tmp_path / "four"), [("1f1b", True)], "", timeout=180)
    restored = run_distributed(_runs, 2, str(tmp_path), CASES, str(folder(tmp_path / "four/1f1b", 4)), timeout=300)
    for schedule, exact in CASES:
        run_dir = tmp_path / schedule
        assert checkpoint.complete_steps(run_dir / "checkpoints") == [4, 8, 12]
        resumed = tmp_path / f"{schedule}-resumed"
        steps = [json.loads(x)["step"] for x in (resumed / "metrics/stage0.jsonl").read_text().splitlines()]
        assert steps == list(range(4, STEPS)), schedule  # only the steps after the checkpoint ran
        if exact:
            assert_equal_states(run_dir, resumed, True, schedule)
            for stage in range(2):
                a = torch.load(folder(run_dir, 12) / f"stage{stage}.pt", weights_only=False)["optimizer_by_name"]
                b = torch.load(folder(resumed, 12) / f"stage{stage}.pt", weights_only=False)["optimizer_by_name"]
                for name in a["state"]:
                    assert torch.equal(a["state"][name]["exp_avg_sq"], b["state"][name]["exp_avg_sq"]), name
    assert restored[0] == [True]  # dni: stage 0's predictor, its optimizer and its agreement came back
    assert_equal_states(tmp_path / "four/1f1b", tmp_path / "from4", False, "4 -> 2 stages")
    single = make_config(tmp_path / "single", "single", f"--resume={folder(tmp_path / '1f1b', 4)}")
    Trainer(single, Runtime(0, 1, 0, 1, torch.device("cpu"), "none")).fit()
    assert_equal_states(tmp_path / "1f1b", tmp_path / "single", False, "2 -> 1 stage")


def launch(args: list[str], timeout: float = 240, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "pipedni.launch", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def stage_pids(run_dir: Path, rank: int) -> list[int]:
    """Processes of pipedni.train for ``run_dir`` with RANK=``rank``."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            env = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if b"pipedni.train" in cmd and any(str(run_dir).encode() in c for c in cmd) and f"RANK={rank}".encode() in env:
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow
def test_a_killed_stage_restarts_from_the_last_checkpoint_and_finishes(tmp_path):
    """kill -9 of stage 1 mid-run under --max-restarts=1: torchrun restarts both stages, they
    resume from the latest checkpoint by themselves, and the run ends with every step done."""
    run_dir, steps = tmp_path / "run", 3000
    proc = launch(["--max-restarts=1", "-n", "2", "configs/mlp_fashion.yaml", "--data.name=synthetic",
                   f"--run.dir={run_dir}", f"--train.steps={steps}", "--checkpoint.every_steps=100",
                   "--model.width=128", "--data.batch_size=64", "--run.log_every=100000"])
    root, deadline, killed_after = run_dir / "checkpoints", time.monotonic() + 180, None
    try:
        while killed_after is None and time.monotonic() < deadline and proc.poll() is None:
            done = checkpoint.complete_steps(root)
            pids = stage_pids(run_dir, 1)
            if done and pids:
                os.kill(pids[0], signal.SIGKILL)
                killed_after = done[-1]
            time.sleep(0.05)
        out, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert killed_after is not None, "the run ended before a checkpoint to kill after"
    assert proc.returncode == 0, err[-3000:]
    assert "resuming from" in out and "at step" in out, out[-2000:]
    resumed_at = int(out.split("at step ")[1].split()[0])
    assert killed_after <= resumed_at < steps  # no progress lost beyond the interval
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == steps
    logged = [json.loads(x)["step"] for x in (run_dir / "metrics/stage1.jsonl").read_text().splitlines()
              if '"step"' in x]
    assert logged == list(range(steps))  # the steps after the checkpoint were redone once, not logged twice


@pytest.mark.slow
def test_divergence_stops_the_run_with_one_line(tmp_path):
    """The issue's lr 1e12: a nan loss used to train on, write summary.json and exit 0."""
    proc = launch(["-n", "2", "configs/mlp_fashion.yaml", "--data.name=synthetic", f"--run.dir={tmp_path}",
                   "--train.steps=50", "--optim.lr=1e12", "--checkpoint.every_steps=1"])
    _, err = proc.communicate(timeout=120)
    lines = [x for x in err.splitlines() if x.strip()]
    assert proc.returncode == 1 and len(lines) == 1, err
    assert "training diverged: non-finite" in lines[0] and "at step" in lines[0] and "on_nonfinite=skip" in lines[0]
    assert "checkpoint of step" in lines[0]
    assert not (tmp_path / "summary.json").exists()
    kept = checkpoint.find(tmp_path / "checkpoints", "latest")
    merged = merge_checkpoints(tmp_path)
    assert all(torch.isfinite(t).all() for t in merged.values()), kept  # the last good one
    # skipping instead: every update after the first is non-finite, so the run still stops, later
    proc = launch(["-n", "2", "configs/mlp_fashion.yaml", "--data.name=synthetic", f"--run.dir={tmp_path}/skip",
                   "--train.steps=50", "--optim.lr=1e12", "--train.on_nonfinite=skip"])
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert "a non-finite update was skipped" in out and "10 updates in a row skipped" in err


def test_torchrun_summary_carries_the_message(tmp_path):
    """Plain torchrun's failure summary showed "To enable traceback see ..." for every
    one-line error; it now shows the error itself."""
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                           "-m", "pipedni.train", "configs/mlp_fashion.yaml", f"--run.dir={blocked}/run"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "To enable traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.count("cannot be written") >= 2, proc.stderr[-2000:]  # the line, and the summary's
