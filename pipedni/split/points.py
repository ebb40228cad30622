"""Where a model is cut: at split points named by module, or between blocks chosen by a method.

A cut is a position in the graph's node order: every node before it runs on an earlier stage.
Blocks, when no split points are given, are the children of the model's longest
``ModuleList``/``Sequential`` and the siblings of that container and of each module above it
(embeddings before the blocks, a norm and a head after them).
"""

from __future__ import annotations

import difflib
from typing import Mapping, Optional, Sequence, Union

import torch.fx as fx
from torch import nn

from pipedni.errors import PartitionError
from pipedni.split.balance import min_max_balance, uniform_balance
from pipedni.stage import num_params

SplitPoints = Union[Sequence[str], Mapping[str, str]]
WHERE = ("beginning", "end")
METHODS = ("uniform", "parameters", "time")


def parse_points(model: nn.Module, split_points: SplitPoints) -> list[tuple[str, str]]:
    """``split_points`` as (module name, "beginning" or "end"), each name checked against the model."""
    if isinstance(split_points, str):
        raise PartitionError(f"split_points = {split_points!r} is one string; give a list of module names, "
                             f"e.g. [{split_points!r}]")
    items = list(split_points.items()) if isinstance(split_points, Mapping) else [(p, "beginning") for p in split_points]
    names = [name for name, _ in model.named_modules() if name]
    for name, where in items:
        if where not in WHERE:
            raise PartitionError(f"split point {name!r}: {where!r} is not a place to cut; use 'beginning' or 'end'")
        if name not in names:
            close = difflib.get_close_matches(name, names, n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else f"; modules are named like {names[0]!r}"
            raise PartitionError(f"split point {name!r} names no module of {type(model).__name__}{hint}")
    return items


def ancestors(name: str) -> set[str]:
    """The module's proper ancestors by qualified name ("" is the model)."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(len(parts))}


def blocks(model: nn.Module) -> list[str]:
    """The default places to cut before: see the module docstring."""
    containers = [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.ModuleList, nn.Sequential))]
    if not containers:
        return [name for name, _ in model.named_children()]
    path, longest = max(containers, key=lambda item: len(item[1]))  # the first of the longest
    names = [f"{path}.{child}" if path else child for child, _ in longest.named_children()]
    above = ancestors(path) if path else set()
    for parent in above:
        module = model.get_submodule(parent)
        for child, _ in module.named_children():
            full = f"{parent}.{child}" if parent else child
            if full != path and full not in above:
                names.append(full)
    return names


def belongs(node: fx.Node, name: str) -> bool:
    """Whether ``node`` computes part of module ``name``."""
    # fx keys the stack by qualified name; export by its own ids, with (qualified name, type) values
    owners = [v[0] if isinstance(v, tuple) else k for k, v in node.meta.get("nn_module_stack", {}).items()]
    if node.op == "call_module":
        owners.append(node.target)
    return any(o == name or o.startswith(name + ".") for o in owners)


def compute_nodes(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op in ("call_function", "call_method", "call_module")]


def cuts_at_points(graph: fx.Graph, points: list[tuple[str, str]], num_stages: int) -> list[int]:
    """The cut positions (indices into ``compute_nodes``) of the split points, in order."""
    if len(points) != num_stages - 1:
        raise PartitionError(f"{len(points)} split point(s) make {len(points) + 1} stages but {num_stages} were asked "
                             f"for; give {num_stages - 1} split points or start {len(points) + 1} stages")
    nodes = compute_nodes(graph)
    cuts = []
    for name, where in points:
        inside = [i for i, n in enumerate(nodes) if belongs(n, name)]
        if not inside:
            raise PartitionError(f"split point {name!r}: the module is never called in forward; name one that is")
        cuts.append(inside[0] if where == "beginning" else inside[-1] + 1)
    for (name, _), cut, prev in zip(points, cuts, [0] + cuts):
        if cut <= prev:
            raise PartitionError(f"split point {name!r} leaves a stage empty (nothing runs between it and the cut "
                                 "before); give split points in forward's order, one module apart at least")
    if cuts[-1] >= len(nodes):
        raise PartitionError(f"split point {points[-1][0]!r} leaves the last stage empty; cut earlier")
    return cuts


def block_starts(model: nn.Module, graph: fx.Graph) -> tuple[list[int], dict[str, int]]:
    """Where a method may cut: the bounds of the runs of nodes between block starts (0 first,
    the node count last), and each block's first node."""
    nodes = compute_nodes(graph)
    first = {b: next(i for i, n in enumerate(nodes) if belongs(n, b)) for b in blocks(model)
             if any(belongs(n, b) for n in nodes)}
    return [0, *sorted(set(first.values()) - {0}), len(nodes)], first


def segment_names(bounds: list[int], first: dict[str, int]) -> list[str]:
    """Each run named by the blocks it starts with ("" for computation before the first block)."""
    return ["+".join(b for b, at in first.items() if at == start) for start in bounds[:-1]]


def check_segments(model: nn.Module, first: dict[str, int], num_segments: int, num_stages: int) -> None:
    if num_stages > num_segments:
        names = sorted(first, key=first.get)
        raise PartitionError(f"cannot cut {type(model).__name__} into {num_stages} stages: cut between its blocks "
                             f"({', '.join(names[:8])}{'...' if len(names) > 8 else ''}) it makes at most "
                             f"{num_segments}; use at most {num_segments} stages or name split_points")


def cuts_of(bounds: list[int], balance: Sequence[int]) -> list[int]:
    """The cut positions that give stage i ``balance[i]`` of the runs between ``bounds``."""
    return [bounds[sum(balance[: i + 1])] for i in range(len(balance) - 1)]


def parameter_balance(model: nn.Module, bounds: list[int], first: dict[str, int], num_stages: int) -> list[int]:
    """Runs per stage minimising the largest stage's parameters (a run counts the parameters of
    the blocks it starts with: export's graphs call no modules)."""
    costs = [sum(num_params(model.get_submodule(b)) for b, at in first.items() if at == start) for start in bounds[:-1]]
    return min_max_balance(costs, num_stages)


def cuts_by_method(model: nn.Module, graph: fx.Graph, num_stages: int, method: str) -> list[int]:
    """Cut positions before blocks, minimising the largest stage's cost (``parameters``) or
    block count (``uniform``)."""
    if method not in METHODS:
        raise PartitionError(f"method = {method!r} is no way to cut a model between its blocks; use "
                             f"{', '.join(map(repr, METHODS))}, or name split_points")
    bounds, first = block_starts(model, graph)
    check_segments(model, first, len(bounds) - 1, num_stages)
    balance = (uniform_balance(len(bounds) - 1, num_stages) if method == "uniform"
               else parameter_balance(model, bounds, first, num_stages))
    return cuts_of(bounds, balance)


def resolve_cuts(model: nn.Module, graph: fx.Graph, num_stages: int, points: Optional[list[tuple[str, str]]],
                 method: str) -> list[int]:
    if num_stages < 1:
        raise PartitionError(f"num_stages = {num_stages}; need at least one stage")
    if points is not None and (points or num_stages > 1):
        return cuts_at_points(graph, points, num_stages)
    if num_stages == 1:
        return []
    return cuts_by_method(model, graph, num_stages, method)
