"""Cutting an ``nn.Sequential`` into contiguous stages, by a given balance or automatically
(equal layer counts, parameters, or measured time: see cost.py).

Stage modules keep the original child names, so a stage's ``state_dict()`` keys are exactly the
whole model's keys for those layers (checkpoints merge back by name, for any split).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

from torch import nn

from pipedni.config import OptimConfig
from pipedni.errors import PartitionError
from pipedni.split.balance import Sample, min_max_balance, uniform_balance
from pipedni.split.cost import layer_costs
from pipedni.stage import num_params


METHODS = ("uniform", "parameters", "time", "auto")


def resolve_balance(
    model: nn.Sequential, num_stages: int, balance: Optional[Sequence[int]] = None, method: str = "parameters",
    sample: Optional[Sample] = None, optim: Optional[OptimConfig] = None,
) -> list[int]:
    """Layers per stage: ``balance`` checked against the model, or computed by ``method``.

    ``time`` times each layer on ``sample`` (one microbatch, on the device to time on) with an
    ``optim`` step (default: plain SGD); ``auto`` is ``time`` when a sample is given, else
    ``parameters`` (the engine resolves it by schedule instead: see ``cutting.partition_method``).
    """
    num_layers = len(model)
    if num_stages < 1:
        raise PartitionError(f"num_stages = {num_stages}; need at least one stage")
    if balance is not None:
        return check_balance(model, num_stages, list(balance))
    if num_stages > num_layers:
        raise PartitionError(
            f"cannot cut a model of {num_layers} layers into {num_stages} stages; "
            f"use at most {num_layers} processes or a deeper model"
        )
    if method not in METHODS:
        raise PartitionError(
            f"partition.method = {method!r} is unknown; use {', '.join(map(repr, METHODS[:-1]))} or {METHODS[-1]!r}"
        )
    if method == "uniform" or num_stages == 1:
        return uniform_balance(num_layers, num_stages)
    if method == "time" or (method == "auto" and sample is not None):
        if sample is None:
            raise PartitionError(
                "partition.method = 'time' times every layer on a sample batch but none was given; pass "
                "sample=(inputs, targets), one microbatch of your data, or use method='parameters'"
            )
        return layer_costs(model, sample, optim).balance(num_stages)
    return min_max_balance([num_params(layer) for layer in model], num_stages)


def check_balance(model: nn.Sequential, num_stages: int, balance: list[int]) -> list[int]:
    """``balance`` if it cuts ``model`` into ``num_stages`` non-empty stages, else the error with the fix."""
    num_layers = len(model)
    if len(balance) != num_stages:
        raise PartitionError(
            f"partition.balance = {balance} has {len(balance)} stages but {num_stages} processes run; "
            f"give {num_stages} entries or start {len(balance)} processes (torchrun --nproc_per_node={len(balance)})"
        )
    if min(balance) < 1:
        raise PartitionError(f"partition.balance = {balance} leaves a stage empty; every stage needs >= 1 layer")
    if sum(balance) != num_layers:
        raise PartitionError(
            f"partition.balance = {balance} sums to {sum(balance)} but the model has {num_layers} layers "
            f"({', '.join(name for name, _ in model.named_children())}); make it sum to {num_layers}"
        )
    return balance


def partition(
    model: nn.Sequential, num_stages: int, balance: Optional[Sequence[int]] = None, method: str = "parameters",
    sample: Optional[Sample] = None, optim: Optional[OptimConfig] = None,
) -> list[nn.Sequential]:
    """Split ``model`` into ``num_stages`` contiguous ``nn.Sequential`` stages.

    The stages share the model's layer objects (no copies) and keep their names. Usable on any
    user ``nn.Sequential``: ``stages = pipedni.partition(my_model, 4, method="parameters")``, or
    ``method="time", sample=(inputs, targets)`` to balance measured forward+backward time.
    """
    if not isinstance(model, nn.Sequential):
        raise PartitionError(
            f"partition() takes an nn.Sequential of layers, got {type(model).__name__}; "
            "wrap your layers in nn.Sequential(OrderedDict(...))"
        )
    counts = resolve_balance(model, num_stages, balance, method, sample, optim)
    named = list(model.named_children())
    stages, start = [], 0
    for count in counts:
        stages.append(nn.Sequential(OrderedDict(named[start : start + count])))
        start += count
    return stages


def describe(stages: Sequence[nn.Module]) -> str:
    """One line per stage: its layer names and parameter count (printed by rank 0)."""
    lines = []
    for i, stage in enumerate(stages):
        names = ", ".join(name for name, _ in stage.named_children())
        lines.append(f"stage {i}: {num_params(stage):>10,d} params  [{names}]")
    return "\n".join(lines)
