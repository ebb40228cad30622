"""A decoupled step as data: the actions one stage runs in one step of ``async``, ``dni`` or
``mixed``, which ``BoundaryWorker`` executes (decoupled.py) and the simulator's streams replay
(streams.py), as the locked plans of actions.py are run by the executor and replayed alike.

At step t stage i runs, for each microbatch: RECV_F (not stage 0), F, SEND_F (not the last
stage); where it backpropagates at once (the last stage; a trusted dni stage, or an untrusted
one with ``dni.fallback: frozen``) also SG (a dni stage's predictor), B and SEND_B (not stage
0), and then its update STEP. Then the true backward of every step now due (RECV_B, F when its
forward is replayed on the current weights, SG where a predictor fits the arrived gradient, B,
SEND_B per microbatch, tagged with that step) and its STEP. What the step is given (whether it
runs at once, which steps are due, whether it waits on back-pressure) is the worker's state:
the engine passes what it has, the simulator what it assumes (every predictor trusted, or
every one not). A dni stage's back-pressure, the ``waits``, is RECV_B of every microbatch of
step t - max_staleness, after its fits of whatever has arrived (which the engine makes without
waiting and the simulator charges with SG).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

from pipedni.schedules.actions import ActionKind, action_name


class SimAction(NamedTuple):
    """One thing a stage does: a kind of ``Action`` (plus SG: the dni predictor's call), the
    training step whose batch it works on (a delayed backward: an earlier one) and the microbatch."""

    kind: ActionKind
    step: int
    microbatch: int = -1  # -1: the whole batch

    def name(self, running_step: int) -> str:
        """As the timelines name it (``action_name``): ``F3``, ``STEP``; ``B3 (step 5)`` when of another step."""
        return action_name(self.kind, self.microbatch, self.step, running_step)


class Due(NamedTuple):
    """A step whose true backward runs now, and whether its forward is replayed first."""

    step: int
    replay: bool = False


def forward(stage: int, num_stages: int, step: int, mb: int, at_once: bool, predicts: bool) -> list[SimAction]:
    """One microbatch's forward, and its backward where that runs at once (``predicts``: from a
    dni predictor's synthetic gradient)."""
    kinds = [ActionKind.RECV_F] * (stage > 0) + [ActionKind.F] + [ActionKind.SEND_F] * (stage < num_stages - 1)
    if at_once:
        kinds += [ActionKind.SG] * predicts + [ActionKind.B] + [ActionKind.SEND_B] * (stage > 0)
    return [SimAction(kind, step, mb) for kind in kinds]


def true_backward(stage: int, due: Due, num_microbatches: int, fits: bool) -> list[SimAction]:
    """The backward of ``due.step`` from the true gradients (``fits``: a predictor fitted on each), then its update."""
    kinds = ([ActionKind.RECV_B] + [ActionKind.F] * due.replay + [ActionKind.SG] * fits + [ActionKind.B]
             + [ActionKind.SEND_B] * (stage > 0))
    acts = [SimAction(kind, due.step, mb) for mb in range(num_microbatches) for kind in kinds]
    return acts + [SimAction(ActionKind.STEP, due.step)]


def decoupled_step(stage: int, num_stages: int, step: int, num_microbatches: int, at_once: bool,
                   predicts: bool, due: Sequence[Due], waits_for: Optional[int]) -> tuple[list[SimAction], list[SimAction]]:
    """Stage ``stage``'s actions in ``step``: its work (forwards, the update at once, the true
    backwards of ``due``), and its back-pressure waits on step ``waits_for`` (None: none). A
    predictor fits the true gradients of ``due`` where ``predicts`` (a dni stage)."""
    work = [a for mb in range(num_microbatches) for a in forward(stage, num_stages, step, mb, at_once, predicts)]
    if at_once:
        work.append(SimAction(ActionKind.STEP, step))
    for owed in due:
        work += true_backward(stage, owed, num_microbatches, predicts)
    waits = [] if waits_for is None else [SimAction(ActionKind.RECV_B, waits_for, mb) for mb in range(num_microbatches)]
    return work, waits


def decoupled_finish(stage: int, num_microbatches: int, owed: Sequence[Due], predicts: bool) -> list[SimAction]:
    """The true backwards still owed when training ends, in step order (the drain's fits of what a
    dni stage still stores follow them)."""
    return [a for due in owed for a in true_backward(stage, due, num_microbatches, predicts)]
