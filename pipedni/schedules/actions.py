"""Locked pipeline schedules as data: per-stage action lists from pure functions.

An action is ``F3`` (forward microbatch 3), ``B3`` (backward), ``RECV_F3`` / ``SEND_F3``
(activation in / out), ``RECV_B3`` / ``SEND_B3`` (gradient in / out), ``FIT3`` (fit a
synthetic-gradient predictor on microbatch 3's arrived gradient: DNI's warm-up),
``REDUCE_TIED`` (sum the gradients of a weight tied across stages over the stages that hold it,
so every copy takes the same update), ``ALL_REDUCE`` (sum the gradients' squared norm over every
stage, for clipping by the whole model's norm: a barrier of the whole pipe) or ``STEP``
(optimizer). One executor
(``pipedni.schedules.executor``) runs any list; ``simulate`` checks a set of lists for
completeness and deadlock without processes and ``format_grid`` prints the tick x stage grid:

    1f1b, N=3, M=4
    tick     0   1   2   3   4   5   6   7   8   9   10  11
    stage 0  F0  F1  F2  .   .   B0  F3  B1  .   B2  .   B3
    stage 1  .   F0  F1  .   B0  F2  B1  F3  B2  .   B3  .
    stage 2  .   .   F0  B0  F1  B1  F2  B2  F3  B3  .   .
"""

from __future__ import annotations

from enum import Enum
from typing import Callable, NamedTuple, Union


class ActionKind(str, Enum):
    """What a stage does; equal to (and formatted as) its name, the timelines' prefix."""

    RECV_F = "RECV_F"  # take an activation from the previous stage
    F = "F"  # forward
    SEND_F = "SEND_F"  # hand the output to the next stage
    SG = "SG"  # a dni predictor's call: predict a synthetic gradient, or fit one (the simulator's streams)
    RECV_B = "RECV_B"  # take a gradient from the next stage
    FIT = "FIT"  # fit a predictor on an arrived gradient before the backward uses it (DNI's warm-up)
    B = "B"  # backward
    SEND_B = "SEND_B"  # hand the input's gradient to the previous stage
    REDUCE_TIED = "REDUCE_TIED"  # sum a tied weight's gradients over its holders
    ALL_REDUCE = "ALL_REDUCE"  # sum the squared gradient norm over every stage (clipping)
    STEP = "STEP"  # optimizer

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class Action(NamedTuple):
    kind: ActionKind
    microbatch: int = -1  # -1: the whole batch (REDUCE_TIED, ALL_REDUCE, STEP)

    def __str__(self) -> str:
        return action_name(self.kind, self.microbatch)


def action_name(kind: Union[ActionKind, str], microbatch: int = -1, step: int = 0, running_step: int = 0) -> str:
    """How the timelines name an action, measured and simulated alike: ``F3``, ``STEP``; ``B3 (step 5)``
    when it works on another step's batch than the one running (a delayed backward)."""
    base = kind if microbatch < 0 else f"{kind}{microbatch}"
    return base if step == running_step else f"{base} (step {step})"


def forward_actions(stage: int, num_stages: int, m: int) -> list[Action]:
    """Microbatch ``m``'s forward on ``stage``: receive its input, run, send its output."""
    acts = [] if stage == 0 else [Action(ActionKind.RECV_F, m)]
    acts.append(Action(ActionKind.F, m))
    return acts if stage == num_stages - 1 else acts + [Action(ActionKind.SEND_F, m)]


def backward_actions(stage: int, num_stages: int, m: int) -> list[Action]:
    """Microbatch ``m``'s backward on ``stage``: receive its output's gradient, run, send its input's."""
    acts = [] if stage == num_stages - 1 else [Action(ActionKind.RECV_B, m)]
    acts.append(Action(ActionKind.B, m))
    return acts if stage == 0 else acts + [Action(ActionKind.SEND_B, m)]


# A locked plan: (stage, N, M) -> the stage's forwards and backwards of one batch, in order.
Plan = Callable[[int, int, int], list[Action]]


def naive_plan(stage: int, n: int, m: int) -> list[Action]:
    return [a for mb in range(m) for a in forward_actions(stage, n, mb) + backward_actions(stage, n, mb)]


def gpipe_plan(stage: int, n: int, m: int) -> list[Action]:
    return ([a for mb in range(m) for a in forward_actions(stage, n, mb)]
            + [a for mb in range(m) for a in backward_actions(stage, n, mb)])


def one_f_one_b_plan(stage: int, n: int, m: int) -> list[Action]:
    warmup = min(n - 1 - stage, m)
    acts = [a for mb in range(warmup) for a in forward_actions(stage, n, mb)]
    for k in range(m - warmup):
        acts += forward_actions(stage, n, warmup + k) + backward_actions(stage, n, k)
    return acts + [a for mb in range(m - warmup, m) for a in backward_actions(stage, n, mb)]


PLANS: dict[str, Plan] = {"single": naive_plan, "naive": naive_plan, "gpipe": gpipe_plan, "1f1b": one_f_one_b_plan}
LOCKED_PLANS = tuple(PLANS)


def stage_actions(schedule: Union[str, Plan], stage: int, num_stages: int, num_microbatches: int,
                  reduce_norm: bool = False, reduce_tied: bool = False) -> list[Action]:
    """The ordered actions of ``stage`` for one training step (one batch) under ``schedule`` (a
    name of ``PLANS``, or a plan); with ``reduce_norm`` an ``ALL_REDUCE`` of the gradient norm
    precedes the ``STEP``, with ``reduce_tied`` (the stage holds a tied weight) a ``REDUCE_TIED``
    precedes both."""
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage {stage} out of range for {num_stages} stages")
    n, m = num_stages, num_microbatches
    if schedule == "single":
        if n != 1:
            raise ValueError(f"schedule 'single' runs one process, got {n} stages")
        n, m = 1, 1
    plan = schedule if callable(schedule) else PLANS.get(schedule)
    if plan is None:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(LOCKED_PLANS)}")
    acts = plan(stage, n, m)
    ends = [ActionKind.REDUCE_TIED] * reduce_tied + [ActionKind.ALL_REDUCE] * reduce_norm + [ActionKind.STEP]
    return acts + [Action(kind) for kind in ends]


def with_fits(plan: list[Action]) -> list[Action]:
    """``plan`` with a ``FIT`` after each gradient it receives, before the backward uses it."""
    out: list[Action] = []
    for action in plan:
        out.append(action)
        if action.kind == ActionKind.RECV_B:
            out.append(Action(ActionKind.FIT, action.microbatch))
    return out


def pipeline_actions(schedule: str, num_stages: int, num_microbatches: int,
                     reduce_norm: bool = False) -> list[list[Action]]:
    return [stage_actions(schedule, s, num_stages, num_microbatches, reduce_norm) for s in range(num_stages)]


class DeadlockError(RuntimeError):
    pass


def simulate(plans: list[list[Action]]) -> list[list[str]]:
    """Run the plans with unit-time compute and instant messages; return the tick x stage grid.

    Raises DeadlockError if no stage can move while some still have actions, or if a message is
    received that was never sent, sent twice, or left unreceived at the end.
    """
    n = len(plans)
    pos = [0] * n
    sent: dict[tuple[str, int, int], int] = {}  # (kind, dst, mb) -> tick it becomes available
    received: set[tuple[str, int, int]] = set()
    reduced = [0] * n  # ALL_REDUCEs each stage has passed
    grid: list[list[str]] = [[] for _ in range(n)]
    tick = 0
    while any(pos[s] < len(plans[s]) for s in range(n)):
        moved = False
        for s in range(n):
            did_compute = False
            while pos[s] < len(plans[s]):
                act = plans[s][pos[s]]
                if act.kind in (ActionKind.F, ActionKind.B):
                    if did_compute:
                        break
                    did_compute = True
                    grid[s].append(str(act))
                elif act.kind in (ActionKind.STEP, ActionKind.FIT, ActionKind.REDUCE_TIED):
                    pass  # REDUCE_TIED waits only for holders past their last message: it cannot block one
                elif act.kind == ActionKind.ALL_REDUCE:  # a collective: every stage must have reached its own
                    if not _all_reached(plans, pos, reduced, reduced[s]):
                        break
                    reduced[s] += 1
                elif act.kind.startswith("SEND"):
                    dst = s + 1 if act.kind == ActionKind.SEND_F else s - 1
                    key = (act.kind[-1], dst, act.microbatch)
                    if key in sent or not 0 <= dst < n:
                        raise DeadlockError(f"stage {s}: {act} is sent twice or to no stage")
                    sent[key] = tick + 1  # available after the producing compute finishes
                else:  # RECV_*
                    key = (act.kind[-1], s, act.microbatch)
                    if sent.get(key, tick + 1) > tick:
                        break
                    received.add(key)
                pos[s] += 1
                moved = True
            if not did_compute:
                grid[s].append(".")
        if not moved:
            stuck = ", ".join(f"stage {s} at {plans[s][pos[s]]}" for s in range(n) if pos[s] < len(plans[s]))
            raise DeadlockError(f"deadlock at tick {tick}: {stuck}")
        tick += 1
    if set(sent) != received:
        raise DeadlockError(f"messages sent but never received: {sorted(set(sent) - received)}")
    width = max(len(row) for row in grid)
    while width and all(len(row) >= width and row[width - 1] == "." for row in grid):
        width -= 1
    return [(row + ["."] * width)[:width] for row in grid]


def _all_reached(plans: list[list[Action]], pos: list[int], reduced: list[int], index: int) -> bool:
    """Whether every stage has passed, or stands at, its ``index``-th ALL_REDUCE."""
    return all(reduced[t] > index or (reduced[t] == index and pos[t] < len(plan)
                                      and plan[pos[t]].kind == ActionKind.ALL_REDUCE)
               for t, plan in enumerate(plans))


def format_grid(schedule: str, num_stages: int, num_microbatches: int) -> str:
    """The step x stage timeline of ``schedule`` as text (unit-time compute, instant messages)."""
    grid = simulate(pipeline_actions(schedule, num_stages, num_microbatches))
    width = len(grid[0])
    lines = [f"{schedule}, N={num_stages}, M={num_microbatches}",
             "tick".ljust(9) + "".join(f"{t:<4d}" for t in range(width)).rstrip()]
    for s, row in enumerate(grid):
        lines.append(f"stage {s}".ljust(9) + "".join(f"{a:<4s}" for a in row).rstrip())
    return "\n".join(lines)
