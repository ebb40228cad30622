"""A schedule's registry entry: what it needs, what it checks, what it reports, how it is built."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Union

from pipedni.boundary import Spec, StageShapes
from pipedni.config import Config
from pipedni.metrics.records import MetricSpec
from pipedni.stage import Stage
from pipedni.transport import NullTransport, Transport

if TYPE_CHECKING:
    from pipedni.schedules.worker import Worker


@dataclass(frozen=True)
class WorkerContext:
    """Everything a worker is built with: it needs nothing later to be whole."""

    stage: Stage
    transport: Union[Transport, NullTransport]
    shapes: StageShapes  # what this stage receives and sends (from the start-up probe)
    cfg: Config
    num_classes: int
    labels_shape: tuple[int, ...]  # one sample's labels: () for a classifier, (T,) per position
    network_input: Spec  # one sample of the network's input, or its inputs (synthetic inputs predict from one)


def no_checks(cfg: Config, num_stages: int) -> None:
    """A schedule that runs on every layout its stage count allows."""


def no_predictors(cfg: Config, num_stages: int) -> tuple[int, ...]:
    """A schedule without synthetic-gradient predictors."""
    return ()


def no_weight_copies(cfg: Config) -> int:
    """A schedule whose stages never copy their weights."""
    return 0


@dataclass(frozen=True)
class ScheduleSpec:
    """One schedule. Adding a schedule is a module defining one of these plus a registry line."""

    name: str  # the value of train.schedule
    doc: str  # one line for the config reference and the error listing the choices
    build: Callable[[WorkerContext], "Worker"]
    min_stages: int = 1
    max_stages: Optional[int] = None
    locked: bool = True  # equals `single` parameter by parameter; on one stage it runs as `single`
    check: Callable[[Config, int], None] = no_checks  # layout checks: raise LaunchError with the fix
    metrics: tuple[MetricSpec, ...] = ()  # its own per-step figures (StepStats.extra)
    # What its stages pay beyond their layers (partition.method: time counts it): the boundaries
    # with a synthetic-gradient predictor, and how many copies of their weights stages make a step.
    predictor_boundaries: Callable[[Config, int], tuple[int, ...]] = no_predictors
    copies_weights: Callable[[Config], int] = no_weight_copies
    wait_grad_header: str = "wait grad s"  # what wait_grad_sec means under it, in the console
