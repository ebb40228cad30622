"""The rules of a pipeline of boundary modes (``locked``, ``dni``, ``async``): each stage's delay
and the untrusted fallback's, and what a layout and a stage's boundaries must satisfy before a
``BoundaryWorker`` (decoupled.py) runs them."""

from __future__ import annotations

from enum import Enum
from typing import Sequence

from pipedni.config import Config
from pipedni.crossing import describe_spec
from pipedni.errors import LaunchError, PartitionError
from pipedni.schedules.spec import WorkerContext

class BoundaryMode(str, Enum):
    """How stage i learns from stage i+1 (see decoupled.py); equal to its name."""

    LOCKED = "locked"
    DNI = "dni"
    ASYNC = "async"

    def __str__(self) -> str:
        return self.value


MODES = tuple(mode.value for mode in BoundaryMode)


def every_boundary(mode: BoundaryMode):
    """The boundary modes of a schedule whose every boundary learns one way."""
    def modes(num_stages: int, boundaries: Sequence[str] = ()) -> tuple[str, ...]:
        return (mode.value,) * (num_stages - 1)

    return modes


def listed_modes(num_stages: int, boundaries: Sequence[str] = ()) -> tuple[str, ...]:
    """``mixed``'s boundary modes: ``train.boundaries`` itself, one known mode per boundary."""
    if len(boundaries) != num_stages - 1 or any(m not in MODES for m in boundaries):
        raise LaunchError(f"train.boundaries = {list(boundaries)} has {len(boundaries)} entries but {num_stages} "
                          f"stages have {num_stages - 1} boundaries; give one mode ({', '.join(MODES)}) per "
                          "boundary stage i -> i+1")
    return tuple(boundaries)


def delays(boundaries: Sequence[str], delay: int) -> list[int]:
    """Each stage's delay d_i, in steps, for boundary modes ``boundaries`` (stage i -> i+1)."""
    d = [0]
    for mode in reversed(boundaries):
        d.append({"locked": d[-1], "async": d[-1] + delay, "dni": 0}[mode])
    return d[::-1]


def fallback_delay(boundaries: Sequence[str], i: int, d: Sequence[int], fallback: str) -> int:
    """Steps after its forward that dni stage ``i`` updates from the true gradient while its
    predictor is untrusted: 1 + d_{i+1} (0: frozen instead). See [Note: the untrusted fallback]."""
    possible = i == 0 or boundaries[i - 1] == "dni"
    return 1 + d[i + 1] if fallback == "delayed" and possible else 0


def check_synthetic_inputs(cfg: Config, modes: Sequence[str]) -> None:
    """A stage predicts its input only across a dni boundary, and updates at once after it: it
    is the last stage or its own boundary is dni too."""
    for i, mode in enumerate(modes):
        if not cfg.dni.for_boundary(i).synthetic_inputs:
            continue
        where = f"dni.synthetic_inputs on boundary {i} (stage {i} -> {i + 1})"
        if mode != "dni":
            raise LaunchError(f"{where}: the boundary is {mode}, but stage {i + 1} may skip the wait for its input "
                              f"only across a dni boundary; make train.boundaries[{i}] dni or set "
                              f"dni.boundaries[{i}].synthetic_inputs=false")
        if i + 1 < len(modes) and modes[i + 1] != "dni":
            raise LaunchError(f"{where}: stage {i + 1} trains on a predicted input only if it updates at once, but "
                              f"its own boundary is {modes[i + 1]}; make train.boundaries[{i + 1}] dni or set "
                              f"dni.boundaries[{i}].synthetic_inputs=false")


def check_mixed(cfg: Config, num_stages: int) -> None:
    """The boundary list fits the stages, and every dni boundary can wait as long as it must."""
    modes = list(listed_modes(num_stages, cfg.train.boundaries))
    check_synthetic_inputs(cfg, modes)
    d = delays(modes, cfg.delayed.delay)
    for i, mode in enumerate(modes):
        where = f"train.boundaries[{i}] = dni (stage {i} -> {i + 1})"
        late = fallback_delay(modes, i, d, cfg.dni.for_boundary(i).fallback) if mode == "dni" else 0
        if i > 0 and late > cfg.dni.max_staleness:
            raise LaunchError(f"{where}: while its predictor is untrusted stage {i} sends stage {i - 1} its gradients "
                              f"{late} steps late (dni.fallback: delayed), but dni.max_staleness = "
                              f"{cfg.dni.max_staleness}; set --dni.max_staleness={late} or more, or "
                              f"dni.boundaries[{i}].fallback: frozen")
        if mode != "dni" or d[i + 1] == 0:
            continue
        late = f"stage {i + 1} returns gradients {d[i + 1]} step(s) late (async boundaries after it)"
        staleness = cfg.dni.max_staleness
        if staleness < d[i + 1]:
            raise LaunchError(f"{where}: {late}, but dni.max_staleness = {staleness}; "
                              f"set --dni.max_staleness={d[i + 1]} or more")
        if cfg.dni.for_boundary(i).warmup_steps > 0:
            raise LaunchError(f"{where}: {late}, so it cannot warm up locked (dni.warmup_steps = "
                              f"{cfg.dni.for_boundary(i).warmup_steps}); set its warmup_steps to 0 or make "
                              "the boundaries after it locked or dni")
    in_flight = (max(d[i] - d[i + 1] for i in range(num_stages - 1)) + 1) * cfg.train.microbatches
    if in_flight + 1 > cfg.dist.queue_size:
        raise LaunchError(f"train.boundaries = {modes} keeps up to {in_flight} messages in flight per direction, "
                          f"more than dist.queue_size = {cfg.dist.queue_size} holds; raise dist.queue_size to "
                          f"at least {in_flight + 1}")


def check_decoupled(ctx: WorkerContext, boundaries: Sequence[str]) -> None:
    """A boundary of several tensors (a split model's: see [Note: what crosses a boundary] in
    split/stages.py) can be decoupled when some of its tensors need a gradient: a dni boundary
    predicts each one's (see ``SyntheticGradientEnd``), an async one delays them all; masks, ids and
    other tensors without one travel alongside. Synthetic inputs predict one tensor from one
    network input, so they need a bare one of each."""
    stage, i = ctx.stage, ctx.stage.stage_index
    for side, spec, mode in (("receives", ctx.shapes.input, boundaries[i - 1] if i > 0 else "locked"),
                             ("sends", ctx.shapes.output, boundaries[i] if not stage.is_last else "locked")):
        if mode != "locked" and isinstance(spec, tuple) and not any(s.requires_grad for s in spec):
            raise PartitionError(
                f"train.schedule = {ctx.cfg.train.schedule!r}: stage {i} {side} {len(spec)} tensor(s) across a {mode} "
                f"boundary, none of them needing a gradient, {describe_spec(spec)}: there is nothing to learn "
                "across it; move model.split_points to where the model's computation crosses")
    before = ctx.cfg.dni.for_boundary(i - 1) if i > 0 and boundaries[i - 1] == "dni" else None
    if before is not None and before.synthetic_inputs and isinstance(ctx.shapes.input, tuple):
        raise PartitionError(
            f"dni.synthetic_inputs: stage {i} receives {len(ctx.shapes.input)} tensors, "
            f"{describe_spec(ctx.shapes.input)}, but a synthetic input predicts one; turn synthetic inputs off "
            "or cut where one tensor crosses")
    if before is not None and before.synthetic_inputs and isinstance(ctx.network_input, tuple):
        raise PartitionError(
            f"dni.synthetic_inputs: stage {i} would predict its input from the network's, but the data gives "
            f"{len(ctx.network_input)} inputs, {describe_spec(ctx.network_input)}, and an input model reads one; "
            "turn synthetic inputs off")
