"""What each stage does, step after step, under a schedule: the action streams the simulator replays.

A stream is one list of ``SimAction`` per training step, then one for ``finish`` (the drain).
Locked schedules repeat ``stage_actions`` every step; decoupled ones come from
``decoupled_stream``, see [Note: the decoupled stream].

[Note: the decoupled stream]
``decoupled_stream`` is each step's ``steps.decoupled_step``, the actions ``BoundaryWorker``
executes, given what the engine would know if every dni predictor were trusted (or, with
``trusted=False``, none): stage i's delay d_i (``modes.delays``) makes step t's due backward
that of t - d_i, and a trusted dni stage waits on back-pressure for step t - max_staleness.
Its fits, which the engine makes on whatever gradient has arrived, are charged with the
prediction in SG (``StageCost.predictor_sec`` is predict + fit), so a stream never depends on
timing. ``finish`` holds the true backwards still owed and the gradients still unreceived.

An untrusted dni stage (``trusted=False``, [Note: the untrusted fallback] in decoupled.py)
backpropagates the true gradient 1 + d_{i+1} steps late, as an async stage would, fitting its
predictor on each gradient as it arrives (SG, between RECV_B and B: the fit's cosine decides
trust); its own true backward is then what waits for the gradient (no separate back-pressure).

The engine names its timed calls by these actions (``action_name``), so a run's measured
timeline and its stream can be compared call by call (tests/test_sim_engine.py).
"""

from __future__ import annotations

from typing import Iterator, Sequence, Union

from pipedni.config.sections import DelayedConfig, DNIConfig
from pipedni.errors import ConfigError
from pipedni.schedules import registry
from pipedni.schedules.actions import ActionKind, Plan, stage_actions
from pipedni.schedules.modes import delays
from pipedni.schedules.spec import ScheduleSpec
from pipedni.schedules.steps import Due, SimAction, decoupled_finish, decoupled_step

DEFAULT_DELAY = DelayedConfig().delay
DEFAULT_MAX_STALENESS = DNIConfig().max_staleness


Stream = list[list[SimAction]]  # one list per training step, then the finish


def locked_stream(schedule: Union[str, Plan], stage: int, num_stages: int, num_microbatches: int, steps: int,
                  reduce_norm: bool = False) -> Stream:
    """``stage_actions`` of every step in turn (a locked step needs nothing from another step)."""
    plan = stage_actions(schedule, stage, num_stages, num_microbatches, reduce_norm)
    return [[SimAction(a.kind, t, a.microbatch) for a in plan] for t in range(steps)] + [[]]


def decoupled_stream(boundaries: Sequence[str], stage: int, num_microbatches: int, steps: int,
                     delay: int = DEFAULT_DELAY, max_staleness: int = DEFAULT_MAX_STALENESS,
                     trusted: bool = True, recompute: bool = False) -> Iterator[list[SimAction]]:
    """Stage ``stage``'s actions under boundary modes ``boundaries`` (stage i -> i+1): one list per
    step, then the finish; ``trusted``: dni predictors trusted; ``recompute``: a delayed backward
    recomputes its forward (``delayed.weight_stashing: false``). See [Note: the decoupled stream]."""
    num_stages = len(boundaries) + 1
    mode = "locked" if stage == num_stages - 1 else boundaries[stage]
    all_d = delays(boundaries, delay)
    d = all_d[stage] if trusted or mode != "dni" else 1 + all_d[stage + 1]
    at_once = stage == num_stages - 1 or (mode == "dni" and trusted)
    waits = mode == "dni" and trusted  # back-pressure; untrusted, the true backward waits instead
    predicts = mode == "dni"
    for t in range(steps):
        due = [Due(t - d, recompute and d > 0)] if not at_once and t >= d else []
        waits_for = t - max_staleness if waits and t >= max_staleness else None
        work, wait = decoupled_step(stage, num_stages, t, num_microbatches, at_once, predicts, due, waits_for)
        yield work + wait
    owed = [] if at_once else [Due(s, recompute and d > 0) for s in range(max(0, steps - d), steps)]
    unreceived = range(max(0, steps - max_staleness), steps) if waits else []
    yield (decoupled_finish(stage, num_microbatches, owed, predicts)
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
                     trusted: bool = True, recompute: bool = False) -> list[Stream]:
    """Every stage's stream for ``steps`` training steps under ``mode``."""
    spec = simulated(mode)
    m = spec.runs_microbatches(num_microbatches)
    if not spec.decoupled:
        return [locked_stream(spec.plan, i, num_stages, m, steps, reduce_norm) for i in range(num_stages)]
    modes = spec.boundary_modes(num_stages, boundaries)
    return [list(decoupled_stream(modes, i, m, steps, delay, max_staleness, trusted, recompute))
            for i in range(num_stages)]
