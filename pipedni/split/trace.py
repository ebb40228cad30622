"""A user's ``nn.Module`` as one fx graph, coarse enough to cut: the tracers tried in order, and
what every value in the graph is on one example microbatch.

[Note: block-level tracing]
Cuts only ever fall between blocks, so the graph need not see inside them: every module that
is not an ancestor of a place to cut is traced as a leaf (one ``call_module`` node). That keeps
the graph small, keeps control flow inside blocks out of the tracer's way, and keeps each
block's train/eval behaviour (dropout, batch norm) where it lives: the stage calls the block
itself. What the tracer does see, the forward of the model and of the containers above the
cuts, may still read ``self.training``; it is traced once per mode, and a stage whose code
differs between them runs each mode's graph (``stages.StageModule``).

The tracers, in order: ``fx`` (``torch.fx.Tracer`` with the leaves above); ``export``
(``torch.export`` with a dynamic batch dimension, for forwards fx cannot follow, such as
Hugging Face models: it sees every op, so each mode gets its own graph, and a buffer it updates,
a batch-norm statistic, is updated on the stage that computes the new value); then ``chain``: the
top-level children called one after the other, accepted only if that reproduces the model's
output on the example exactly. If all fail, one error names each and why.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.fx as fx
from torch import nn

from pipedni.errors import PartitionError


@dataclass
class Traced:
    """The model's graphs, in train mode and in eval mode (the same object when their code is),
    and the names of the inputs the example gives, in the order a stage takes them."""

    train: fx.GraphModule
    eval: fx.GraphModule
    input_names: list[str]
    example: dict[str, torch.Tensor]  # the example inputs by name
    tracer: str  # one of TRACERS


TRACERS = ("fx", "export", "chain")


class _BlockTracer(fx.Tracer):
    """Traces into ``expanded`` modules only; every other module is one node. See [Note: block-level tracing]."""

    def __init__(self, expanded: set[str]):
        super().__init__()
        self.expanded = expanded

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name not in self.expanded


def as_arguments(model: nn.Module, example_inputs: Any) -> tuple[list[str], dict, dict, dict]:
    """``example_inputs`` (one tensor, a tuple in ``forward``'s order, or a dict by name) as
    (the names of the tensors given, the tensors, and the value every call fixes for the other
    parameters: a plain value given, e.g. ``use_cache=False``, else the default; and the plain
    values given alone)."""
    params = [p for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    names = [p.name for p in params]
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, Mapping):
        unknown = [k for k in example_inputs if k not in names]
        if unknown:
            raise PartitionError(f"example_inputs names {unknown[0]!r}, which {type(model).__name__}.forward does not "
                                 f"take; its parameters are {', '.join(names)}")
        given = {k: example_inputs[k] for k in names if k in example_inputs}
    elif isinstance(example_inputs, (tuple, list)):
        if len(example_inputs) > len(names):
            raise PartitionError(f"example_inputs has {len(example_inputs)} values but {type(model).__name__}.forward "
                                 f"takes {len(names)} ({', '.join(names)}); give one microbatch of its inputs")
        given = dict(zip(names, example_inputs))
    else:
        raise PartitionError(f"example_inputs is a {type(example_inputs).__name__}; give one microbatch as a tensor, "
                             "a tuple in forward's order or a dict by parameter name")
    constants = {k: v for k, v in given.items() if not isinstance(v, torch.Tensor)}
    bad = [k for k, v in constants.items() if not isinstance(v, (bool, int, float, str, type(None)))]
    if bad:
        raise PartitionError(f"example_inputs[{bad[0]!r}] is a {type(given[bad[0]]).__name__}; give tensors, and plain "
                             "values (bool, int, float, str, None) for arguments fixed for every call")
    missing = [p.name for p in params if p.name not in given and p.default is inspect.Parameter.empty]
    if missing:
        raise PartitionError(f"example_inputs lacks {missing[0]!r}, which {type(model).__name__}.forward needs; "
                             "give it in example_inputs")
    fixed = {p.name: p.default for p in params if p.name not in given}
    fixed.update(constants)
    tensors = {k: v for k, v in given.items() if k not in constants}
    if not tensors:
        raise PartitionError("example_inputs holds no tensor; give one microbatch of the model's inputs")
    return list(tensors), tensors, fixed, constants


def _drop_specialised(graph: fx.Graph, given: Sequence[str]) -> None:
    """Remove the placeholders fx made for the parameters it specialised to their defaults (all
    but the ``given``), and the checks it attached to them: a stage takes only the inputs given."""
    doomed = {n for n in graph.nodes if n.op == "placeholder" and n.target not in given}
    for node in graph.nodes:
        if node.op != "placeholder" and node.all_input_nodes and all(a in doomed for a in node.all_input_nodes):
            doomed.add(node)
    if any(u not in doomed for n in doomed for u in n.users):
        used = sorted(n.target for n in doomed if n.op == "placeholder")
        raise PartitionError(f"forward uses its default of {', '.join(used)} in its computation; give them in example_inputs")
    for node in reversed(list(graph.nodes)):
        if node in doomed:
            graph.erase_node(node)


def _trace_fx(model: nn.Module, expanded: set[str], given: list[str], defaults: dict[str, Any]) -> fx.GraphModule:
    tracer = _BlockTracer(expanded)
    graph = tracer.trace(model, concrete_args=defaults or None)
    if defaults:
        _drop_specialised(graph, given)
    placeholders = [n.target for n in graph.nodes if n.op == "placeholder"]
    if placeholders != given:
        raise PartitionError(f"fx made inputs {placeholders}, expected {given}")
    return fx.GraphModule(model, graph)


def _trace_export(model: nn.Module, given: list[str], values: dict[str, Any], constants: dict[str, Any],
                  output: Any) -> fx.GraphModule:
    """``torch.export`` of the model in its current mode, every input's first dimension dynamic
    (train and evaluation batches differ), as a graph over the model's own parameters whose
    output is the chosen item of the model's output."""
    from torch.export import Dim

    batch = Dim("batch")
    kwargs = {**values, **constants}
    dynamic = {name: ({0: batch} if name in values and values[name].dim() > 0 else None) for name in kwargs}
    program = torch.export.export(model, (), kwargs, dynamic_shapes=dynamic, strict=False)
    module = program.module()
    graph = module.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":  # shape guards of the example: not a stage's job
            graph.erase_node(node)
    _drop_specialised(graph, given)  # the plain values given are constants of the graph
    with _quiet(model):
        result = model(**kwargs)
    leaves = torch.utils._pytree.tree_leaves(result)
    chosen = pick_output(result, output)
    index = next(i for i, leaf in enumerate(leaves) if leaf is chosen)
    out = next(n for n in graph.nodes if n.op == "output")
    flat = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
    out.args = (flat[index],)
    graph.eliminate_dead_code()
    return fx.GraphModule(module, graph)


def pick_output(result: Any, output: Any = None) -> Any:
    """The item ``output`` (a key or an index) of a model's output, or its first tensor."""
    if output is None:
        return next(leaf for leaf in torch.utils._pytree.tree_leaves(result) if isinstance(leaf, torch.Tensor))
    try:
        return result[output]
    except (KeyError, IndexError, TypeError):
        keys = list(result.keys()) if isinstance(result, Mapping) else list(range(len(result))) if isinstance(result, (tuple, list)) else []
        raise PartitionError(f"output = {output!r} is not an item of the model's output (items: {keys}); name one") from None


def _trace_chain(model: nn.Module, given: list[str], values: dict[str, Any]) -> fx.GraphModule:
    """The top-level children one after the other, if that is what the model computes."""
    if len(given) != 1:
        raise PartitionError(f"a chain takes one input, the example gives {len(given)}")
    children = list(model.named_children())
    if not children:
        raise PartitionError("the model has no children")
    graph = fx.Graph()
    value = graph.placeholder(given[0])
    for name, _ in children:
        value = graph.call_module(name, (value,))
    graph.output(value)
    chained = fx.GraphModule(model, graph)
    with _quiet(model):
        expected, actual = model(values[given[0]]), chained(values[given[0]])
    if not (isinstance(expected, torch.Tensor) and isinstance(actual, torch.Tensor)
            and expected.shape == actual.shape and torch.equal(expected, actual)):
        raise PartitionError(f"calling its children {', '.join(n for n, _ in children)} in turn does not give "
                             "the model's output")
    return chained


class _quiet:
    """Eval mode, no gradients, and the RNG and every buffer as they were afterwards: a pass on
    the example leaves no trace in the model (batch-norm statistics, dropout's draws)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.training = [(m, m.training) for m in self.model.modules()]
        self.buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        self.rng = torch.random.fork_rng(devices=[])
        self.rng.__enter__()
        self.grad = torch.no_grad()
        self.grad.__enter__()
        self.model.eval()

    def __exit__(self, *exc):
        self.grad.__exit__(*exc)
        self.rng.__exit__(*exc)
        for m, mode in self.training:
            m.training = mode
        with torch.no_grad():
            for b, value in self.buffers:
                b.copy_(value)


def _in_mode(model: nn.Module, training: bool, trace):
    modes = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        return trace()
    finally:
        for m, mode in modes:
            m.training = mode


def trace(model: nn.Module, example_inputs: Any, expanded: set[str], output: Any = None,
          tracers: Sequence[str] = TRACERS) -> Traced:
    """The model's graph by the first of ``tracers`` that can follow it (see the note); a
    PartitionError naming each tracer's failure if none can."""
    given, values, defaults, constants = as_arguments(model, example_inputs)
    attempts = {
        "fx": lambda: _trace_fx(model, expanded, given, defaults),
        "export": lambda: _trace_export(model, given, values, constants, output),
    }
    failures = []
    for name in tracers:
        try:
            if name == "chain":
                chained = _trace_chain(model, given, values)
                return Traced(chained, chained, given, values, name)
            train = _in_mode(model, True, attempts[name])
            evaluation = _in_mode(model, False, attempts[name])
            if evaluation.code == train.code:
                evaluation = train
            return Traced(train, evaluation, given, values, name)
        except Exception as err:  # the user's code decides what can fail here: keep it for the message
            failures.append(f"{name}: {_first_line(err)}")
    raise PartitionError(f"cannot split {type(model).__name__}: no tracer could follow its forward ("
                         + "; ".join(failures) + "); name split points in a part of the model without "
                         "data-dependent control flow, or make its top-level children a chain")


def _first_line(err: BaseException) -> str:
    text = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {text[:200]}" if not isinstance(err, PartitionError) else text[:300]


@dataclass(frozen=True)
class Value:
    """What a node of the graph computes on the example: a tensor's shape, dtype and whether it
    depends on a parameter (it then needs a gradient), or ``None`` for anything else."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool


def describe_values(graph_module: fx.GraphModule, model: nn.Module, values: dict[str, Any]) -> dict[fx.Node, Optional[Value]]:
    """Every node's ``Value`` on the example inputs (eval mode, the model left as it was)."""
    seen: dict[fx.Node, Optional[Value]] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            seen[n] = (Value(tuple(out.shape), out.dtype, out.requires_grad)
                       if isinstance(out, torch.Tensor) else None)
            return out

    args = [values[n.target] for n in graph_module.graph.nodes if n.op == "placeholder"]
    with _quiet(model), torch.enable_grad():
        Recorder(graph_module).run(*args)
    return seen
