"""``pipedni.split``: cut any ``nn.Module`` into stage modules (trace.py: the graph; points.py:
where to cut; stages.py: what crosses and the stage modules; plan.py: what comes back)."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch.fx as fx
from torch import nn

from pipedni.errors import PartitionError
from pipedni.split.cost import LayerCosts, layer_costs
from pipedni.split.plan import BoundaryTensor, SplitPlan, tied_groups
from pipedni.split.points import (SplitPoints, ancestors, belongs, block_starts, blocks, check_segments, compute_nodes,
                                cuts_of, parameter_balance, parse_points, resolve_cuts, segment_names)
from pipedni.split.stages import crossings, install, make_stage_module, model_output, stage_graph, stage_of_nodes
from pipedni.split.trace import TRACERS, Traced, describe_values, trace

Timer = Callable[[list[tuple[str, nn.Module]], tuple[Any, Any]], LayerCosts]  # see split's timer

__all__ = ["BoundaryTensor", "SplitPlan", "split"]


def split(model: nn.Module, num_stages: int, example_inputs: Any, split_points: Optional[SplitPoints] = None,
          method: str = "parameters", output: Any = None, tracer: Optional[str] = None,
          timer: Optional[Timer] = None) -> SplitPlan:
    """Cut ``model`` into ``num_stages`` stage modules.

    ``example_inputs``: one microbatch (a tensor, a tuple in ``forward``'s order, or a dict by
    name); the first stage takes these inputs in that order. ``split_points``: module names to
    cut before (a list), or a dict naming "beginning" or "end" for each; without them
    ``method`` chooses cuts between blocks: "parameters", "uniform" (block counts) or "time"
    (each run of blocks' forward+backward on the example, timed: see [Note: partition by time]
    in cost.py; ``plan.note`` says what was measured). ``output``: which item of a
    tuple or dict the model returns is the last stage's output (default: the first).
    ``tracer``: "fx", "export" or "chain" alone (default: each in turn, see trace.py).
    ``timer``: what "time" measures, ``(runs, example) -> LayerCosts`` over (name, module)
    runs of blocks (default: ``cost.layer_costs``, forward+backward and an SGD step).
    The stages share the model's parameters and buffers (no copies); timing leaves them as
    they were.
    """
    if tracer is not None and tracer not in TRACERS:
        raise PartitionError(f"tracer = {tracer!r} is unknown; use one of {', '.join(map(repr, TRACERS))} or None (each in turn)")
    points = parse_points(model, split_points) if split_points is not None else None
    targets = [name for name, _ in points] if points is not None else blocks(model)
    expanded = set().union(*(ancestors(t) for t in targets)) if targets else {""}
    traced = trace(model, example_inputs, expanded, output, TRACERS if tracer is None else (tracer,))
    note = ""
    if method == "time" and points is None and num_stages > 1:
        cuts, note = _timed_cuts(model, traced, num_stages, output, timer)
    else:
        cuts = resolve_cuts(model, traced.train.graph, num_stages, points, method)
    resolved = points if points is not None else _points_at(model, traced.train.graph, cuts)
    modes = [traced.train] if traced.eval is traced.train else [traced.train, traced.eval]
    built = [_cut(model, gm, resolve_cuts(model, gm.graph, num_stages, resolved, method) if gm is not traced.train
                  else cuts, num_stages, traced, output) for gm in modes]
    if len(built) == 2 and _signature(built[0]) != _signature(built[1]):
        raise PartitionError("the model passes different tensors between stages in train and eval mode (its forward "
                             "branches on self.training around a cut); move the split points")
    graphs, across, values = built[0]
    stages = [make_stage_module(model, g, built[1][0][i] if len(built) == 2 else None, f"Stage{i}")
              for i, g in enumerate(graphs)]
    keys = list(model.state_dict().keys())
    _adopt_unused(model, stages, keys)
    boundaries = [[BoundaryTensor(n.name, values[n].shape, values[n].dtype, values[n].requires_grad) for n in nodes]
                  for nodes in across]
    return SplitPlan(stages, boundaries, traced.input_names, resolved, traced.tracer, keys, tied_groups(stages), note)


def _timed_cuts(model: nn.Module, traced: Traced, num_stages: int, output: Any,
                timer: Optional[Timer]) -> tuple[list[int], str]:
    """The cuts between blocks whose slowest stage is fastest, from each run of blocks timed as
    a stage of its own on the example (the runs' outputs feed the next, as in the pipeline),
    and the line saying what was measured."""
    graph = traced.train.graph
    bounds, first = block_starts(model, graph)
    check_segments(model, first, len(bounds) - 1, num_stages)
    graphs, _, _ = _cut(model, traced.train, bounds[1:-1], len(bounds) - 1, traced, output)
    names = [name or "(before the blocks)" for name in segment_names(bounds, first)]
    runs = [(name, make_stage_module(model, g, None, f"Run{i}")) for i, (name, g) in enumerate(zip(names, graphs))]
    example = tuple(traced.example[name] for name in traced.input_names)
    costs = (timer or layer_costs)(runs, (example, None))
    balance = costs.balance(num_stages)
    return cuts_of(bounds, balance), costs.describe(balance, parameter_balance(model, bounds, first, num_stages))


def _signature(built) -> list[list]:
    """What crosses each boundary, as the receiving stage sees it (names differ between modes)."""
    _, across, values = built
    return [[(values[n].shape, values[n].dtype) for n in nodes] for nodes in across]


def _points_at(model: nn.Module, graph: fx.Graph, cuts: list[int]) -> list[tuple[str, str]]:
    """The cuts a method chose (each before a block's first node), as the blocks they fall before."""
    nodes, names = compute_nodes(graph), blocks(model)
    return [(next(b for b in names if belongs(nodes[c], b)), "beginning") for c in cuts]


def _cut(model: nn.Module, gm: fx.GraphModule, cuts: list[int], num_stages: int, traced: Traced, output: Any):
    """One mode's stage graphs, the nodes crossing each boundary, and every node's value."""
    graph = gm.graph
    values = describe_values(gm, model, traced.example)
    result = model_output(graph, output)
    if values.get(result) is None:
        raise PartitionError("the model's output is not a tensor; pick the item that is with output=...")
    stage_of = stage_of_nodes(graph, cuts)
    across, needs = crossings(graph, stage_of, values, num_stages, result)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    graphs = []
    for s in range(num_stages):
        inputs = placeholders if s == 0 else across[s - 1]
        last = s == num_stages - 1
        outputs = [result] if last else across[s]
        members = {n for n, at in stage_of.items() if at == s} | needs.copies[s]
        bare = last or (len(outputs) == 1 and values[outputs[0]].requires_grad)  # see [Note: what crosses a boundary]
        graphs.append(stage_graph(graph, inputs, members, outputs, bare))
    return graphs, across, values


def _adopt_unused(model: nn.Module, stages: list[nn.Module], keys: list[str]) -> None:
    """Parameters and buffers no stage computes with go to the first stage under their own
    names, so that the stages' state dicts still cover the model's."""
    held = set().union(*(s.state_dict().keys() for s in stages))
    for key in keys:
        if key not in held:
            install(model, stages[0], key)
