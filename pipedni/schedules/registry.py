"""Every schedule pipedni runs, by its ``train.schedule`` name, and the checks they all share.

A schedule is one ``ScheduleSpec`` in its own module; this list is the only place that names
them all. Nothing else in pipedni tests a schedule's name.
"""

from __future__ import annotations

from pipedni.config import Config
from pipedni.errors import ConfigError, LaunchError
from pipedni.schedules import decoupled, dni, locked, peer
from pipedni.schedules.modes import MODES as BOUNDARY_MODES
from pipedni.schedules.spec import ScheduleSpec, Variant

SCHEDULES: dict[str, ScheduleSpec] = {
    spec.name: spec for spec in (*locked.SPECS, dni.SPEC, *decoupled.SPECS, *peer.SPECS)
}
REFERENCE = locked.SINGLE.name  # the whole model in one process: what runs without torchrun
# The modes the bench runs and the simulator replays, by name: each schedule's variants, or itself.
MODES: dict[str, tuple[ScheduleSpec, Variant]] = {
    variant.name: (spec, variant) for spec in SCHEDULES.values() for variant in spec.modes()
}


def get(name: str) -> ScheduleSpec:
    if name not in SCHEDULES:
        raise ConfigError(f"train.schedule = {name!r} is not a schedule; choose one of {', '.join(map(repr, SCHEDULES))}")
    return SCHEDULES[name]


def register(spec: ScheduleSpec) -> ScheduleSpec:
    """Add a schedule defined outside pipedni (see "Adding a schedule" in docs/design.md): from
    then on ``train.schedule: <its name>`` runs it, and the bench and the simulator offer its
    modes. Every process registers it before its config is checked: a script run with
    ``pipedni.fit`` (under torchrun) registers it at import."""
    taken = [name for name in (spec.name, *(v.name for v in spec.modes())) if name in SCHEDULES or name in MODES]
    if taken:
        raise ConfigError(f"schedule {spec.name!r}: the name {taken[0]!r} is taken; choose another")
    SCHEDULES[spec.name] = spec
    MODES.update({variant.name: (spec, variant) for variant in spec.modes()})
    return spec


def mode(name: str) -> tuple[ScheduleSpec, Variant]:
    """A bench or simulator mode's schedule and settings."""
    if name not in MODES:
        raise ConfigError(f"mode {name!r} is not a schedule or a variant of one; choose one of {', '.join(MODES)}")
    return MODES[name]


def check_config(cfg: Config) -> ScheduleSpec:
    """What the config asks of its schedule, before any stage starts: a schedule that exists, and
    the settings only some schedules read (``train.boundaries``, ``dni.synthetic_inputs``) set
    only where they are read. Returns the schedule."""
    spec = get(cfg.train.schedule)
    modes = cfg.train.boundaries
    for i, boundary in enumerate(modes):
        if boundary not in BOUNDARY_MODES:
            raise ConfigError(f"train.boundaries[{i}] = {boundary!r} is not a boundary mode; use one of "
                              f"{', '.join(BOUNDARY_MODES)}")
    readers = [s.name for s in SCHEDULES.values() if s.reads_boundaries]
    if modes and not spec.reads_boundaries:
        raise ConfigError(f"train.boundaries = {modes} is read only by train.schedule: {' or '.join(readers)} (it is "
                          f"{spec.name!r}); set --train.schedule={readers[0]} or remove train.boundaries")
    d = cfg.dni
    inputs_predicted = d.synthetic_inputs or any(entry.get("synthetic_inputs") for entry in d.boundaries)
    if inputs_predicted and not spec.synthetic_gradients:
        dni_schedules = [s.name for s in SCHEDULES.values() if s.synthetic_gradients]
        raise ConfigError(f"dni.synthetic_inputs is set but train.schedule = {spec.name!r} has no dni boundary to skip "
                          f"the wait across; use --train.schedule={dni_schedules[0]} (or "
                          f"{' or '.join(dni_schedules[1:])} with a dni boundary), or drop dni.synthetic_inputs")
    if cfg.dist.data_parallel > 1 and inputs_predicted:  # see [Note: averaging over replicas] in pipedni/replicas.py
        raise ConfigError(f"dist.data_parallel = {cfg.dist.data_parallel} replicas must make their updates at the same "
                          "steps, and with dni.synthetic_inputs a stage's updates depend on when its true input "
                          "arrives, which differs between replicas; drop dni.synthetic_inputs or use "
                          "--dist.data_parallel=1")
    if cfg.train.precision == "fp16" and not spec.locked:  # see [Note: mixed precision] in pipedni/precision.py
        locked = [s.name for s in SCHEDULES.values() if s.locked and s.name != REFERENCE]
        raise ConfigError(f"train.precision = 'fp16' needs a loss scale that every stage moves alike at a step they "
                          f"share, and train.schedule = {spec.name!r} shares none; use --train.precision=bf16 (no "
                          f"scale needed) or a locked schedule ({', '.join(locked)})")
    return spec


def resolve(name: str, num_stages: int) -> ScheduleSpec:
    """The schedule that runs: a locked schedule on one stage is the reference itself."""
    spec = get(name)
    return SCHEDULES[REFERENCE] if spec.locked and num_stages == 1 else spec


def check_layout(cfg: Config, num_stages: int) -> ScheduleSpec:
    """One process per stage: the schedule must fit the world size. Returns the schedule to run."""
    name = cfg.train.schedule
    spec = check_config(cfg)
    if num_stages < spec.min_stages:
        raise LaunchError(f"train.schedule = {name!r} needs at least {spec.min_stages} stages (processes); "
                          "start more with torchrun")
    if spec.max_stages is not None and num_stages > spec.max_stages:
        pipelined = ", ".join(s.name for s in SCHEDULES.values() if s.max_stages is None)
        raise LaunchError(
            f"train.schedule = {name!r} runs the whole model in {spec.max_stages} process but {num_stages} were "
            f"started; use --nproc_per_node={spec.max_stages}, plain python, or a pipelined schedule ({pipelined})"
        )
    spec.check(cfg, num_stages)
    return resolve(name, num_stages)
