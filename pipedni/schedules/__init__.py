"""Schedules: locked plans as data (actions), their executor, the worker contract every schedule
keeps, the boundary-mode schedules async and mixed (boundaries), the peer (torch's own schedules) and the registry of them
all (``registry.SCHEDULES``)."""

from pipedni.schedules.actions import (
    LOCKED_PLANS,
    Action,
    DeadlockError,
    format_grid,
    pipeline_actions,
    simulate,
    stage_actions,
    with_fits,
)

__all__ = ["LOCKED_PLANS", "Action", "DeadlockError", "format_grid", "pipeline_actions", "simulate",
           "stage_actions", "with_fits"]
