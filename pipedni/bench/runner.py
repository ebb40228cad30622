"""Launching one benchmark job as a real torchrun job, and reading back what it measured.

A job is ``python -m pipedni.launch`` (or plain ``python -m pipedni.train`` for one process)
with the job's overrides; its outputs are the run's own contract (``metrics/stage<i>.jsonl``,
``summary.json``), so the benchmark measures exactly what users run.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Optional

from pipedni.bench.plan import LOCKED_PIPELINES, Job
from pipedni.errors import LaunchError


class JobFailed(LaunchError):
    """A job exited non-zero; carries its exit code (2: the config or data is wrong)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def command(job: Job, config: str, run_dir: Path, extra: list[str]) -> list[str]:
    args = [config, *job.args(*extra, f"--run.dir={run_dir}")]
    if job.processes == 1:
        return [sys.executable, "-m", "pipedni.train", *args]
    return [sys.executable, "-m", "pipedni.launch", f"--nproc_per_node={job.processes}", *args]


def run_job(job: Job, config: str, run_dir: Path, extra: list[str], timeout: float) -> Path:
    """Run ``job`` to completion; raise JobFailed with its last error line otherwise."""
    env = dict(os.environ, OMP_NUM_THREADS=str(job.threads), PYTHONUNBUFFERED="1")
    cmd = command(job, config, run_dir, extra)
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise JobFailed(f"job {job.label!r} did not finish within {timeout:.0f}s: {' '.join(cmd)}", 1) from None
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()] or ["(no output)"]
        errors = [line for line in lines if "error" in line.lower()]
        last = (errors or lines)[-1].strip()
        raise JobFailed(f"job {job.label!r} failed (exit {proc.returncode}): {last}", proc.returncode)
    (run_dir / "stdout.txt").write_text(proc.stdout)
    return run_dir


def read_steps(run_dir: Path, stage_index: int) -> list[dict]:
    path = run_dir / "metrics" / f"stage{stage_index}.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if "step" in r]


def measure(run_dir: Path, num_stages: int, batch_size: int, warmup_steps: int) -> dict:
    """Throughput over the steps after ``warmup_steps``, and per-stage figures over the same steps.

    Samples/s is wall-clock at the last stage, from the end of the last warm-up step to the end
    of the run's last step (bookkeeping between steps included): every batch passes through the
    last stage, so in steady state its rate is the pipeline's, for locked and decoupled alike.
    """
    summary = json.loads((run_dir / "summary.json").read_text())
    stages = []
    for i in range(num_stages):
        records = read_steps(run_dir, i)
        timed = records[warmup_steps:]
        if warmup_steps < 1 or len(timed) < 2:
            raise LaunchError(f"{run_dir}: stage {i} ran {len(records)} steps; need at least "
                              f"{warmup_steps + 2} for {warmup_steps} warm-up steps (give more --steps)")
        seconds = sum(r["step_sec"] for r in timed)
        per_stage = summary["stages"][i]
        stages.append({
            "busy_fraction": sum(r["compute_sec"] for r in timed) / seconds,
            "wait_input_sec_per_step": sum(r["wait_input_sec"] for r in timed) / len(timed),
            "wait_grad_sec_per_step": sum(r["wait_grad_sec"] for r in timed) / len(timed),
            "bytes_sent_per_step": sum(r["bytes_sent"] for r in timed) / len(timed),
            "peak_activation_bytes": per_stage.get("peak_activation_bytes"),
            "peak_memory_bytes": per_stage.get("peak_memory_bytes"),
            "samples_per_sec": batch_size * (len(timed) - 1) / (timed[-1]["time_sec"] - timed[0]["time_sec"]),
        })
    return {"samples_per_sec": stages[-1]["samples_per_sec"], "stages": stages}


def read_curve(run_dir: Path, num_stages: int) -> list[dict]:
    """The accuracy-vs-time curve: one point per evaluation (training seconds, samples, accuracy)."""
    path = run_dir / "metrics" / f"stage{num_stages - 1}.jsonl"
    return [{"train_sec": r["train_sec"], "samples": r["samples"], "accuracy": r["test_accuracy"]}
            for r in map(json.loads, path.read_text().splitlines()) if "eval_step" in r]


def time_to_target(curve: list[dict], target: float) -> Optional[float]:
    return next((point["train_sec"] for point in curve if point["accuracy"] >= target), None)


def curves_of(entry: dict) -> list[list[dict]]:
    """Every run's curve of one time-to-accuracy job (results.json before repeats held one)."""
    return [c for c in entry.get("curves", [entry.get("curve", [])]) if c]


def median_time(times: list[Optional[float]]) -> Optional[float]:
    """The (lower) median over runs, a run that never reached the target counting as the
    slowest: None if more than half of them did not."""
    ordered = sorted(math.inf if t is None else t for t in times)
    middle = ordered[(len(ordered) - 1) // 2] if ordered else math.inf  # the lower median: no averaging with inf
    return None if math.isinf(middle) else middle


def set_target(results: dict, target: Optional[float] = None) -> None:
    """Set the target accuracy (given, or the default below) and each job's time to reach it:
    per run, and their median.

    Default: the lowest median final accuracy of any locked pipeline (naive, gpipe, 1f1b,
    torch_*) at the end of the budget, so every locked pipeline reaches it in most runs and their
    times compare; a decoupled mode either gets there too, and its time compares with theirs, or
    it does not.
    """
    finals = {e["label"]: statistics.median(c[-1]["accuracy"] for c in curves_of(e))
              for e in results["accuracy"] if curves_of(e)}
    if target is None and finals:
        locked = [finals[e["label"]] for e in results["accuracy"] if e["mode"] in LOCKED_PIPELINES
                  and e["label"] in finals]
        target = math.floor(min(locked or [0.95 * max(finals.values())]) * 1000) / 1000
    results["target_accuracy"] = target
    for entry in results["accuracy"]:
        times = [] if target is None else [time_to_target(c, target) for c in curves_of(entry)]
        entry["time_to_target_runs"] = times
        entry["time_to_target_sec"] = median_time(times) if times else None


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}
