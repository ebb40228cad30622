"""The DNI schedule: every stage updates at once from a synthetic gradient (backward unlocking).

One step of stage i (see "The DNI step" in the design):

    x_t = batch t's inputs (first stage) or the activation of step t from stage i-1
    h_t = f_i(x_t);  send h_t to stage i+1 (non-blocking)
    backward: the loss (last stage) or the synthetic gradient sg_i(h_t, y_t) (others)
    send x_t.grad to stage i-1, tagged t: its regression target (bootstrapped unless from the last stage)
    optimizer step
    remember (t, h_t, y_t, prediction); fit sg_i on every gradient that has already arrived

Nothing waits for a gradient unless the store of steps awaiting one exceeds
``dni.max_staleness``: then the stage blocks on the oldest (back-pressure, bounded memory).
Each non-last stage receives exactly one gradient per step, so ``finish`` knows what is owed.
The first ``dni.warmup_steps`` steps run locked 1F1B while the predictors fit true gradients.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Optional

import torch
import torch.nn.functional as F

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
        self.store: OrderedDict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = OrderedDict()
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

    def _fit(self, h: torch.Tensor, labels: Optional[torch.Tensor], predicted: torch.Tensor, grad: torch.Tensor) -> None:
        self._log.losses.append(self.sg.fit(h, labels, grad))
        self._log.cosines.append(float(F.cosine_similarity(predicted.flatten(), grad.flatten(), dim=0)))

    def _fit_true_gradient(self, h: torch.Tensor, targets: torch.Tensor, grad: torch.Tensor) -> None:
        """Warm-up: the locked schedule hands over each exact gradient before using it."""
        labels = self._labels(targets)
        self._fit(h, labels, self.sg.predict(h, labels), grad)
        self._log.staleness.append(0)

    def _fit_arrived(self, step: int, grad: torch.Tensor) -> None:
        h, labels, predicted = self.store.pop(step)
        self._fit(h, labels, predicted, grad)
        self._log.staleness.append(self._step - step)

    def _fit_ready(self) -> None:
        for header, grad in self.transport.recv_ready("next", Kind.GRADIENT):
            self._fit_arrived(header.step, grad)

    def _wait_oldest(self) -> tuple[int, torch.Tensor]:
        step = next(iter(self.store))
        return step, self.transport.recv("next", Kind.GRADIENT, step, 0, self.stage.output_spec)

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
        stage, transport, timers = self.stage, self.transport, Timers(self.transport)
        targets = targets.to(stage.device, non_blocking=True)
        if stage.is_first:
            x = inputs.to(stage.device, non_blocking=True)
        else:
            x = timers.run("wait_input", transport.recv, "prev", Kind.ACTIVATION, step, 0, stage.input_spec)
        h = timers.run("compute", stage.forward, 0, x, targets if stage.is_last else None, 1.0)
        if stage.is_last:
            grad_in = timers.run("compute", stage.backward, 0)
        else:
            transport.send("next", Kind.ACTIVATION, step, 0, h)
            labels = self._labels(targets)
            predicted = timers.run("compute", self.sg.predict, h, labels)
            grad_in = timers.run("compute", stage.backward, 0, predicted)
        if not stage.is_first:
            transport.send("prev", Kind.GRADIENT, step, 0, grad_in)
        grad_norm = timers.run("compute", stage.step)
        if not stage.is_last:
            self.store[step] = (h, labels, predicted)
            timers.run("compute", self._fit_ready)
            while len(self.store) > self.dni.max_staleness:  # back-pressure: wait for the oldest
                timers.run("compute", self._fit_arrived, *timers.run("wait_grad", self._wait_oldest))
        stats = timers.stats(step)
        stats.grad_norm = grad_norm
        if stage.is_last:
            stats.loss = stage.take_loss()
        return stats

    def finish(self) -> None:
        """Take and fit every gradient still owed, so nothing is left in flight."""
        while self.store:
            self._fit_arrived(*self._wait_oldest())

    def held_bytes(self) -> int:
        """The store: outputs, labels and predictions of the steps still awaiting their gradient."""
        return sum(t.nbytes for entry in self.store.values() for t in entry if t is not None)

    def extra_state(self) -> dict:
        return {} if self.sg is None else {"synthetic_gradient": self.sg.state_dict()}

    def evaluate(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Optional[EvalResult]:
        return self.locked.evaluate(batches)
