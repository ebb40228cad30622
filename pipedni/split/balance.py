"""How many layers each stage takes: the arithmetic every way of cutting shares (equal counts,
or the contiguous split whose costliest part is cheapest)."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

Sample = tuple[Any, Optional[torch.Tensor]]  # one microbatch: its inputs (a tensor or a tuple) and labels (or None)


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
