"""The DNI schedule: every stage updates at once from a synthetic gradient (backward unlocking).

One step of stage i (see "The DNI step" in the design):

    x_t = batch t's inputs (first stage) or the activation of step t from stage i-1
    h_t = f_i(x_t);  send h_t to stage i+1 (non-blocking)
    backward: the loss (last stage) or the synthetic gradient sg_i(h_t, y_t) (others)
    send x_t.grad to stage i-1, tagged t: its regression target (bootstrapped unless from the last stage)
    optimizer step
    remember (t, h_t, y_t); fit sg_i on every gradient that has already arrived

Nothing waits for a gradient unless the store of steps awaiting one exceeds
``dni.max_staleness``: then the stage blocks on the oldest (back-pressure, bounded memory).
Each non-last stage receives exactly one gradient per microbatch of every step, so ``finish``
knows what is owed. The first ``dni.warmup_steps`` steps run locked 1F1B while the predictors
fit true gradients.

[Note: DNI microbatches]
With ``dni.microbatches = M`` a stage runs the forward and the synthetic backward of each
microbatch before starting the next, and steps its optimizer once per batch: the same update
as one whole-batch pass (the predictor works per sample, the last stage weights each loss by
its share), but only one microbatch's activations are alive at a time. A locked pipeline
cannot do this: GPipe keeps all M microbatches for the backward pass that comes later, 1F1B up
to N - i of them. Each microbatch also travels on its own, so the next stage starts sooner.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Optional

import torch

from pipedni.config import Config
from pipedni.stage import Stage
from pipedni.errors import ConfigError
from pipedni.synthetic import SyntheticGradientTrainer, labels_per_sample
from pipedni.transport import Kind, TensorSpec, Transport
from pipedni.worker import EvalResult, StageWorker, StepStats, Timers


class _FitLog:
    """Regression loss, cosine and staleness of the fits done during one step."""

    def __init__(self):
        self.losses: list[float] = []
        self.cosines: list[float] = []
        self.staleness: list[int] = []

    def write(self, stats: StepStats) -> None:
        if self.losses:
            stats.sg_loss = sum(self.losses) / len(self.losses)
            stats.sg_cosine = sum(self.cosines) / len(self.cosines)
        if self.staleness:
            stats.staleness = sum(self.staleness) / len(self.staleness)


class DNIWorker:
    """Same interface as StageWorker (connect, train_step, finish, evaluate) for ``schedule: dni``."""

    def __init__(self, stage: Stage, transport: Transport, cfg: Config):
        self.stage, self.transport, self.cfg = stage, transport, cfg
        self.dni = cfg.dni.for_boundary(stage.stage_index)
        self.locked = StageWorker(stage, transport, "1f1b", cfg.train.microbatches)  # the warm-up
        self.locked.on_gradient = self._fit_true_gradient
        self.sg: Optional[SyntheticGradientTrainer] = None
        # step -> {microbatch: (output, labels)} awaiting their gradient, oldest step first
        self.store: OrderedDict[int, dict[int, tuple[torch.Tensor, Optional[torch.Tensor]]]] = OrderedDict()
        self._log = _FitLog()

    @property
    def num_evals(self) -> int:
        return self.locked.num_evals

    def connect(self, sample_spec: TensorSpec, num_classes: int) -> None:
        self.locked.connect(sample_spec, num_classes)
        if not self.stage.is_last:
            feature_shape = tuple(self.stage.output_spec.shape[1:])
            self.labels_per_sample = labels_per_sample(feature_shape)
            self.sg = SyntheticGradientTrainer(feature_shape, num_classes, self.dni, self.stage.device,
                                               self.cfg.data.batch_size, self.labels_per_sample)

    def _labels(self, targets: torch.Tensor) -> Optional[torch.Tensor]:
        return targets if self.dni.condition_on_labels else None

    # ------------------------------------------------------------------ fitting

    def _fit(self, h: torch.Tensor, labels: Optional[torch.Tensor], grad: torch.Tensor) -> None:
        loss, cosine = self.sg.fit(h, labels, grad)
        self._log.losses.append(loss)
        self._log.cosines.append(cosine)

    def _fit_true_gradient(self, h: torch.Tensor, targets: torch.Tensor, grad: torch.Tensor) -> None:
        """Warm-up: the locked schedule hands over each exact gradient before using it."""
        self._fit(h, self._labels(targets), grad)
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
        return step, microbatch, self.transport.recv("next", Kind.GRADIENT, step, microbatch, self.stage.output_spec)

    # ------------------------------------------------------------------ training

    def train_step(self, step: int, inputs: Optional[torch.Tensor], targets: torch.Tensor) -> StepStats:
        self._step, self._log = step, _FitLog()
        if self.sg is not None and targets[0].numel() != self.labels_per_sample:
            raise ConfigError(
                f"dni: stage {self.stage.stage_index}'s output {self.stage.output_spec.describe()} is a "
                f"{'sequence' if self.labels_per_sample > 1 else 'per-sample'} boundary expecting "
                f"{self.labels_per_sample} label(s) per sample, but the data has {targets[0].numel()}; "
                "synthetic gradients on [B, T, C] need one label per position (a language model)"
            )
        if step < self.dni.warmup_steps:
            stats = self.locked.train_step(step, inputs, targets)
        else:
            stats = self._decoupled_step(step, inputs, targets)
        self._log.write(stats)
        stats.store_size = len(self.store) if not self.stage.is_last else None
        return stats

    def _decoupled_step(self, step: int, inputs: Optional[torch.Tensor], targets: torch.Tensor) -> StepStats:
        stage, timers, m = self.stage, Timers(self.transport), self.cfg.dni.microbatches
        targets = list(torch.tensor_split(targets.to(stage.device, non_blocking=True), m))
        inputs = list(torch.tensor_split(inputs.to(stage.device, non_blocking=True), m)) if stage.is_first else None
        pending: dict[int, tuple] = {}
        for mb in range(m):  # see [Note: DNI microbatches]
            entry = self._microbatch(step, mb, inputs[mb] if stage.is_first else None, targets, timers)
            if entry is not None:
                pending[mb] = entry
        grad_norm = timers.run("compute", stage.step)
        if not stage.is_last:
            self.store[step] = pending
            timers.run("compute", self._fit_ready)
            while len(self.store) > self.dni.max_staleness:  # back-pressure: wait for the oldest
                timers.run("compute", self._fit_arrived, *timers.run("wait_grad", self._wait_oldest))
        stats = timers.stats(step)
        stats.grad_norm = grad_norm
        if stage.is_last:
            stats.loss = stage.take_loss()
        return stats

    def _microbatch(self, step: int, mb: int, x: Optional[torch.Tensor], targets: list[torch.Tensor],
                    timers: Timers) -> Optional[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """Forward and backward of one microbatch; returns what fitting its gradient will need."""
        stage, transport = self.stage, self.transport
        if not stage.is_first:
            x = timers.run("wait_input", transport.recv, "prev", Kind.ACTIVATION, step, mb, stage.input_spec)
        weight = targets[mb].shape[0] / sum(t.shape[0] for t in targets)  # the last stage's loss share
        h = timers.run("compute", stage.forward, mb, x, targets[mb] if stage.is_last else None, weight)
        entry = None
        if stage.is_last:
            grad_in = timers.run("compute", stage.backward, mb)
        else:
            transport.send("next", Kind.ACTIVATION, step, mb, h)
            labels = self._labels(targets[mb])
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

    def evaluate(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Optional[EvalResult]:
        return self.locked.evaluate(batches)
