"""Cutting an ``nn.Sequential`` into contiguous stages, by a given balance or automatically
(equal layer counts, parameters, or measured time: see ``partition_cost``).

Stage modules keep the original child names, so a stage's ``state_dict()`` keys are exactly the
whole model's keys for those layers (checkpoints merge back by name, for any split).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Optional, Sequence

import torch
from torch import nn

from pipedni.config import OptimConfig
from pipedni.errors import PartitionError


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def uniform_balance(num_layers: int, num_stages: int) -> list[int]:
    """Equal layer counts; the first ``num_layers % num_stages`` stages take one more."""
    base, extra = divmod(num_layers, num_stages)
    return [base + (1 if i < extra else 0) for i in range(num_stages)]


def min_max_balance(costs: Sequence[float], num_stages: int, cut_costs: Optional[Sequence[float]] = None,
                    scale: float = 1.0) -> list[int]:
    """The contiguous split of ``costs`` into ``num_stages`` non-empty parts that minimises the
    largest part's cost (exact, by dynamic programming; ties go to the earliest cut).

    A part costs the sum of its layers. What a stage pays for its outgoing boundary can be added:
    a part ending before layer j adds ``cut_costs[j]``, and every part but the last has its sum
    multiplied by ``scale``; the last part pays neither.
    """
    n = len(costs)
    cuts = list(cut_costs) if cut_costs is not None else [0] * n
    assert len(cuts) == n, f"cut_costs has {len(cuts)} entries for {n} layers"
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def part(i: int, j: int) -> float:
        total = prefix[j] - prefix[i]
        return total if j == n else total * scale + cuts[j]

    inf = float("inf")
    # best[k][j]: minimal max-part cost of splitting costs[:j] into k parts; cut[k][j]: last cut
    # (None until a first candidate: with an infinite cut cost every candidate may be infinite).
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut: list[list[Optional[int]]] = [[None] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0
    for k in range(1, num_stages + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):
                value = max(best[k - 1][i], part(i, j))
                if cut[k][j] is None or value < best[k][j]:
                    best[k][j], cut[k][j] = value, i
    balance, j = [], n
    for k in range(num_stages, 0, -1):
        balance.append(j - cut[k][j])
        j = cut[k][j]
    return balance[::-1]


def part_costs(costs: Sequence[float], balance: Sequence[int], cut_costs: Optional[Sequence[float]] = None,
               scale: float = 1.0) -> list[float]:
    """Each part's cost under ``balance``, as ``min_max_balance`` counts it."""
    n, sums, start = len(costs), [], 0
    for count in balance:
        end = start + count
        total = sum(costs[start:end])
        sums.append(total if end == n else total * scale + (cut_costs[end] if cut_costs is not None else 0))
        start = end
    return sums


METHODS = ("uniform", "parameters", "time", "auto")
Sample = tuple[Any, Optional[torch.Tensor]]  # one microbatch: its inputs (a tensor or a tuple) and labels (or None)


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
        from pipedni.partition_cost import layer_costs  # here: it builds on stage.py, which imports this module

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
