"""Where metrics go: per-step lines (``metrics/stage<i>.jsonl``) and the run's ``summary.json``."""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path
from typing import Optional

import torch

from pipedni.metrics.records import StepStats


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated CUDA memory on a GPU stage; peak resident set size of the process on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class MetricsWriter:
    """Appends one JSON object per line to ``metrics/stage<i>.jsonl`` (and, with
    ``tensorboard``, the same numbers to TensorBoard: metrics/tensorboard.py)."""

    def __init__(self, run_dir: Path, stage_index: int, resume_step: Optional[int] = None,
                 tensorboard: bool = False):
        """A fresh file; resuming at ``resume_step``, the earlier run's lines up to that step are
        kept (those it wrote after its checkpoint are dropped, since the steps run again) and
        new lines are appended."""
        path = run_dir / "metrics" / f"stage{stage_index}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines() if _before(line, resume_step)]
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)
        mode = "a" if resume_step is not None else "w"
        self.file = path.open(mode, buffering=1)  # line-buffered: a crashed stage keeps its last steps
        self.board = None
        if tensorboard:
            from pipedni.metrics.tensorboard import TensorBoardWriter

            self.board = TensorBoardWriter(run_dir, stage_index, resume_step)

    def log(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        if self.board is not None:
            self.board.log(record)

    def step(self, stats: StepStats, batch_size: int, lr: float, time_sec: float) -> None:
        record = stats.record()
        record["samples_per_sec"] = batch_size / stats.step_sec if stats.step_sec > 0 else 0.0
        record["lr"] = lr
        record["time_sec"] = time_sec
        self.log(record)

    def close(self) -> None:
        self.file.close()
        if self.board is not None:
            self.board.close()


def _before(line: str, resume_step: int) -> bool:
    """Whether a JSONL line belongs to the steps before ``resume_step`` (a torn last line does not)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return False
    if "eval_step" in record:
        return record["eval_step"] <= resume_step
    return record.get("step", resume_step) < resume_step


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def build_summary(cfg_schedule: str, num_stages: int, steps: int, batch_size: int, wall_time_sec: float,
                  train_sec: float, timed_steps: int, test: Optional[dict], stages: list[dict],
                  precision: str = "fp32", data_parallel: int = 1) -> dict:
    """The stable ``summary.json`` contract (see docs/outputs.md)."""
    return {
        "schedule": cfg_schedule,
        "num_stages": num_stages,
        "steps": steps,
        "batch_size": batch_size,
        "precision": precision,
        "data_parallel": data_parallel,
        "samples_per_sec": batch_size * timed_steps / train_sec if train_sec > 0 else 0.0,
        "wall_time_sec": wall_time_sec,
        "test_accuracy": None if test is None else test["accuracy"],
        "test_loss": None if test is None else test["loss"],
        "stages": stages,
    }
