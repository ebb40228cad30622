"""The locked schedules: single (the reference), naive, GPipe and 1F1B on pipedni's executor.

Every step's backward crosses every boundary before its update, so a locked run equals one
process parameter by parameter (tests/test_parity.py), clipping by the whole model's norm.
"""

from __future__ import annotations

from typing import Optional

import torch

from pipedni.metrics.records import StepStats
from pipedni.schedules.executor import LockedExecutor
from pipedni.schedules.spec import ScheduleSpec, WorkerContext
from pipedni.schedules.worker import Worker


class LockedWorker(Worker):
    """Runs one locked plan per step."""

    def __init__(self, ctx: WorkerContext, schedule: str):
        super().__init__(ctx)
        self.executor = LockedExecutor(ctx, schedule, ctx.cfg.train.microbatches)

    def train_step(self, step: int, inputs: Optional[torch.Tensor], targets: torch.Tensor) -> StepStats:
        return self.executor.run(step, inputs, targets)


def _spec(name: str, doc: str, **kwargs) -> ScheduleSpec:
    return ScheduleSpec(name, doc, build=lambda ctx: LockedWorker(ctx, name), plan=name, **kwargs)


SINGLE = _spec("single", "the whole model in one process: the reference every locked schedule equals",
               max_stages=1, sweeps_microbatches=False)
SPECS = (
    SINGLE,
    _spec("naive", "model parallel: each microbatch's forward and backward cross the pipe in turn",
          sweeps_microbatches=False),
    _spec("gpipe", "GPipe: every microbatch forward, then every backward; one update per batch"),
    _spec("1f1b", "1F1B: one forward, one backward in steady state; at most N - i microbatches held"),
)
