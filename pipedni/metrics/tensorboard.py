"""``run.tensorboard``: the metrics lines also as TensorBoard scalars, one run per stage.

The JSONL files stay the stable contract (docs/outputs.md); this is for watching a long run
the way users already watch training: ``tensorboard --logdir <run.dir>/tensorboard``. Each
stage writes ``<run.dir>/tensorboard/stage<i>``, so the same tag of every stage shares one
chart (``time/step_sec`` of stage 0 beside stage 1's); the last stage adds the loss and the
evaluations. Numbers only: every numeric field of a metrics line becomes a scalar at the number of steps done.
Needs the ``tensorboard`` package (``pip install 'pipedni[tensorboard]'``), checked at start-up.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Optional

_GROUPS = {"loss": "train", "lr": "train", "grad_norm": "train", "samples_per_sec": "train",
           "test_accuracy": "eval", "test_loss": "eval"}
_SKIP = {"step", "eval_step", "time_sec", "samples", "train_sec"}


def available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def tag(key: str) -> str:
    """``train/loss``, ``eval/test_accuracy``, ``time/step_sec``, ``stage/<schedule's own>``."""
    if key in _GROUPS:
        return f"{_GROUPS[key]}/{key}"
    return f"time/{key}" if key.endswith("_sec") else f"stage/{key}"


class TensorBoardWriter:
    def __init__(self, run_dir: Path, stage_index: int, resume_step: Optional[int] = None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run hides what the interrupted one logged after its checkpoint
        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(str(run_dir / "tensorboard" / f"stage{stage_index}"), purge_step=purge)

    def log(self, record: dict) -> None:
        """A metrics line at the steps done: step t's record at t + 1, an evaluation after k
        steps at k (so the two share TensorBoard's x axis)."""
        step = record["step"] + 1 if "step" in record else record.get("eval_step")
        if step is None:
            return
        for key, value in record.items():
            if key not in _SKIP and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(tag(key), value, step)

    def close(self) -> None:
        self.writer.close()
