"""Cutting an ``nn.Sequential`` into contiguous stages, by a given balance or automatically.

Stage modules keep the original child names, so a stage's ``state_dict()`` keys are exactly the
whole model's keys for those layers (checkpoints merge back by name, for any split).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

from torch import nn

from pipedni.errors import PartitionError


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def uniform_balance(num_layers: int, num_stages: int) -> list[int]:
    """Equal layer counts; the first ``num_layers % num_stages`` stages take one more."""
    base, extra = divmod(num_layers, num_stages)
    return [base + (1 if i < extra else 0) for i in range(num_stages)]


def min_max_balance(costs: Sequence[int], num_stages: int) -> list[int]:
    """The contiguous split of ``costs`` into ``num_stages`` non-empty parts that minimises the
    largest part's sum (exact, by dynamic programming; ties go to the earliest cut)."""
    n = len(costs)
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][j]: minimal max-part cost of splitting costs[:j] into k parts; cut[k][j]: last cut.
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0
    for k in range(1, num_stages + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):
                value = max(best[k - 1][i], prefix[j] - prefix[i])
                if value < best[k][j]:
                    best[k][j], cut[k][j] = value, i
    balance, j = [], n
    for k in range(num_stages, 0, -1):
        balance.append(j - cut[k][j])
        j = cut[k][j]
    return balance[::-1]


def resolve_balance(
    model: nn.Sequential, num_stages: int, balance: Optional[Sequence[int]] = None, method: str = "parameters"
) -> list[int]:
    """Layers per stage: ``balance`` checked against the model, or computed by ``method``."""
    num_layers = len(model)
    if num_stages < 1:
        raise PartitionError(f"num_stages = {num_stages}; need at least one stage")
    if balance is not None:
        balance = list(balance)
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
    if num_stages > num_layers:
        raise PartitionError(
            f"cannot cut a model of {num_layers} layers into {num_stages} stages; "
            f"use at most {num_layers} processes or a deeper model"
        )
    if method == "uniform":
        return uniform_balance(num_layers, num_stages)
    if method == "parameters":
        return min_max_balance([num_params(layer) for layer in model], num_stages)
    raise PartitionError(f"partition.method = {method!r} is unknown; use 'uniform' or 'parameters'")


def partition(
    model: nn.Sequential, num_stages: int, balance: Optional[Sequence[int]] = None, method: str = "parameters"
) -> list[nn.Sequential]:
    """Split ``model`` into ``num_stages`` contiguous ``nn.Sequential`` stages.

    The stages share the model's layer objects (no copies) and keep their names. Usable on any
    user ``nn.Sequential``: ``stages = pipedni.partition(my_model, 4, method="parameters")``.
    """
    if not isinstance(model, nn.Sequential):
        raise PartitionError(
            f"partition() takes an nn.Sequential of layers, got {type(model).__name__}; "
            "wrap your layers in nn.Sequential(OrderedDict(...))"
        )
    counts = resolve_balance(model, num_stages, balance, method)
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
