"""A stage's end of a dni boundary: its predictor, and the outputs awaiting their true gradient.

Every schedule with a synthetic-gradient boundary (``dni``, and ``mixed`` where a boundary is
dni) keeps one ``SyntheticGradientEnd`` per such boundary. The stage backpropagates ``predict``'s
gradient at once and hands this end what fitting will need (``keep``); the true gradient of
each microbatch arrives later from the next stage, tagged with its step, and is fitted then
(``fit_ready``). A stage whose oldest stored step is ``max_staleness`` steps old waits for
its gradients (``back_pressure``): memory stays bounded. Steps of an untrusted predictor that
fall back to the true gradient are not stored here: the worker keeps them and fits them as
their gradients come due (decoupled.py, [Note: the untrusted fallback]).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Optional

import torch

from pipedni.config import DNIConfig
from pipedni.crossing import Spec, TensorSpec, Value, gradient_spec, trained_indices, trained_specs
from pipedni.dni.predictors import SyntheticGradientTrainer, labels_per_sample
from pipedni.dni.sizing import choose
from pipedni.errors import ConfigError
from pipedni.metrics.records import MetricSpec, StepStats
from pipedni.schedules.actions import ActionKind, action_name
from pipedni.schedules.spec import WorkerContext
from pipedni.schedules.worker import Timers
from pipedni.transport import Kind

Entry = tuple[list[torch.Tensor], Optional[torch.Tensor]]  # a microbatch's trained outputs and its labels (cDNI)


class FitLog:
    """Regression loss, cosine and staleness of the fits done during one step."""

    def __init__(self):
        self.losses: list[float] = []
        self.cosines: list[float] = []
        self.staleness: list[int] = []

    def write(self, stats: StepStats) -> None:
        if self.losses:
            stats.extra["sg_loss"] = sum(self.losses) / len(self.losses)
            stats.extra["sg_cosine"] = sum(self.cosines) / len(self.cosines)
        if self.staleness:
            stats.extra["staleness"] = sum(self.staleness) / len(self.staleness)


class SyntheticGradientEnd:
    """The predictor of the boundary after ``ctx.stage`` and the store of steps awaiting their
    true gradients (oldest first).

    A boundary of several tensors (a model cut by pipedni.split) has a predictor for each tensor
    that needs a gradient (a hidden state, a skip), each fitted on that tensor's true gradient;
    the others (masks, ids) need none. One predictor per tensor, not one over their
    concatenation: the tensors differ in shape (a feature map beside a vector), and each gets
    the predictor kind that fits it. The stage trusts this end when it trusts every predictor."""

    def __init__(self, ctx: WorkerContext, cfg: DNIConfig, microbatches: int):
        self.transport, self.cfg = ctx.transport, cfg
        self.gradient: Spec = gradient_spec(ctx.shapes.output)  # what a true gradient message carries
        self.indices = trained_indices(ctx.shapes.output)  # None: a bare tensor
        self.sgs = [make_predictor(ctx, cfg, microbatches, spec) for spec in trained_specs(ctx.shapes.output)]
        self.store: OrderedDict[int, dict[int, Entry]] = OrderedDict()  # step -> {microbatch: entry}
        self.log, self.step = FitLog(), 0

    def begin(self, step: int) -> None:
        """A new step: fits are logged for it and their staleness counted from it."""
        self.log, self.step = FitLog(), step

    def labels(self, targets: torch.Tensor) -> Optional[torch.Tensor]:
        return targets if self.cfg.condition_on_labels else None

    def predict(self, h: Value, labels: Optional[torch.Tensor]) -> Value:
        """The synthetic gradient of ``h``, as the gradient message would carry it."""
        grads = tuple(sg.predict(t, labels) for sg, t in zip(self.sgs, self._trained(h)))
        return grads[0] if self.indices is None else grads

    def _trained(self, h: Value | list[torch.Tensor]) -> list[torch.Tensor]:
        """The tensors of ``h`` whose gradients the predictors learn (a list: stored already)."""
        if isinstance(h, list):
            return h
        return [h[i] for i in self.indices] if isinstance(h, tuple) else [h]

    @property
    def trusted(self) -> bool:
        """Whether the stage updates from the predictors now (see [Note: trusting the predictor])."""
        return all(sg.trusted for sg in self.sgs)

    def fit(self, h: Value | list[torch.Tensor], labels: Optional[torch.Tensor], grad: Value, staleness: int) -> None:
        grads = grad if isinstance(grad, tuple) else (grad,)
        fits = [sg.fit(t, labels, g) for sg, t, g in zip(self.sgs, self._trained(h), grads)]
        self.log.losses.append(sum(loss for loss, _ in fits) / len(fits))
        self.log.cosines.append(sum(cosine for _, cosine in fits) / len(fits))
        self.log.staleness.append(staleness)

    def keep(self, step: int, entries: dict[int, Optional[Entry]]) -> None:
        """What fitting the true gradients of ``step``'s microbatches will need (None: nothing yet;
        a microbatch trained on a predicted input is kept when its true activation has come, so
        an older step may be added after a newer one: the store stays in step order)."""
        entries = {mb: (self._trained(entry[0]), entry[1]) for mb, entry in entries.items() if entry is not None}
        if not entries:
            return
        newest = next(reversed(self.store), step)
        self.store.setdefault(step, {}).update(entries)
        if step < newest:
            self.store = OrderedDict(sorted(self.store.items()))

    def _fit_arrived(self, step: int, microbatch: int, grad: torch.Tensor) -> None:
        pending = self.store[step]
        self.fit(*pending.pop(microbatch), grad, self.step - step)
        if not pending:
            del self.store[step]

    def _oldest(self) -> tuple[int, int]:
        """The step and microbatch of the oldest output awaiting its gradient."""
        step, pending = next(iter(self.store.items()))
        return step, next(iter(pending))

    def _recv(self, step: int, microbatch: int) -> Value:
        return self.transport.recv("next", Kind.GRADIENT, step, microbatch, self.gradient)

    def fit_ready(self, before: Optional[int] = None) -> None:
        """Fit every gradient that has already arrived for a stored step older than ``before``
        (the oldest step whose fit the worker still owes: fits stay in step order), without waiting."""
        steps = {s for s in self.store if before is None or s < before}
        for header, grad in self.transport.recv_ready("next", Kind.GRADIENT, steps):
            self._fit_arrived(header.step, header.microbatch, grad)

    def back_pressure(self, timers: Timers) -> None:
        """While the oldest step awaiting its gradients is ``max_staleness`` steps old or more, wait for it."""
        while self.store and self.step - next(iter(self.store)) >= self.cfg.max_staleness:
            step, mb = self._oldest()
            grad = timers.run_as(action_name(ActionKind.RECV_B, mb, step, self.step), "wait_grad", self._recv, step, mb)
            timers.run("compute", self._fit_arrived, step, mb, grad)

    def drain(self) -> None:
        """Take and fit every gradient still owed, so nothing is left in flight."""
        while self.store:
            step, mb = self._oldest()
            self._fit_arrived(step, mb, self._recv(step, mb))

    def write(self, stats: StepStats) -> None:
        self.log.write(stats)
        stats.extra["store_size"] = len(self.store)

    def held_bytes(self) -> int:
        """The store: outputs (and labels, for cDNI) of the microbatches awaiting their gradient."""
        return sum(sum(t.nbytes for t in outputs) + (0 if labels is None else labels.nbytes)
                   for pending in self.store.values() for outputs, labels in pending.values())

    @property
    def sg(self) -> SyntheticGradientTrainer:
        """The predictor of a boundary of one trained tensor."""
        assert len(self.sgs) == 1, f"{len(self.sgs)} predictors"
        return self.sgs[0]

    def state_dict(self) -> dict:
        """One predictor's state (as before boundaries of several tensors), or each one's."""
        return self.sgs[0].state_dict() if len(self.sgs) == 1 else {"predictors": [sg.state_dict() for sg in self.sgs]}

    def load_state_dict(self, state: dict) -> None:
        for sg, own in zip(self.sgs, state["predictors"] if len(self.sgs) > 1 else [state]):
            sg.load_state_dict(own)


def make_predictor(ctx: WorkerContext, cfg: DNIConfig, microbatches: int, output: TensorSpec) -> SyntheticGradientTrainer:
    """The predictor for the stage's output tensor ``output``: the configured kind, or the one
    ``auto`` picks by cost (printed; see [Note: predictor budget])."""
    stage, batch_size = ctx.stage, ctx.cfg.data.batch_size
    feature_shape = tuple(output.shape[1:])
    check_labels(stage.stage_index, output.describe(), feature_shape, ctx.labels_shape)
    if cfg.kind != "auto":
        return SyntheticGradientTrainer(feature_shape, ctx.num_classes, cfg, stage.device, batch_size,
                                        labels_per_sample(feature_shape), precision=stage.precision)
    sg, choice = choose(stage, ctx.shapes, output, cfg, ctx.num_classes, batch_size, microbatches, ctx.labels_shape)
    print(choice, flush=True)
    return sg


def check_labels(stage_index: int, boundary: str, feature_shape: tuple[int, ...],
                 labels_shape: tuple[int, ...]) -> None:
    """A sequence boundary [B, T, C] needs one label per position: fail at start-up otherwise."""
    expected, actual = labels_per_sample(feature_shape), math.prod(labels_shape)
    if expected != actual:
        raise ConfigError(
            f"dni: stage {stage_index}'s output {boundary} is a "
            f"{'sequence' if expected > 1 else 'per-sample'} boundary expecting "
            f"{expected} label(s) per sample, but the data has {actual}; "
            "synthetic gradients on [B, T, C] need one label per position (a language model)"
        )


METRICS = (
    MetricSpec("sg_loss", "sg_loss", "ema", "sg loss", ".2g"),
    MetricSpec("sg_cosine", "sg_cosine", "ema", "sg cos", ".2f"),
    MetricSpec("staleness", "mean_staleness", "ema", "stale", ".1f"),
    MetricSpec("store_size", "max_store_size", "max", "store", "d"),
    MetricSpec("sg_untrusted", "untrusted_steps", "sum", "untrusted", "d"),
)
