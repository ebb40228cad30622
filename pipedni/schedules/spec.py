"""A schedule's registry entry: what it needs, what it checks, what it reports, how it is built."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Sequence, Union

from pipedni.config import Config
from pipedni.crossing import Spec, StageShapes
from pipedni.metrics.records import MetricSpec
from pipedni.stage import Stage
from pipedni.transport import NullTransport, Transport

if TYPE_CHECKING:
    from pipedni.schedules.actions import Plan
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
class Variant:
    """A named way to run a schedule that the bench and the simulator offer as a mode of its own
    (``cdni``: dni whose predictors see the labels): its settings, as command-line overrides."""

    name: str
    overrides: tuple[str, ...] = ()
    default: bool = True  # among the bench's default modes
    simulated: bool = True  # the simulator replays it (its streams have no synthetic inputs)


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
    # How a batch is cut: the setting its microbatch count comes from (None: whole batches), and
    # whether the bench sweeps that count.
    microbatch_key: Optional[str] = "train.microbatches"
    sweeps_microbatches: bool = True
    # What the simulator replays: a locked plan of schedules/actions.py, or each boundary's mode
    # (stage i -> i+1; from train.boundaries where the schedule reads them) for a decoupled one.
    plan: Optional[Union[str, "Plan"]] = None  # a name of actions.PLANS, or a plan of its own
    boundary_modes: Optional[Callable[[int, Sequence[str]], tuple[str, ...]]] = None
    reads_boundaries: bool = False  # train.boundaries is its setting
    synthetic_gradients: bool = False  # may have dni boundaries (dni.synthetic_inputs needs one)
    variants: tuple[Variant, ...] = ()  # its bench/simulator modes (none: one, by its name)

    @property
    def decoupled(self) -> bool:
        return self.boundary_modes is not None

    def microbatches(self, cfg: Config) -> int:
        """The microbatches a batch runs in under this schedule."""
        if self.microbatch_key is None:
            return 1
        section, key = self.microbatch_key.split(".")
        return getattr(getattr(cfg, section), key)

    def runs_microbatches(self, m: int) -> int:
        """What ``m`` microbatches asked of the simulator become (whole batches: 1)."""
        return 1 if self.microbatch_key is None else m

    def modes(self) -> tuple[Variant, ...]:
        """Its modes for the bench and the simulator: its variants, or itself."""
        return self.variants or (Variant(self.name, default=not self.reads_boundaries),)
