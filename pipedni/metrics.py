"""Per-step metrics (``metrics/stage<i>.jsonl``), per-stage totals and the run's ``summary.json``."""

from __future__ import annotations

import json
import os
import resource
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from pipedni.worker import StepStats


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated CUDA memory on a GPU stage; peak resident set size of the process on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


@dataclass
class StageTotals:
    """Sums over the timed training steps of one stage (the first step, a warm-up, is excluded);
    ``bytes_sent`` counts training messages only (no evaluation, probes or warm-up)."""

    stage_index: int
    num_params: int = 0
    steps: int = 0
    step_sec: float = 0.0
    compute_sec: float = 0.0
    wait_input_sec: float = 0.0
    wait_grad_sec: float = 0.0
    send_wait_sec: float = 0.0
    bytes_sent: int = 0
    peak_memory_bytes: int = 0
    peak_activation_bytes: Optional[int] = None  # run.activation_memory: see pipedni.memory
    peak_queued_messages: int = 0  # most messages waiting in one incoming mailbox at once
    # dni only (None elsewhere): moving averages (weight 0.05 per step) and extremes
    sg_loss: Optional[float] = None
    sg_cosine: Optional[float] = None
    mean_staleness: Optional[float] = None
    max_store_size: Optional[int] = None

    def add(self, stats: StepStats) -> None:
        self.steps += 1
        self.step_sec += stats.step_sec
        self.compute_sec += stats.compute_sec
        self.wait_input_sec += stats.wait_input_sec
        self.wait_grad_sec += stats.wait_grad_sec
        self.send_wait_sec += stats.send_wait_sec
        self.bytes_sent += stats.bytes_sent
        self.sg_loss = _ema(self.sg_loss, stats.sg_loss)
        self.sg_cosine = _ema(self.sg_cosine, stats.sg_cosine)
        self.mean_staleness = _ema(self.mean_staleness, stats.staleness)
        if stats.store_size is not None:
            self.max_store_size = max(self.max_store_size or 0, stats.store_size)

    def summary(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if v is not None}
        out["busy_fraction"] = self.compute_sec / self.step_sec if self.step_sec > 0 else 0.0
        out["bytes_sent_per_step"] = self.bytes_sent // max(1, self.steps)
        return out


def _ema(average: Optional[float], value: Optional[float], weight: float = 0.05) -> Optional[float]:
    if value is None:
        return average
    return value if average is None else (1 - weight) * average + weight * value


class MetricsWriter:
    """Appends one JSON object per line to ``metrics/stage<i>.jsonl``."""

    def __init__(self, run_dir: Path, stage_index: int):
        path = run_dir / "metrics" / f"stage{stage_index}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("w", buffering=1)  # line-buffered: a crashed stage keeps its last steps

    def log(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")

    def step(self, stats: StepStats, batch_size: int, lr: float, time_sec: float) -> None:
        record = asdict(stats)
        record["samples_per_sec"] = batch_size / stats.step_sec if stats.step_sec > 0 else 0.0
        record["lr"] = lr
        record["time_sec"] = time_sec
        record = {key: value for key, value in record.items() if value is not None}
        self.log(record)

    def close(self) -> None:
        self.file.close()


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def build_summary(cfg_schedule: str, num_stages: int, steps: int, batch_size: int, wall_time_sec: float,
                  train_sec: float, timed_steps: int, test: Optional[dict], stages: list[dict]) -> dict:
    """The stable ``summary.json`` contract (see docs/usage.md)."""
    return {
        "schedule": cfg_schedule,
        "num_stages": num_stages,
        "steps": steps,
        "batch_size": batch_size,
        "samples_per_sec": batch_size * timed_steps / train_sec if train_sec > 0 else 0.0,
        "wall_time_sec": wall_time_sec,
        "test_accuracy": None if test is None else test["accuracy"],
        "test_loss": None if test is None else test["loss"],
        "stages": stages,
    }
