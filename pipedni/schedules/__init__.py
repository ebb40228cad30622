"""Schedules: every schedule pipedni runs, by name (``registry``), and what they share: locked
plans as data (``actions``) and their executor, the worker contract, the boundary-mode schedules
``async`` and ``mixed`` (``decoupled``, with ``modes``), ``dni`` and a stage's ends of a dni
boundary, the peer (torch's own schedules), and the action streams the simulator replays."""

from pipedni.schedules.actions import (
    LOCKED_PLANS,
    Action,
    ActionKind,
    DeadlockError,
    Plan,
    backward_actions,
    format_grid,
    forward_actions,
    pipeline_actions,
    simulate,
    stage_actions,
    with_fits,
)

__all__ = ["LOCKED_PLANS", "Action", "ActionKind", "DeadlockError", "Plan", "backward_actions", "format_grid",
           "forward_actions", "pipeline_actions", "simulate", "stage_actions", "with_fits"]
