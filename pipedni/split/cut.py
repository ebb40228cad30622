"""Cutting the model into this run's stages, alike on every rank: ``partition`` for an
``nn.Sequential`` (by balance, parameters or measured time), ``pipedni.split`` for any other
model or for named split points; and where the cut was made, for the saved config."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from pipedni import data as datasets
from pipedni.config import Config
from pipedni.crossing import StageShapes, input_slice, input_to, named
from pipedni.errors import ConfigError, PipeDNIError, among_stages
from pipedni.runtime import Runtime
from pipedni.split import SplitPlan, split
from pipedni.split.cost import run_costs, time_balance
from pipedni.split.partition import describe, partition
from pipedni.split.points import parse_points
from pipedni.stage import TiedWeight

if TYPE_CHECKING:
    from pipedni.schedules.spec import ScheduleSpec

T = TypeVar("T")


def from_rank_zero(runtime: Runtime, compute: Callable[[], T]) -> T:
    """``compute()`` run by rank 0 alone and broadcast; its error, if any, is raised on every rank."""
    box: list = [None]
    error: Optional[Exception] = None
    if runtime.rank == 0:
        try:
            box[0] = compute()
        except Exception as err:  # the other ranks wait in the broadcast: they must learn of it
            error = err
            box[0] = err if isinstance(err, PipeDNIError) else RuntimeError(f"stage 0 failed: {err!r}")
    if runtime.distributed:
        with among_stages(runtime.who, "a broadcast from stage 0"):
            dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if isinstance(box[0], Exception):
        raise box[0]
    return box[0]


def partition_method(cfg: Config, spec: ScheduleSpec, num_stages: int) -> str:
    """``partition.method`` with ``auto`` resolved: ``time`` for a decoupled schedule on several
    stages (its stages pay what a parameter count cannot see: predictors, weight copies), else
    ``parameters`` (a split that does not depend on timing)."""
    if cfg.partition.method != "auto":
        return cfg.partition.method
    return "time" if num_stages > 1 and not spec.locked else "parameters"


@dataclass
class Cut:
    """This run's stages, cut alike on every rank: what rank 0 prints about them; ``cfg``
    recording where they were cut, so that a rerun from the saved config cuts alike without
    measuring or choosing (a balance or split points the user gave are kept as given); and the
    parameters held by several stages, as (stage, name) holders (see ``pipedni.split``)."""

    stages: list[nn.Module]
    description: str
    cfg: Config
    tied: list[list[tuple[int, str]]] = dataclasses.field(default_factory=list)
    boundary_names: list[list[str]] = dataclasses.field(default_factory=list)  # per cut, what crosses it
    input_names: list[str] = dataclasses.field(default_factory=list)  # the first stage's inputs, in its order

    def shapes_named(self, stage_index: int, shapes: StageShapes) -> StageShapes:
        """The probed shapes of ``stage_index`` with the names of the tensors crossing its cuts."""
        if not self.boundary_names:
            return shapes
        before = self.boundary_names[stage_index - 1] if stage_index > 0 else []
        after = self.boundary_names[stage_index] if stage_index < len(self.boundary_names) else []
        return StageShapes(named(shapes.input, before), named(shapes.output, after))

    def tied_weights(self, stage_index: int) -> list[TiedWeight]:
        """The tied parameters ``stage_index`` holds: its name for each, its group, and whether
        it counts the weight in the gradient norm (the first holder does)."""
        return [TiedWeight(name, group, stage_index == holders[0][0], len(holders))
                for group, holders in enumerate(self.tied) for s, name in holders if s == stage_index]


def cut_model(cfg: Config, spec: ScheduleSpec, runtime: Runtime, model: nn.Module,
              train_set: datasets.Dataset) -> Cut:
    """The ``Cut`` of ``model`` for this run: ``partition`` for an ``nn.Sequential``,
    ``pipedni.split`` for any other model or named split points."""
    n = runtime.num_stages
    if cfg.model.split_points or not isinstance(model, nn.Sequential):
        return split_model(cfg, spec, runtime, model, train_set)
    if isinstance(train_set.inputs, tuple):
        raise ConfigError(f"the data gives {len(train_set.inputs)} inputs per sample, {train_set.describe_inputs()}, "
                          f"but {type(model).__name__} is an nn.Sequential, which takes one; return a model whose "
                          "forward takes them from model.factory")
    balance = cfg.partition.balance if n > 1 else None
    method, note = partition_method(cfg, spec, n), ""
    if balance is None and method == "time" and 1 < n <= len(model):
        balance, note = from_rank_zero(runtime, lambda: time_balance(cfg, spec, model, train_set, runtime.device, n))
    stages = partition(model, n, balance, method)
    if n > 1 and cfg.partition.balance is None:
        cfg = dataclasses.replace(cfg, partition=dataclasses.replace(cfg.partition, balance=[len(s) for s in stages]))
    return Cut(stages, "\n".join(filter(None, [describe(stages), note])), cfg)


def split_model(cfg: Config, spec: ScheduleSpec, runtime: Runtime, model: nn.Module,
                train_set: datasets.Dataset) -> Cut:
    """``cut_model`` for a model that is not an ``nn.Sequential`` (or is cut at named modules):
    ``pipedni.split`` on one microbatch of the training set; ``partition.method: time`` times
    its runs of blocks on rank 0, which tells the others where it cut."""
    n = runtime.num_stages
    if cfg.partition.balance is not None:
        raise ConfigError(f"partition.balance = {cfg.partition.balance} counts the layers of an nn.Sequential; cut "
                          f"{type(model).__name__} with model.split_points (module names) instead")
    rows = max(2, cfg.data.batch_size // max(1, cfg.train.microbatches))  # export: a batch of 1 would be fixed
    example, method = example_inputs(train_set, rows), partition_method(cfg, spec, n)
    parse_points(model, cfg.model.split_points)  # a name that is no module is a mistake, however many stages
    points = cfg.model.split_points if n > 1 else []  # one process runs the whole model
    if method == "time" and n > 1 and not points:
        plan = timed_split(cfg, spec, runtime, model, example, train_set.targets[:rows], train_set.num_classes)
    else:
        plan = split(model, n, example, points or None, method)
    if n > 1 and not cfg.model.split_points:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, split_points=[p for p, _ in plan.split_points]))
    return Cut(plan.stages, plan.describe(), cfg, plan.tied, [[t.name for t in b] for b in plan.boundaries],
               plan.input_names)


def timed_split(cfg: Config, spec: ScheduleSpec, runtime: Runtime, model: nn.Module, example: Any, labels: torch.Tensor,
                num_classes: int) -> SplitPlan:
    """``split`` by ``method="time"`` with this run's costs (``run_costs``: its optimizer,
    microbatches, weight copies and predictors, on its device), measured on rank 0 alone; the
    others cut where it did (timings differ between ranks)."""
    n, device, timed = runtime.num_stages, runtime.device, []

    def costs(runs, sample):
        return run_costs(cfg, spec, runs, (input_to(sample[0], device), labels.to(device)), num_classes, n)

    def on_rank_zero() -> list[str]:
        timed.append(split(model, n, example, None, "time", timer=costs))
        return [name for name, _ in timed[0].split_points]

    points = from_rank_zero(runtime, on_rank_zero)
    return timed[0] if timed else split(model, n, example, points)


def example_inputs(train_set: datasets.Dataset, rows: int) -> Any:
    """The first ``rows`` samples' inputs as ``pipedni.split`` takes them: by name if the data
    names them, else in order."""
    inputs = input_slice(train_set.inputs, 0, rows)
    return dict(zip(train_set.input_names, inputs)) if train_set.input_names else inputs
