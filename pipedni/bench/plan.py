"""What to run: benchmark modes expanded into jobs (a label, a process count, config overrides)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from pipedni.config import Config
from pipedni.errors import ConfigError, LaunchError
from pipedni.schedules import registry

# A mode name -> (train.schedule, swept over microbatch counts?)
MODES = {
    "single": ("single", False),  # two jobs: 1 thread, and every core
    "naive": ("naive", False),
    "gpipe": ("gpipe", True),
    "1f1b": ("1f1b", True),
    "torch_gpipe": ("torch_gpipe", True),
    "torch_1f1b": ("torch_1f1b", True),
    "dni": ("dni", True),  # swept over dni.microbatches: see [Note: DNI microbatches]
    "cdni": ("dni", True),  # dni conditioned on labels
    "async": ("async", False),  # delayed true gradients; whole batches
    "mixed": ("mixed", True),  # each boundary its own mode: needs --boundaries
    "unlock": ("dni", True),  # cdni plus synthetic inputs (forward unlocking), at their defaults
}
DEFAULT_MODES = [mode for mode in MODES if mode not in ("mixed", "unlock")]
# Locked pipelines (the modes every time to target is compared with): locked and multi-process.
LOCKED_PIPELINES = tuple(mode for mode, (schedule, _) in MODES.items()
                         if registry.get(schedule).locked and registry.get(schedule).max_stages is None)
BASELINE = "single 1 thread"  # the job every speed-up is quoted against


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
    """``--boundaries locked,dni,...``: one mode per boundary, required by (and only by) ``mixed``."""
    from pipedni.schedules.boundary_rules import MODES as BOUNDARY_MODES

    boundaries = [b.strip() for b in text.split(",") if b.strip()]
    if "mixed" not in modes:
        if boundaries:
            raise ConfigError(f"--boundaries {text!r} is read only by the mixed mode; add mixed to --modes")
        return []
    if len(boundaries) != num_stages - 1 or any(b not in BOUNDARY_MODES for b in boundaries):
        raise ConfigError(f"--boundaries {text!r}: the mixed mode needs {num_stages - 1} of "
                          f"{', '.join(BOUNDARY_MODES)} for --stages {num_stages}, e.g. "
                          f"{','.join((['locked', 'dni'] * num_stages)[:num_stages - 1])}")
    return boundaries


def _microbatch_args(mode: str, m: int) -> tuple[str, ...]:
    if mode in ("dni", "cdni", "unlock"):
        return (f"--dni.microbatches={m}", f"--dni.condition_on_labels={'false' if mode == 'dni' else 'true'}",
                f"--dni.synthetic_inputs={'true' if mode == 'unlock' else 'false'}")
    return (f"--train.microbatches={m}",)


def _runs(schedule: str, num_stages: int, m: int, batch_size: int) -> bool:
    """Whether the schedule's own layout checks accept ``m`` microbatches (torch's need equal
    microbatches, and Schedule1F1B at least one per stage)."""
    cfg = Config()
    cfg.train.schedule, cfg.train.microbatches, cfg.data.batch_size = schedule, m, batch_size
    if schedule == "mixed":
        cfg.train.boundaries = ["locked"] * (num_stages - 1)  # the count is what the layout checks
    try:
        registry.check_layout(cfg, num_stages)
    except (ConfigError, LaunchError):
        return False
    return True


def plan_jobs(modes: list[str], num_stages: int, microbatches: list[int], batch_size: int,
              boundaries: tuple[str, ...] = ()) -> list[Job]:
    """Every job of the throughput sweep, in a fixed order. Microbatch counts a schedule cannot
    run (torch's: uneven microbatches, or 1F1B with M < N) are left out, not failed. ``mixed``
    runs with ``boundaries`` (see ``parse_boundaries``)."""
    cores = os.cpu_count() or 1
    jobs: list[Job] = []
    for mode in modes:
        schedule, swept = MODES[mode]
        if mode == "single":
            jobs.append(Job(BASELINE, mode, schedule, 1, 1, 1))
            if cores > 1:
                jobs.append(Job(f"single {cores} threads", mode, schedule, 1, cores, 1))
        elif not swept:
            jobs.append(Job(mode, mode, schedule, num_stages, 1, 1, ("--train.microbatches=1",)))
        else:
            for m in microbatches:
                if m > batch_size or not _runs(schedule, num_stages, m, batch_size):
                    continue
                extra = (f"--train.boundaries=[{','.join(boundaries)}]",) if mode == "mixed" else ()
                jobs.append(Job(f"{mode} M={m}", mode, schedule, num_stages, 1, m, _microbatch_args(mode, m) + extra))
    return jobs
