"""Stage modules from a cut graph: which tensors cross each boundary (relayed through the stages
in between when a later stage needs them), and one ``GraphModule`` per stage that keeps the
model's own module and parameter names.

[Note: what crosses a boundary]
A value crosses the boundary after stage b if a stage up to b computes it (the network's inputs
count as stage 0's) and a later stage uses it. Stages in between take it and hand it on
unchanged: the transport only ever talks to neighbours. Only tensors cross. Anything else a
later stage uses (a size, a tuple that is indexed later, a parameter read by name) is computed
again where it is used, from the tensors that do cross; a module whose output is not a tensor
cannot be computed twice, so a cut must not separate it from its users. A stage takes the
crossing tensors, and returns them, in the graph's order: one tensor that needs a gradient
bare (as an ``nn.Sequential``'s stage would), otherwise a tuple, whose tensors say whether they
need a gradient (integer ids, a mask, a network input relayed on do not).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.fx as fx
from torch import nn

from pipedni.errors import PartitionError
from pipedni.split.points import compute_nodes
from pipedni.split.trace import Value


def stage_of_nodes(graph: fx.Graph, cuts: list[int]) -> dict[fx.Node, int]:
    """Each computing node's stage: how many cuts come at or before its position. A buffer
    update that an exported graph makes at its end (``copy_`` into a batch-norm statistic) runs
    where the new value is computed, so the stage that holds the buffer updates it."""
    stage_of = {n: sum(c <= i for c in cuts) for i, n in enumerate(compute_nodes(graph))}
    for node in stage_of:
        if node.target is torch.ops.aten.copy_.default and node.args[0].op == "get_attr":
            source = node.args[1]
            stage_of[node] = stage_of.get(source, 0) if isinstance(source, fx.Node) else stage_of[node]
    return stage_of


def model_output(graph: fx.Graph, output: Any = None) -> fx.Node:
    """The node whose value the last stage returns: the model's output, or its item ``output``
    (a key or an index) when forward returns a tuple or a dict; by default its first item."""
    result = next(n for n in graph.nodes if n.op == "output").args[0]
    if isinstance(result, fx.Node):  # one value (export has picked the item already)
        return result
    try:
        if isinstance(result, dict):
            chosen = result[output] if output is not None else next(iter(result.values()))
        elif isinstance(result, (tuple, list)):
            chosen = result[output if output is not None else 0]
        else:
            raise KeyError(output)
    except (KeyError, IndexError, TypeError):
        keys = list(result) if isinstance(result, dict) else list(range(len(result))) if isinstance(result, (tuple, list)) else []
        raise PartitionError(f"output = {output!r} is not an item of the model's output (items: {keys}); name one") from None
    if not isinstance(chosen, fx.Node):
        raise PartitionError(f"the model's chosen output is the constant {chosen!r}, not a tensor it computes")
    return chosen


class _Needs:
    """What each stage computes again, and which outside tensors it needs (see the note)."""

    def __init__(self, stage_of: dict[fx.Node, int], values: dict[fx.Node, Optional[Value]], num_stages: int):
        self.stage_of, self.values = stage_of, values
        self.copies: list[set[fx.Node]] = [set() for _ in range(num_stages)]
        self.outside: list[dict[fx.Node, None]] = [{} for _ in range(num_stages)]  # ordered sets

    def pull(self, node: fx.Node, stage: int) -> None:
        if node.op == "get_attr":
            self.copies[stage].add(node)
        elif node.op == "placeholder":
            if stage > 0:
                self._cross(node, stage)
        elif self.stage_of[node] == stage or node in self.copies[stage]:
            return
        elif self.values.get(node) is None:  # not a tensor: computed again here
            if node.op == "call_module":
                raise PartitionError(f"module {node.target!r} returns no tensor but its output is used by a later "
                                     "stage; move the cut so that its users stay with it")
            self.copies[stage].add(node)
            for arg in node.all_input_nodes:
                self.pull(arg, stage)
        else:
            self._cross(node, stage)

    def _cross(self, node: fx.Node, stage: int) -> None:
        if self.values.get(node) is None:
            raise PartitionError(f"input {node.target!r} is no tensor but stage {stage} uses it; only the first "
                                 "stage may take inputs that are not tensors")
        self.outside[stage][node] = None


def crossings(graph: fx.Graph, stage_of: dict[fx.Node, int], values: dict[fx.Node, Optional[Value]],
              num_stages: int, result: fx.Node) -> tuple[list[list[fx.Node]], _Needs]:
    """The nodes crossing each boundary, in graph order, and what each stage computes again."""
    needs = _Needs(stage_of, values, num_stages)
    for node, stage in stage_of.items():
        for arg in node.all_input_nodes:
            needs.pull(arg, stage)
    needs.pull(result, num_stages - 1)
    order = {n: i for i, n in enumerate(graph.nodes)}
    across: list[set[fx.Node]] = [set() for _ in range(num_stages - 1)]
    for stage, outside in enumerate(needs.outside):
        for node in outside:
            made = 0 if node.op == "placeholder" else stage_of[node]
            for boundary in range(made, stage):
                across[boundary].add(node)
    return [sorted(nodes, key=order.get) for nodes in across], needs


def stage_graph(graph: fx.Graph, inputs: list[fx.Node], members: set[fx.Node], outputs: list[fx.Node],
                bare: bool) -> fx.Graph:
    """A graph taking ``inputs``, computing ``members`` in the original order, returning
    ``outputs`` (the one output itself if ``bare``, else a tuple)."""
    g = fx.Graph()
    env = {n: g.placeholder(n.name) for n in inputs}
    for node in graph.nodes:
        if node in members:
            env[node] = g.node_copy(node, lambda a: env[a])
    outs = [env[n] for n in outputs]
    g.output(outs[0] if bare else tuple(outs))
    return g


def install(root: nn.Module, into: nn.Module, target: str) -> None:
    """Put ``root``'s attribute ``target`` (a module, parameter or buffer) into ``into`` under the
    same qualified name, making plain containers on the way; the very object, not a copy."""
    *path, field = target.split(".")
    src, dst = root, into
    for part in path:
        src = getattr(src, part)
        nxt = getattr(dst, part, None) if part in dst._modules else None
        if nxt is src:
            return  # the whole module is already there
        if nxt is None:
            nxt = nn.Module()
            dst.add_module(part, nxt)
        dst = nxt
    value = getattr(src, field)
    if isinstance(value, nn.Parameter):
        dst.register_parameter(field, value)
    elif isinstance(value, torch.Tensor):
        dst.register_buffer(field, value, persistent=field not in src._non_persistent_buffers_set)
    else:
        setattr(dst, field, value)


def keep_persistence(root: nn.Module, stage: nn.Module) -> None:
    """Buffers that are not in the model's ``state_dict`` stay out of the stage's (fx's
    ``GraphModule`` registers every buffer it copies as persistent)."""
    for path, module in root.named_modules():
        for field in module._non_persistent_buffers_set:
            try:
                owner = stage.get_submodule(path)
            except AttributeError:
                continue
            if field in owner._buffers:
                owner._non_persistent_buffers_set.add(field)


def make_stage_module(root: nn.Module, train: fx.Graph, evaluation: Optional[fx.Graph], name: str) -> fx.GraphModule:
    """The stage's ``GraphModule`` over ``root``'s own modules and tensors; with ``evaluation``
    (the stage's code differs by mode: see [Note: block-level tracing] in trace.py) it runs
    that graph in eval mode."""
    module = fx.GraphModule(root, train, class_name=name)
    keep_persistence(root, module)
    if evaluation is None:
        return module
    for node in evaluation.nodes:
        if node.op in ("get_attr", "call_module"):
            install(root, module, node.target)
    code = evaluation.python_code(root_module="self")
    scope = dict(code.globals)
    exec(compile(code.src, f"<{name} in eval mode>", "exec"), scope)
    evaluate, train_forward = scope["forward"], type(module).forward

    def forward(self, *args):
        return (train_forward if self.training else evaluate)(self, *args)

    type(module).forward = forward  # fx gives every GraphModule its own class
    return module
