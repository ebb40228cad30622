"""What to run: benchmark modes expanded into jobs (a label, a process count, config overrides)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from pipedni.config import Config
from pipedni.errors import ConfigError, LaunchError
from pipedni.schedules import registry
from pipedni.schedules.modes import MODES as BOUNDARY_MODES, BoundaryMode
from pipedni.schedules.spec import ScheduleSpec, Variant

# The modes the bench runs are the registry's (each schedule, or its variants: cdni, unlock).
MODES = registry.MODES
DEFAULT_MODES = [name for name, (_, variant) in MODES.items() if variant.default]
# Locked pipelines (the modes every time to target is compared with): locked and multi-process.
LOCKED_PIPELINES = tuple(name for name, (spec, _) in MODES.items() if spec.locked and spec.max_stages is None)
BASELINE = f"{registry.REFERENCE} 1 thread"  # the job every speed-up is quoted against


@dataclass(frozen=True)
class Job:
    """One benchmarked configuration; ``label`` names it in every table and file."""

    label: str
    mode: str
    schedule: str
    nproc: int
    threads: int
    microbatches: int
    overrides: tuple[str, ...] = field(default=())
    replicas: int = 1  # dist.data_parallel: the job starts nproc x replicas processes

    @property
    def processes(self) -> int:
        return self.nproc * self.replicas

    def args(self, *extra: str) -> list[str]:
        """Config overrides for this job (``extra`` last: they win)."""
        return [f"--train.schedule={self.schedule}", f"--run.threads={self.threads}", *self.overrides, *extra]


def parse_modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ConfigError(f"--modes {text!r}: unknown {', '.join(unknown) or '(none given)'}; "
                          f"choose from {','.join(MODES)}")
    return modes


def parse_counts(text: str, what: str) -> list[int]:
    try:
        counts = sorted({int(c) for c in text.split(",") if c.strip()})
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise ConfigError(f"{what} {text!r}: give positive whole numbers separated by commas, e.g. 1,2,4,8")
    return counts


def parse_boundaries(text: str, modes: list[str], num_stages: int) -> list[str]:
    """``--boundaries locked,dni,...``: one mode per boundary, required by (and only by) the modes
    whose schedule reads ``train.boundaries`` (``mixed``)."""
    boundaries = [b.strip() for b in text.split(",") if b.strip()]
    readers = [name for name, (spec, _) in MODES.items() if spec.reads_boundaries]
    if not set(readers) & set(modes):
        if boundaries:
            raise ConfigError(f"--boundaries {text!r} is read only by the {' or '.join(readers)} mode; add "
                              f"{readers[0]} to --modes")
        return []
    if len(boundaries) != num_stages - 1 or any(b not in BOUNDARY_MODES for b in boundaries):
        raise ConfigError(f"--boundaries {text!r}: the {readers[0]} mode needs {num_stages - 1} of "
                          f"{', '.join(BOUNDARY_MODES)} for --stages {num_stages}, e.g. "
                          f"{','.join(([BoundaryMode.LOCKED, BoundaryMode.DNI] * num_stages)[:num_stages - 1])}")
    return boundaries


def _microbatch_args(spec: ScheduleSpec, variant: Variant, m: int) -> tuple[str, ...]:
    return (f"--{spec.microbatch_key}={m}", *variant.overrides)


def _runs(spec: ScheduleSpec, num_stages: int, m: int, batch_size: int, replicas: int) -> bool:
    """Whether the schedule's own layout checks accept ``m`` microbatches (torch's need equal
    microbatches, and Schedule1F1B at least one per stage)."""
    cfg = Config()
    cfg.train.schedule, cfg.train.microbatches, cfg.data.batch_size = spec.name, m, batch_size
    cfg.dist.data_parallel = replicas
    if spec.reads_boundaries:
        cfg.train.boundaries = [BoundaryMode.LOCKED.value] * (num_stages - 1)  # the count is what the layout checks
    try:
        registry.check_layout(cfg, num_stages)
    except (ConfigError, LaunchError):
        return False
    return True


def plan_jobs(modes: list[str], num_stages: int, microbatches: list[int], batch_size: int,
              boundaries: tuple[str, ...] = (), replicas: int = 1) -> list[Job]:
    """Every job of the throughput sweep, in a fixed order. Microbatch counts a schedule cannot
    run (torch's: uneven microbatches, or 1F1B with M < N) are left out, not failed. ``mixed``
    runs with ``boundaries`` (see ``parse_boundaries``). With ``replicas`` (dist.data_parallel)
    every job is that many copies, each on its share of ``batch_size``."""
    cores = os.cpu_count() or 1
    jobs: list[Job] = []
    for mode in modes:
        spec, variant = MODES[mode]
        if spec.max_stages == 1:  # the reference: one process, on one thread and on every core
            jobs.append(Job(BASELINE, mode, spec.name, 1, 1, 1, variant.overrides, replicas))
            if cores > 1:
                jobs.append(Job(f"{mode} {cores} threads", mode, spec.name, 1, cores, 1, variant.overrides, replicas))
        elif not spec.sweeps_microbatches:
            jobs.append(Job(mode, mode, spec.name, num_stages, 1, 1, ("--train.microbatches=1", *variant.overrides),
                            replicas))
        else:
            for m in microbatches:
                if m > batch_size // replicas or not _runs(spec, num_stages, m, batch_size, replicas):
                    continue
                extra = (f"--train.boundaries=[{','.join(boundaries)}]",) if spec.reads_boundaries else ()
                jobs.append(Job(f"{mode} M={m}", mode, spec.name, num_stages, 1, m,
                                _microbatch_args(spec, variant, m) + extra, replicas))
    return jobs
