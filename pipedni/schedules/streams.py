"""What each stage does, step after step, under a schedule: the action streams the simulator replays.

A stream is one list of ``SimAction`` per training step, then one for ``finish`` (the drain).
Locked schedules repeat ``stage_actions`` every step; decoupled ones come from
``decoupled_stream``, see [Note: the decoupled stream].

[Note: the decoupled stream]
``decoupled_stream`` mirrors ``BoundaryWorker.train_step`` (decoupled.py) with every
dni predictor trusted. At step t stage i, with delay d_i (``modes.delays``), runs for each
microbatch: RECV_F (not stage 0), F, SEND_F (not the last stage); on the last stage B and
SEND_B at once; across a dni boundary SG (the predictor), B and SEND_B at once. Then an update
(STEP) if it backpropagated at once, else the true backward of step s = t - d_i (RECV_B, B,
SEND_B per microbatch, tagged s) and its STEP. A dni stage's back-pressure is RECV_B of every
microbatch of step t - max_staleness: the engine waits exactly then for what has not arrived.
Its fits, which the engine makes on whatever gradient has arrived, are charged with the
prediction in SG (``StageCost.predictor_sec`` is predict + fit), so a stream never depends on
timing. ``finish`` holds the true backwards still owed and the gradients still unreceived.

An untrusted dni stage (``trusted=False``: its predictor not yet agreeing with the true
gradients, [Note: the untrusted fallback] in decoupled.py) backpropagates the true gradient
1 + d_{i+1} steps late, as an async stage would, fitting its predictor on each gradient as it
arrives (SG, between RECV_B and B: the fit's cosine decides trust); its own true backward is then
what waits for the gradient (no separate back-pressure).

The engine names its timed calls by these actions (``action_name``), so a run's measured
timeline and its stream can be compared call by call (tests/test_sim_engine.py).
"""

from __future__ import annotations

from typing import Iterator, NamedTuple, Sequence, Union

from pipedni.config.sections import DelayedConfig, DNIConfig
from pipedni.errors import ConfigError
from pipedni.schedules import registry
from pipedni.schedules.actions import ActionKind, Plan, action_name, stage_actions
from pipedni.schedules.modes import delays
from pipedni.schedules.spec import ScheduleSpec

DEFAULT_DELAY = DelayedConfig().delay
DEFAULT_MAX_STALENESS = DNIConfig().max_staleness


class SimAction(NamedTuple):
    """One thing a stage does: a kind of ``Action`` (plus SG: the dni predictor's call), the
    training step whose batch it works on (a delayed backward: an earlier one) and the microbatch."""

    kind: ActionKind
    step: int
    microbatch: int = -1  # -1: the whole batch

    def name(self, running_step: int) -> str:
        """As the timelines name it (``action_name``): ``F3``, ``STEP``; ``B3 (step 5)`` when of another step."""
        return action_name(self.kind, self.microbatch, self.step, running_step)


Stream = list[list[SimAction]]  # one list per training step, then the finish


def locked_stream(schedule: Union[str, Plan], stage: int, num_stages: int, num_microbatches: int, steps: int,
                  reduce_norm: bool = False) -> Stream:
    """``stage_actions`` of every step in turn (a locked step needs nothing from another step)."""
    plan = stage_actions(schedule, stage, num_stages, num_microbatches, reduce_norm)
    return [[SimAction(a.kind, t, a.microbatch) for a in plan] for t in range(steps)] + [[]]


def _forward(stage: int, num_stages: int, mode: str, step: int, mb: int, at_once: bool) -> list[SimAction]:
    """One microbatch's forward, and its backward where that runs at once."""
    last = stage == num_stages - 1
    acts = [] if stage == 0 else [SimAction(ActionKind.RECV_F, step, mb)]
    acts.append(SimAction(ActionKind.F, step, mb))
    if not last:
        acts.append(SimAction(ActionKind.SEND_F, step, mb))
    if mode == "dni" and at_once:
        acts.append(SimAction(ActionKind.SG, step, mb))
    if at_once:
        acts.append(SimAction(ActionKind.B, step, mb))
        acts += [SimAction(ActionKind.SEND_B, step, mb)] * (stage > 0)
    return acts


def _true_backward(stage: int, step: int, num_microbatches: int, fits: bool) -> list[SimAction]:
    """The backward of ``step`` from the true gradients (``fits``: the predictor fitted on each), then its update."""
    acts = []
    for mb in range(num_microbatches):
        kinds = [ActionKind.RECV_B] + [ActionKind.SG] * fits + [ActionKind.B] + [ActionKind.SEND_B] * (stage > 0)
        acts += [SimAction(kind, step, mb) for kind in kinds]
    return acts + [SimAction(ActionKind.STEP, step)]


def decoupled_stream(boundaries: Sequence[str], stage: int, num_microbatches: int, steps: int,
                     delay: int = DEFAULT_DELAY, max_staleness: int = DEFAULT_MAX_STALENESS,
                     trusted: bool = True) -> Iterator[list[SimAction]]:
    """Stage ``stage``'s actions under boundary modes ``boundaries`` (stage i -> i+1): one list per
    step, then the finish; ``trusted``: dni predictors trusted. See [Note: the decoupled stream]."""
    num_stages = len(boundaries) + 1
    mode = "locked" if stage == num_stages - 1 else boundaries[stage]
    all_d = delays(boundaries, delay)
    d = all_d[stage] if trusted or mode != "dni" else 1 + all_d[stage + 1]
    at_once = stage == num_stages - 1 or (mode == "dni" and trusted)
    waits = mode == "dni" and trusted  # back-pressure; untrusted, the true backward waits instead
    for t in range(steps):
        acts: list[SimAction] = []
        for mb in range(num_microbatches):
            acts += _forward(stage, num_stages, mode, t, mb, at_once)
        if at_once:
            acts.append(SimAction(ActionKind.STEP, t))
        elif t >= d:
            acts += _true_backward(stage, t - d, num_microbatches, mode == "dni")
        if waits and t >= max_staleness:
            acts += [SimAction(ActionKind.RECV_B, t - max_staleness, mb) for mb in range(num_microbatches)]
        yield acts
    owed = [] if at_once else range(max(0, steps - d), steps)
    unreceived = range(max(0, steps - max_staleness), steps) if waits else []
    yield ([a for s in owed for a in _true_backward(stage, s, num_microbatches, mode == "dni")]
           + [SimAction(ActionKind.RECV_B, s, mb) for s in unreceived for mb in range(num_microbatches)])


def simulated_modes() -> tuple[str, ...]:
    """What the simulator replays: every mode (a schedule or a variant: cdni's predictor sees the
    labels, which its profiled cost shows) of a multi-stage schedule with a plan or boundary modes."""
    return tuple(name for name, (spec, variant) in registry.MODES.items()
                 if variant.simulated and spec.max_stages is None and (spec.plan is not None or spec.decoupled))


def simulated(mode: str) -> ScheduleSpec:
    """The schedule of a mode the simulator replays."""
    if mode not in simulated_modes():
        raise ConfigError(f"schedule {mode!r} is not simulated; choose one of {', '.join(simulated_modes())}")
    return registry.mode(mode)[0]


def check_staleness(spec: ScheduleSpec, num_stages: int, boundaries: Sequence[str], delay: int,
                    max_staleness: int) -> None:
    """A dni boundary must wait as long as the stage after it returns gradients late (as ``check_mixed``)."""
    if not spec.decoupled:
        return
    modes = spec.boundary_modes(num_stages, boundaries)
    d = delays(modes, delay)
    for i, mode in enumerate(modes):
        if mode == "dni" and d[i + 1] > max_staleness:
            raise ConfigError(f"boundary {i} is dni but stage {i + 1} returns gradients {d[i + 1]} step(s) late; "
                              f"set max_staleness to {d[i + 1]} or more")


def effective_microbatches(mode: str, num_microbatches: int) -> int:
    """The microbatches a mode runs a batch in (the engine runs ``async`` on whole batches)."""
    return registry.mode(mode)[0].runs_microbatches(num_microbatches)


def pipeline_streams(mode: str, num_stages: int, num_microbatches: int, steps: int,
                     boundaries: Sequence[str] = (), delay: int = DEFAULT_DELAY,
                     max_staleness: int = DEFAULT_MAX_STALENESS, reduce_norm: bool = False,
                     trusted: bool = True) -> list[Stream]:
    """Every stage's stream for ``steps`` training steps under ``mode``."""
    spec = simulated(mode)
    m = spec.runs_microbatches(num_microbatches)
    if not spec.decoupled:
        return [locked_stream(spec.plan, i, num_stages, m, steps, reduce_norm) for i in range(num_stages)]
    modes = spec.boundary_modes(num_stages, boundaries)
    return [list(decoupled_stream(modes, i, m, steps, delay, max_staleness, trusted)) for i in range(num_stages)]
