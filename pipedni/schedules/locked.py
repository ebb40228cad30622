"""The locked schedules: single (the reference), naive, GPipe and 1F1B on pipedni's executor.

Every step's backward crosses every boundary before its update, so a locked run equals one
process parameter by parameter (tests/test_parity.py), clipping by the whole model's norm.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from pipedni.metrics.records import StepStats
from pipedni.schedules.actions import Plan
from pipedni.schedules.executor import LockedExecutor
from pipedni.schedules.spec import ScheduleSpec, WorkerContext
from pipedni.schedules.worker import Worker


class LockedWorker(Worker):
    """Runs one locked plan per step."""

    def __init__(self, ctx: WorkerContext, schedule: Union[str, Plan]):
        super().__init__(ctx)
        self.executor = LockedExecutor(ctx, schedule, ctx.cfg.train.microbatches)

    def train_step(self, step: int, inputs: Optional[torch.Tensor], targets: torch.Tensor) -> StepStats:
        return self.executor.run(step, inputs, targets)


def locked_schedule(name: str, doc: str, plan: Optional[Plan] = None, **kwargs) -> ScheduleSpec:
    """The spec of a locked schedule: ``plan`` (default: the plan of actions.PLANS by its name)
    run by the locked executor every step, in the engine and in the simulator alike."""
    steps = plan or name
    return ScheduleSpec(name, doc, build=lambda ctx: LockedWorker(ctx, steps), plan=steps, **kwargs)


SINGLE = locked_schedule("single", "the whole model in one process: the reference every locked schedule equals",
                         max_stages=1, sweeps_microbatches=False)
SPECS = (
    SINGLE,
    locked_schedule("naive", "model parallel: each microbatch's forward and backward cross the pipe in turn",
                    sweeps_microbatches=False),
    locked_schedule("gpipe", "GPipe: every microbatch forward, then every backward; one update per batch"),
    locked_schedule("1f1b", "1F1B: one forward, one backward in steady state; at most N - i microbatches held"),
)
