"""Every schedule pipedni runs, by its ``train.schedule`` name, and the checks they all share.

A schedule is one ``ScheduleSpec`` in its own module; this list is the only place that names
them all. Nothing else in pipedni tests a schedule's name.
"""

from __future__ import annotations

from pipedni.config import Config
from pipedni.dni import worker as dni
from pipedni.errors import ConfigError, LaunchError
from pipedni.schedules import boundaries, locked, peer
from pipedni.schedules.spec import ScheduleSpec

SCHEDULES: dict[str, ScheduleSpec] = {
    spec.name: spec for spec in (*locked.SPECS, dni.SPEC, *boundaries.SPECS, *peer.SPECS)
}
REFERENCE = locked.SINGLE.name  # the whole model in one process: what runs without torchrun


def get(name: str) -> ScheduleSpec:
    if name not in SCHEDULES:
        raise ConfigError(f"train.schedule = {name!r} is not a schedule; choose one of {', '.join(map(repr, SCHEDULES))}")
    return SCHEDULES[name]


def resolve(name: str, num_stages: int) -> ScheduleSpec:
    """The schedule that runs: a locked schedule on one stage is the reference itself."""
    spec = get(name)
    return SCHEDULES[REFERENCE] if spec.locked and num_stages == 1 else spec


def check_layout(cfg: Config, num_stages: int) -> ScheduleSpec:
    """One process per stage: the schedule must fit the world size. Returns the schedule to run."""
    name = cfg.train.schedule
    spec = get(name)
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
