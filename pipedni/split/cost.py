"""What each layer costs its stage per microbatch, measured, for ``partition.method: time``.

[Note: partition by time]
Parameters are a poor proxy for time: a convolution on large feature maps, attention over a
long sequence or a parameter-free layer costs far more per parameter than a wide Linear. ``time``
runs one microbatch of the real data through deep copies of the layers one by one on the
stage's device (torchgpipe's ``balance_by_time``) and times each layer's forward+backward, plus
its share of an optimizer step (one step per ``train.microbatches`` microbatches; with the
parameter copies ``async`` makes every step: see decoupled._async_copies). A ``dni`` stage
also predicts and fits a synthetic gradient for its output: with an explicit ``dni.kind`` the
cut before layer j costs that predictor on layer j-1's output, timed; ``dni.kind: auto`` sizes
each predictor to at most ``sizing.BUDGET`` of its stage, so every stage but the last counts
1 + BUDGET times its layers. The exact min-max split (``partition.min_max_balance``) then
minimises the slowest stage. Timings differ between ranks and runs, so only rank 0 measures and
broadcasts the balance (``engine``), and the saved config.yaml records it: a rerun from that
file cuts alike without timing anything. A model that is no Sequential is timed the same way,
its "layers" being the runs of blocks ``pipedni.split`` may cut between (each a stage module
that takes and returns tuples; a tuple's predictors are summed), and the split points are
broadcast and recorded instead of a balance.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from pipedni.config import Config, DNIConfig, OptimConfig
from pipedni.crossing import Spec, TensorSpec, Value, describe_spec, input_slice, input_to, spec_of, trained_specs
from pipedni.dni.predictors import SyntheticGradientTrainer, labels_per_sample
from pipedni.dni.sizing import BUDGET, median_sec, predictor_sec
from pipedni.errors import ConfigError, PartitionError
from pipedni.optim import build_optimizer
from pipedni.split.balance import Sample, min_max_balance, part_costs
from pipedni.stage import loss_fn, num_params

if TYPE_CHECKING:
    from pipedni.data import Dataset
    from pipedni.schedules.spec import ScheduleSpec

ITERS = 5  # timed calls per measurement (the median counts), after one untimed warm-up call
ROUNDS = 3  # measurements of each layer, interleaved (the least counts: see _timed_layers)


@dataclass(frozen=True)
class LayerCosts:
    """Seconds per microbatch of ``rows`` samples: each layer's, each cut's, and the factor on
    every stage but the last (``min_max_balance``'s cost model)."""

    names: tuple[str, ...]
    layer_sec: tuple[float, ...]
    cut_sec: tuple[float, ...]  # cut_sec[j]: paid by a stage that ends before layer j (0 at j = 0)
    rows: int
    scale: float = 1.0
    cut_error: str = ""  # why a cut is impossible (an infinite cut_sec), for the error message

    def balance(self, num_stages: int) -> list[int]:
        """The split whose slowest stage is fastest; PartitionError when every split has an impossible cut."""
        balance = min_max_balance(self.layer_sec, num_stages, self.cut_sec, self.scale)
        if math.isinf(max(self.stage_sec(balance))):
            raise PartitionError(
                f"partition.method = 'time': no split of [{', '.join(self.names)}] into {num_stages} stages has a "
                f"predictor at every cut ({self.cut_error}); set partition.balance or another dni.kind"
            )
        return balance

    def stage_sec(self, balance: Sequence[int]) -> list[float]:
        return part_costs(self.layer_sec, balance, self.cut_sec, self.scale)

    def describe(self, balance: Sequence[int], parameter_balance: Sequence[int]) -> str:
        """The line rank 0 prints under the stages: what was measured and what it changed."""
        stages = ", ".join(_ms(s) for s in self.stage_sec(balance))
        layers = ", ".join(f"{name} {_ms(s)}" for name, s in zip(self.names, self.layer_sec))
        extra = ""
        if any(self.cut_sec):
            cuts = ", ".join(f"{name} {_ms(s)}" for name, s in zip(self.names, self.cut_sec[1:]))
            extra += f"; predictor ms at the cut after {cuts}"
        if self.scale != 1.0:
            extra += f"; every stage but the last x {self.scale:g} for its dni.kind auto predictor"
        same = ("the same as the parameter split" if list(balance) == list(parameter_balance)
                else f"differs from the parameter split {list(parameter_balance)}")
        return (f"partition.method time: stage costs {stages} ms per microbatch of {self.rows} samples "
                f"(layer costs ms: {layers}{extra}); {same}")


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


Layers = Union[nn.Sequential, Sequence[tuple[str, nn.Module]]]  # named, in order: a split model's runs of blocks


def _named(layers: Layers) -> list[tuple[str, nn.Module]]:
    return list(layers.named_children()) if isinstance(layers, nn.Sequential) else list(layers)


def layer_costs(layers: Layers, sample: Sample, optim: Optional[OptimConfig] = None,
                num_microbatches: int = 1, copies: int = 0) -> LayerCosts:
    """Each layer's forward+backward on ``sample`` (on its device; without labels, the last
    layer's backward starts from ones) plus its share of an ``optim`` step; the layers, their
    gradients and the global RNG are left as they were."""
    named = _named(layers)
    with _own_rng(_device(sample[0])):
        seconds, _ = _timed_layers(named, sample, optim or OptimConfig(), num_microbatches, copies)
    return LayerCosts(tuple(name for name, _ in named), tuple(seconds), (0.0,) * len(named), _rows(sample[0]))


def run_costs(cfg: Config, spec: ScheduleSpec, layers: Layers, sample: Sample, num_classes: int,
              num_stages: int) -> LayerCosts:
    """What each layer and cut costs a stage of this run, on ``sample``, one microbatch (see
    [Note: partition by time])."""
    named, device = _named(layers), _device(sample[0])
    copies = spec.copies_weights(cfg)
    predictors = spec.predictor_boundaries(cfg, num_stages)
    with _own_rng(device):
        seconds, outputs = _timed_layers(named, sample, cfg.optim, cfg.train.microbatches, copies)
        costs = LayerCosts(tuple(name for name, _ in named), tuple(seconds), (0.0,) * len(named), _rows(sample[0]))
        if predictors:
            costs = _with_predictors(costs, cfg, outputs[:-1], num_classes, tuple(sample[1].shape[1:]), device,
                                     predictors)
    return costs


def microbatch_of(cfg: Config, train_set: Dataset, device: torch.device) -> Sample:
    """The first microbatch of the training set (inputs and labels) on ``device``."""
    rows = max(1, cfg.data.batch_size // cfg.train.microbatches)
    return input_to(input_slice(train_set.inputs, 0, rows), device), train_set.targets[:rows].to(device)


def _with_predictors(costs: LayerCosts, cfg: Config, outputs: Sequence[Spec], num_classes: int,
                     labels_shape: tuple[int, ...], device: torch.device, predictors: Sequence[int]) -> LayerCosts:
    """``costs`` with the synthetic-gradient predictors of boundaries ``predictors``: timed at
    every cut for an explicit ``dni.kind`` (the costliest where ``dni.boundaries`` differ), or the
    ``auto`` budget. Every cut and stage pays it, even under ``mixed`` where only some boundaries
    are dni: which boundary lands on which cut is what the split decides."""
    boundaries = [cfg.dni.for_boundary(i) for i in predictors]
    explicit = [b for i, b in enumerate(boundaries) if b.kind != "auto" and b not in boundaries[:i]]
    if explicit:
        cuts, error = _predictor_costs(outputs, explicit, num_classes, cfg.data.batch_size, costs.rows,
                                       labels_shape, device)
        costs = replace(costs, cut_sec=(0.0, *cuts), cut_error=error)
    if any(b.kind == "auto" for b in boundaries):  # see [Note: predictor budget] in dni/sizing.py
        costs = replace(costs, scale=1.0 + BUDGET)
    return costs


def time_balance(cfg: Config, spec: ScheduleSpec, model: nn.Sequential, train_set: Dataset, device: torch.device,
                 num_stages: int) -> tuple[list[int], str]:
    """The balance ``partition.method: time`` gives this run, and the line saying why."""
    costs = run_costs(cfg, spec, model, microbatch_of(cfg, train_set, device), train_set.num_classes, num_stages)
    balance = costs.balance(num_stages)
    return balance, costs.describe(balance, min_max_balance([num_params(layer) for layer in model], num_stages))


def _timed_layers(layers: list[tuple[str, nn.Module]], sample: Sample, optim: OptimConfig, num_microbatches: int,
                  copies: int) -> tuple[list[float], list[Spec]]:
    """Per layer: seconds of forward+backward plus a ``1 / num_microbatches`` share of its
    optimizer step (and weight copies), and the spec of its output.

    The least of ``ROUNDS`` passes over all the layers counts: on a shared machine a burst of
    other work can stretch every call of one short measurement, but rarely the same layer in
    every pass.
    """
    passes = [_one_pass(layers, sample, optim, num_microbatches, copies) for _ in range(ROUNDS)]
    return [min(times) for times in zip(*(seconds for seconds, _ in passes))], passes[0][1]


def _one_pass(layers: list[tuple[str, nn.Module]], sample: Sample, optim: OptimConfig, num_microbatches: int,
              copies: int) -> tuple[list[float], list[Spec]]:
    x, targets = sample
    seconds, outputs = [], []
    for index, (_, original) in enumerate(layers):
        layer = copy.deepcopy(original).to(_device(x))  # its buffers and gradients change, not the model's
        x = _differentiable(x, index > 0)
        is_last = index == len(layers) - 1
        step = _step_sec(layer, optim, copies) / num_microbatches
        seconds.append(_forward_backward_sec(layer, x, targets if is_last else None) + step)
        x = _call(layer, x)  # with autograd on: a tuple's tensors say which need a gradient
        outputs.append(spec_of(x, _rows(x)))
    return seconds, outputs


def _call(layer: nn.Module, x: Value) -> Value:
    return layer(*x) if isinstance(x, tuple) else layer(x)


def _needing(out: Value) -> list[torch.Tensor]:
    """The outputs a backward starts from: those that need a gradient."""
    return [o for o in (out if isinstance(out, tuple) else (out,)) if o.requires_grad]


def _differentiable(x: Value, inner: bool) -> Value:
    """``x`` as a layer receives it: detached; past the first layer, a float tensor needs a
    gradient (in a tuple, a tensor that needed one)."""
    if isinstance(x, tuple):
        return tuple(t.detach().requires_grad_(inner and t.requires_grad) for t in x)
    return x.detach().requires_grad_(inner and x.is_floating_point())


def _device(x: Value) -> torch.device:
    return (x[0] if isinstance(x, tuple) else x).device


def _rows(x: Value) -> int:
    return len(x[0] if isinstance(x, tuple) else x)


@contextlib.contextmanager
def _own_rng(device: torch.device) -> Iterator[None]:
    """Random draws inside (dropout, predictor weights, fake gradients) leave the global RNG as
    it was: rank 0 alone times, and its dropout must not depend on whether it did."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield


def _forward_backward_sec(layer: nn.Module, x: Value, targets: Optional[torch.Tensor]) -> float:
    grads = [torch.ones_like(o) for o in _needing(_call(layer, x))]  # dense compute ignores the values

    def run(_: int) -> None:
        out = _call(layer, x)
        if targets is not None:
            loss_fn(out, targets).backward()
        elif grads:
            torch.autograd.backward(_needing(out), grads)

    return median_sec(run, iters=ITERS)


def _step_sec(layer: nn.Module, optim: OptimConfig, copies: int) -> float:
    params = [p for p in layer.parameters() if p.requires_grad]
    if not params:
        return 0.0
    optimizer = build_optimizer(params, optim)
    for p in params:
        p.grad = torch.zeros_like(p)

    def run(_: int) -> None:
        optimizer.step()
        for _ in range(copies):
            for p in params:
                p.detach().clone()

    return median_sec(run, iters=ITERS)


def _predictor_costs(outputs: Sequence[Spec], options: Sequence[DNIConfig], num_classes: int,
                     batch_size: int, rows: int, labels_shape: tuple[int, ...],
                     device: torch.device) -> tuple[list[float], str]:
    """Per layer output: the costliest of ``options``' predict+fit on it, summed over a tuple's
    tensors that need a gradient (a predictor each), infinite where one cannot run; and the
    first reason one could not."""
    costs, known, error = [], {}, ""
    for output in outputs:
        trained = trained_specs(output)
        if not trained:
            costs.append(math.inf)
            error = error or f"nothing in {describe_spec(output)} needs a gradient to predict"
        for spec in trained:
            key = (spec.shape[1:], spec.dtype)
            if key not in known:
                timed = [_one_predictor_sec(spec, option, num_classes, batch_size, rows, labels_shape, device)
                         for option in options]
                known[key] = max(seconds for seconds, _ in timed)
                error = error or next((reason for _, reason in timed if reason), "")
        if trained:
            costs.append(sum(known[(spec.shape[1:], spec.dtype)] for spec in trained))
    return costs, error


def _one_predictor_sec(spec: TensorSpec, option: DNIConfig, num_classes: int, batch_size: int, rows: int,
                       labels_shape: tuple[int, ...], device: torch.device) -> tuple[float, str]:
    feature_shape = tuple(spec.shape[1:])
    if not spec.dtype.is_floating_point:
        return math.inf, f"a {spec.describe()} output has no gradient to predict"
    try:
        trainer = SyntheticGradientTrainer(feature_shape, num_classes, option, device, batch_size,
                                           labels_per_sample(feature_shape))
        return min(predictor_sec(trainer, spec, rows, labels_shape, device) for _ in range(ROUNDS)), ""
    except ConfigError as err:  # this kind cannot serve this boundary: no stage may end here
        return math.inf, str(err)
