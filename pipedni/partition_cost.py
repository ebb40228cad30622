"""What each layer costs its stage per microbatch, measured, for ``partition.method: time``.

[Note: partition by time]
Parameters are a poor proxy for time: a convolution on large feature maps, attention over a
long sequence or a parameter-free layer costs far more per parameter than a wide Linear. ``time``
runs one microbatch of the real data through deep copies of the layers one by one on the
stage's device (torchgpipe's ``balance_by_time``) and times each layer's forward+backward, plus
its share of an optimizer step (one step per ``train.microbatches`` microbatches; with the
parameter copies ``async`` makes every step: see boundaries._async_copies). A ``dni`` stage
also predicts and fits a synthetic gradient for its output: with an explicit ``dni.kind`` the
cut before layer j costs that predictor on layer j-1's output, timed; ``dni.kind: auto`` sizes
each predictor to at most ``sizing.BUDGET`` of its stage, so every stage but the last counts
1 + BUDGET times its layers. The exact min-max split (``partition.min_max_balance``) then
minimises the slowest stage. Timings differ between ranks and runs, so only rank 0 measures and
broadcasts the balance (``engine``), and the saved config.yaml records it: a rerun from that
file cuts alike without timing anything.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Iterator, Optional, Sequence

import torch
from torch import nn

from pipedni.boundary import TensorSpec
from pipedni.config import Config, DNIConfig, OptimConfig
from pipedni.dni.predictors import SyntheticGradientTrainer, labels_per_sample
from pipedni.dni.sizing import BUDGET, median_sec, predictor_sec
from pipedni.errors import ConfigError, PartitionError
from pipedni.optim import build_optimizer
from pipedni.partition import Sample, min_max_balance, num_params, part_costs
from pipedni.schedules import registry
from pipedni.stage import loss_fn

if TYPE_CHECKING:
    from pipedni.data import Dataset

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


def layer_costs(model: nn.Sequential, sample: Sample, optim: Optional[OptimConfig] = None,
                num_microbatches: int = 1, copies: int = 0) -> LayerCosts:
    """Each layer's forward+backward on ``sample`` (on its device) plus its share of an ``optim``
    step; the model, its gradients and the global RNG are left as they were."""
    with _own_rng(sample[0].device):
        seconds, _ = _timed_layers(model, sample, optim or OptimConfig(), num_microbatches, copies)
    return LayerCosts(tuple(name for name, _ in model.named_children()), tuple(seconds),
                      (0.0,) * len(model), len(sample[0]))


def run_costs(cfg: Config, model: nn.Sequential, train_set: Dataset, device: torch.device,
              num_stages: int) -> LayerCosts:
    """What each layer and cut costs a stage of this run (see [Note: partition by time])."""
    m = cfg.train.microbatches
    rows = max(1, cfg.data.batch_size // m)
    sample = (train_set.inputs[:rows].to(device), train_set.targets[:rows].to(device))
    spec = registry.get(cfg.train.schedule)  # what its stages pay beyond their layers
    copies = spec.copies_weights(cfg)
    predictors = spec.predictor_boundaries(cfg, num_stages)
    with _own_rng(device):
        seconds, outputs = _timed_layers(model, sample, cfg.optim, m, copies)
        costs = LayerCosts(tuple(name for name, _ in model.named_children()), tuple(seconds),
                           (0.0,) * len(model), len(sample[0]))
        if predictors:
            costs = _with_predictors(costs, cfg, outputs[:-1], train_set, device, predictors)
    return costs


def _with_predictors(costs: LayerCosts, cfg: Config, outputs: Sequence[TensorSpec], train_set: Dataset,
                     device: torch.device, predictors: Sequence[int]) -> LayerCosts:
    """``costs`` with the synthetic-gradient predictors of boundaries ``predictors``: timed at
    every cut for an explicit ``dni.kind`` (the costliest where ``dni.boundaries`` differ), or the
    ``auto`` budget. Every cut and stage pays it, even under ``mixed`` where only some boundaries
    are dni: which boundary lands on which cut is what the split decides."""
    boundaries = [cfg.dni.for_boundary(i) for i in predictors]
    explicit = [b for i, b in enumerate(boundaries) if b.kind != "auto" and b not in boundaries[:i]]
    if explicit:
        cuts, error = _predictor_costs(outputs, explicit, train_set.num_classes, cfg.data.batch_size, costs.rows,
                                       tuple(train_set.targets.shape[1:]), device)
        costs = replace(costs, cut_sec=(0.0, *cuts), cut_error=error)
    if any(b.kind == "auto" for b in boundaries):  # see [Note: predictor budget] in dni/sizing.py
        costs = replace(costs, scale=1.0 + BUDGET)
    return costs


def time_balance(cfg: Config, model: nn.Sequential, train_set: Dataset, device: torch.device,
                 num_stages: int) -> tuple[list[int], str]:
    """The balance ``partition.method: time`` gives this run, and the line saying why."""
    costs = run_costs(cfg, model, train_set, device, num_stages)
    balance = costs.balance(num_stages)
    return balance, costs.describe(balance, min_max_balance([num_params(layer) for layer in model], num_stages))


def _timed_layers(model: nn.Sequential, sample: Sample, optim: OptimConfig, num_microbatches: int,
                  copies: int) -> tuple[list[float], list[TensorSpec]]:
    """Per layer: seconds of forward+backward plus a ``1 / num_microbatches`` share of its
    optimizer step (and weight copies), and the spec of its output.

    The least of ``ROUNDS`` passes over all the layers counts: on a shared machine a burst of
    other work can stretch every call of one short measurement, but rarely the same layer in
    every pass.
    """
    passes = [_one_pass(model, sample, optim, num_microbatches, copies) for _ in range(ROUNDS)]
    return [min(times) for times in zip(*(seconds for seconds, _ in passes))], passes[0][1]


def _one_pass(model: nn.Sequential, sample: Sample, optim: OptimConfig, num_microbatches: int,
              copies: int) -> tuple[list[float], list[TensorSpec]]:
    x, targets = sample
    seconds, outputs = [], []
    for index, original in enumerate(model):
        layer = copy.deepcopy(original).to(x.device)  # its buffers and gradients change, not the model's
        x = x.detach().requires_grad_(index > 0 and x.is_floating_point())
        is_last = index == len(model) - 1
        step = _step_sec(layer, optim, copies) / num_microbatches
        seconds.append(_forward_backward_sec(layer, x, targets if is_last else None) + step)
        with torch.no_grad():
            x = layer(x)
        outputs.append(TensorSpec(tuple(x.shape), x.dtype))
    return seconds, outputs


@contextlib.contextmanager
def _own_rng(device: torch.device) -> Iterator[None]:
    """Random draws inside (dropout, predictor weights, fake gradients) leave the global RNG as
    it was: rank 0 alone times, and its dropout must not depend on whether it did."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield


def _forward_backward_sec(layer: nn.Module, x: torch.Tensor, targets: Optional[torch.Tensor]) -> float:
    with torch.no_grad():
        grad = torch.ones_like(layer(x))  # a gradient of the output's shape (dense compute ignores values)

    def run(_: int) -> None:
        out = layer(x)
        if targets is not None:
            loss_fn(out, targets).backward()
        elif out.requires_grad:
            out.backward(grad)

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


def _predictor_costs(outputs: Sequence[TensorSpec], options: Sequence[DNIConfig], num_classes: int,
                     batch_size: int, rows: int, labels_shape: tuple[int, ...],
                     device: torch.device) -> tuple[list[float], str]:
    """Per layer output: the costliest of ``options``' predict+fit on it (infinite where one
    cannot run), and the first reason one could not."""
    costs, known, error = [], {}, ""
    for spec in outputs:
        key = (spec.shape[1:], spec.dtype)
        if key not in known:
            timed = [_one_predictor_sec(spec, option, num_classes, batch_size, rows, labels_shape, device)
                     for option in options]
            known[key] = max(seconds for seconds, _ in timed)
            error = error or next((reason for _, reason in timed if reason), "")
        costs.append(known[key])
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
