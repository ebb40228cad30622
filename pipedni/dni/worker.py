"""The DNI schedule: every stage updates at once from a synthetic gradient (backward unlocking).

One step of stage i (see "The DNI step" in docs/design.md):

    x_t = batch t's inputs (first stage) or the activation of step t from stage i-1
    h_t = f_i(x_t);  send h_t to stage i+1 (non-blocking)
    backward: the loss (last stage) or the synthetic gradient sg_i(h_t, y_t) (others)
    send x_t.grad to stage i-1, tagged t: its regression target (bootstrapped unless from the last stage)
    optimizer step
    remember (t, h_t, y_t); fit sg_i on every gradient that has already arrived

Nothing waits for a gradient unless the store of steps awaiting one exceeds
``dni.max_staleness``: then the stage blocks on the oldest (back-pressure, bounded memory).
Each non-last stage receives exactly one gradient per microbatch of every step, so ``finish``
knows what is owed. The first ``dni.warmup_steps`` steps run locked 1F1B whose plan fits the
predictor on each true gradient before its backward uses it (a ``FIT`` action).

[Note: DNI microbatches]
With ``dni.microbatches = M`` a stage runs the forward and the synthetic backward of each
microbatch before starting the next, and steps its optimizer once per batch: the same update
as one whole-batch pass (the predictor works per sample, the last stage weights each loss by
its share), but only one microbatch's activations are alive at a time. A locked pipeline
cannot do this: GPipe keeps all M microbatches for the backward pass that comes later, 1F1B up
to N - i of them. Each microbatch also travels on its own, so the next stage starts sooner.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Optional

import torch

from pipedni.dni.predictors import SyntheticGradientTrainer, labels_per_sample
from pipedni.dni.sizing import choose
from pipedni.errors import ConfigError
from pipedni.metrics.records import MetricSpec, StepStats
from pipedni.schedules.executor import LockedExecutor
from pipedni.schedules.spec import ScheduleSpec, WorkerContext
from pipedni.schedules.worker import Microbatch, Timers, Worker, grad_norm, split_batch
from pipedni.transport import Kind


class _FitLog:
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


class DNIWorker(Worker):
    """``train.schedule: dni``: every stage updates at once from its synthetic gradient."""

    def __init__(self, ctx: WorkerContext):
        super().__init__(ctx)
        stage, cfg = self.stage, ctx.cfg
        self.dni, self.num_microbatches = cfg.dni.for_boundary(stage.stage_index), cfg.dni.microbatches
        self.warmup = LockedExecutor(ctx, "1f1b", cfg.train.microbatches, whole_model_norm=False,
                                     fit=self._fit_true_gradient)
        self.sg = None if stage.is_last else self._predictor(ctx)
        # step -> {microbatch: (output, labels)} awaiting their gradient, oldest step first
        self.store: OrderedDict[int, dict[int, tuple[torch.Tensor, Optional[torch.Tensor]]]] = OrderedDict()
        self._log = _FitLog()

    def _predictor(self, ctx: WorkerContext) -> SyntheticGradientTrainer:
        """This stage's predictor: the configured kind, or the one ``auto`` picks by cost."""
        stage, batch_size = self.stage, ctx.cfg.data.batch_size
        feature_shape = tuple(self.shapes.output.shape[1:])
        _check_labels(stage.stage_index, self.shapes.output.describe(), feature_shape, ctx.labels_shape)
        if self.dni.kind != "auto":
            return SyntheticGradientTrainer(feature_shape, ctx.num_classes, self.dni, stage.device, batch_size,
                                            labels_per_sample(feature_shape))
        sg, choice = choose(stage, self.shapes, self.dni, ctx.num_classes, batch_size, self.num_microbatches,
                            ctx.labels_shape)  # see [Note: predictor budget]
        print(choice, flush=True)
        return sg

    def _labels(self, targets: torch.Tensor) -> Optional[torch.Tensor]:
        return targets if self.dni.condition_on_labels else None

    # ------------------------------------------------------------------ fitting

    def _fit(self, h: torch.Tensor, labels: Optional[torch.Tensor], grad: torch.Tensor) -> None:
        loss, cosine = self.sg.fit(h, labels, grad)
        self._log.losses.append(loss)
        self._log.cosines.append(cosine)

    def _fit_true_gradient(self, h: torch.Tensor, piece: Microbatch, grad: torch.Tensor) -> None:
        """Warm-up's FIT action: the exact gradient of ``h``, before the backward uses it."""
        self._fit(h, self._labels(piece.targets), grad)
        self._log.staleness.append(0)

    def _fit_arrived(self, step: int, microbatch: int, grad: torch.Tensor) -> None:
        pending = self.store[step]
        self._fit(*pending.pop(microbatch), grad)
        if not pending:
            del self.store[step]
        self._log.staleness.append(self._step - step)

    def _fit_ready(self) -> None:
        for header, grad in self.transport.recv_ready("next", Kind.GRADIENT):
            self._fit_arrived(header.step, header.microbatch, grad)

    def _wait_oldest(self) -> tuple[int, int, torch.Tensor]:
        step, pending = next(iter(self.store.items()))
        microbatch = next(iter(pending))
        return step, microbatch, self.transport.recv("next", Kind.GRADIENT, step, microbatch, self.shapes.output)

    # ------------------------------------------------------------------ training

    def train_step(self, step: int, inputs: Optional[torch.Tensor], targets: torch.Tensor) -> StepStats:
        self._step, self._log = step, _FitLog()
        if step < self.dni.warmup_steps:
            stats = self.warmup.run(step, inputs, targets)
        else:
            stats = self._decoupled_step(step, inputs, targets)
        self._log.write(stats)
        if not self.stage.is_last:
            stats.extra["store_size"] = len(self.store)
        return stats

    def _decoupled_step(self, step: int, inputs: Optional[torch.Tensor], targets: torch.Tensor) -> StepStats:
        stage, timers = self.stage, Timers(self.transport)
        pending: dict[int, tuple] = {}
        for mb, piece in enumerate(split_batch(stage, inputs, targets, self.num_microbatches)):
            entry = self._microbatch(step, mb, piece, timers)  # see [Note: DNI microbatches]
            if entry is not None:
                pending[mb] = entry
        norm = timers.run("compute", grad_norm, stage)  # this stage's own: no barrier across stages
        timers.run("compute", stage.step, norm)
        assert not stage.in_flight, "a DNI step left microbatches without backward"
        if not stage.is_last:
            self.store[step] = pending
            timers.run("compute", self._fit_ready)
            while len(self.store) > self.dni.max_staleness:  # back-pressure: wait for the oldest
                timers.run("compute", self._fit_arrived, *timers.run("wait_grad", self._wait_oldest))
        return timers.stats(step, stage, norm)

    def _microbatch(self, step: int, mb: int, piece: Microbatch,
                    timers: Timers) -> Optional[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """Forward and backward of one microbatch; returns what fitting its gradient will need."""
        stage, transport = self.stage, self.transport
        x = piece.inputs
        if not stage.is_first:
            x = timers.run("wait_input", transport.recv, "prev", Kind.ACTIVATION, step, mb, self.shapes.input)
        h = timers.run("compute", stage.forward, mb, x, piece.targets if stage.is_last else None, piece.weight)
        entry = None
        if stage.is_last:
            grad_in = timers.run("compute", stage.backward, mb)
        else:
            transport.send("next", Kind.ACTIVATION, step, mb, h)
            labels = self._labels(piece.targets)
            grad_in = timers.run("compute", stage.backward, mb, timers.run("compute", self.sg.predict, h, labels))
            entry = (h, labels)
        if not stage.is_first:
            transport.send("prev", Kind.GRADIENT, step, mb, grad_in)
        return entry

    def finish(self) -> None:
        """Take and fit every gradient still owed, so nothing is left in flight."""
        while self.store:
            self._fit_arrived(*self._wait_oldest())

    def held_bytes(self) -> int:
        """The store: outputs (and labels, for cDNI) of the microbatches awaiting their gradient."""
        return sum(t.nbytes for pending in self.store.values() for entry in pending.values()
                   for t in entry if t is not None)

    def extra_state(self) -> dict:
        return {} if self.sg is None else {"synthetic_gradient": self.sg.state_dict()}


def _check_labels(stage_index: int, boundary: str, feature_shape: tuple[int, ...],
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
)
SPEC = ScheduleSpec("dni", "DNI: every stage updates at once from a synthetic gradient (dni.* settings)",
                    build=DNIWorker, min_stages=2, locked=False, metrics=METRICS,
                    wait_grad_header="backpressure s")
