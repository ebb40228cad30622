"""A stage's end of a boundary with synthetic inputs (forward unlocking): its input model, the
microbatches it trained on a predicted input, and the work their true activations still owe.

[Note: catching up on a true input]
Stage k with ``dni.synthetic_inputs`` on boundary k-1 trains microbatch (t, m) on its input
predicted from the network input (``train_predicted``: forward, the synthetic gradient or the
loss, backward, at once) when the true activation h of (t, m) has not arrived
(``dni.si_policy: arrived``) or always (``always``, the paper's complete unlock), once its input
model is trusted (dni/inputs.py). The true activation still comes, exactly once, and when it
does (``catch_up``) the stage
- fits the input model on it;
- runs its forward on h with its current weights and sends that downstream: the next stage's
  input and input model learn the true chain, which evaluation runs;
- keeps that output for fitting its own synthetic-gradient predictor, whose true gradient will
  come back for it;
- sends stage k-1 the gradient of (t, m), the target of k-1's predictor. ``dni.si_gradient``:
  ``true_input`` takes it at h, through the forward just run (one more input-only backward), so the
  predictor is fitted at the point where it is used; ``prediction`` sends the gradient at the
  predicted input from the training backward (free, but biased by the input model's error:
  the pitfall of fitting a gradient model at the wrong point).
True activations are processed in step order: before a stage takes one for training it catches
up on every older one, so what it sends stays in step order. It waits for the oldest only when
that is ``dni.max_staleness`` steps old (the bounded lead) or before an evaluation, a checkpoint
or the end (an upstream stage may be waiting, within its step, for a gradient only a catch-up
sends). While it waits, ``dni.si_idle_updates`` lets it make extra updates on predicted inputs
of the batches it holds instead of idling.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from pipedni.config import DNIConfig
from pipedni.dni.inputs import SyntheticInput, SyntheticInputTrainer
from pipedni.metrics.records import MetricSpec, StepStats
from pipedni.schedules.spec import WorkerContext
from pipedni.schedules.synthetic_gradients import SyntheticGradientEnd
from pipedni.schedules.worker import Microbatch, Timers
from pipedni.transport import Kind

IDLE_KEY = -1  # the Stage key of an idle update's forward (a microbatch's key is >= 0)


@dataclass
class Late:
    """A microbatch trained on a predicted input: what its true activation is needed for."""

    piece: Microbatch  # its network input, targets and loss weight
    grad: Optional[torch.Tensor]  # the gradient at the predicted input (dni.si_gradient: prediction)


class SyntheticInputEnd:
    """The input model of the boundary before ``ctx.stage`` and its microbatches awaiting their
    true activations, oldest first. ``gradients`` is the stage's own end of its dni boundary (None on
    the last stage); ``send_grad(step, mb, grad)`` sends an input gradient upstream and
    ``update(timers, count)`` makes an optimizer step, as the worker does."""

    def __init__(self, ctx: WorkerContext, cfg: DNIConfig, gradients: Optional[SyntheticGradientEnd],
                 send_grad: Callable, update: Callable):
        self.stage, self.transport, self.cfg, self.gradients = ctx.stage, ctx.transport, cfg, gradients
        self.send_grad, self.update = send_grad, update
        self.input = ctx.shapes.input
        model = SyntheticInput(ctx.network_input.shape[1:], ctx.network_input.dtype, ctx.shapes.input.shape[1:],
                               ctx.num_classes, cfg)
        self.si = SyntheticInputTrainer(model, cfg, ctx.stage.device, ctx.stage.precision, ctx.shapes.input.dtype)
        self.late: OrderedDict[tuple[int, int], Late] = OrderedDict()  # (step, microbatch) -> Late
        self.step, self.may_predict, self.idle_ok, self.idle_left = 0, False, False, 0
        self.num_predicted, self.num_idle, self.r2s = 0, 0, []

    # -- the worker's hooks, in the order a step calls them --------------------------------------

    def begin(self, step: int, may_predict: bool, timers: Timers) -> None:
        """A new step (``may_predict``: the stage updates at once now, past the boundary's warm-up);
        catch up on the true activations already here."""
        self.step, self.may_predict, self.idle_ok = step, may_predict, may_predict
        self.idle_left = self.cfg.si_idle_updates
        self.num_predicted, self.num_idle, self.r2s = 0, 0, []
        self.catch_up(timers)

    def predicts(self, step: int, mb: int) -> bool:
        """Whether microbatch ``mb`` of ``step`` trains on a predicted input (``dni.si_policy``)."""
        if not self.may_predict or not self.si.trusted:
            return False
        return self.cfg.si_policy == "always" or not self.transport.arrived("prev", Kind.ACTIVATION, step, mb)

    def train_predicted(self, step: int, mb: int, key: int, piece: Microbatch, timers: Timers) -> None:
        """Microbatch ``mb`` of ``step`` (the stage's ``key``) on its predicted input, forward and
        backward at once; its true activation is remembered for ``catch_up``."""
        self.num_predicted += 1
        grad_in = timers.run("compute", self._backward_predicted, key, piece)
        self.late[(step, mb)] = Late(piece, grad_in if self.cfg.si_gradient == "prediction" else None)
        self.idle_ok = False  # gradients are accumulating: no idle update may step the optimizer now

    def before_true_input(self, step: int, mb: int, piece: Microbatch, timers: Timers) -> None:
        """About to wait for the true activation of (step, mb): catch up on every older one first."""
        if mb == 0:
            self._idle(step, mb, piece, timers)
        self.catch_up(timers, everything=True)
        self.idle_ok = False

    def took_true_input(self, piece: Microbatch, h: torch.Tensor, timers: Timers) -> None:
        timers.run("compute", self.fit, piece, h)

    def end(self, timers: Timers) -> None:
        """After the step's update: catch up on what has arrived, and wait (idle updates first) while
        the oldest microbatch awaiting its true input is ``dni.max_staleness`` steps old."""
        self.idle_ok = self.may_predict  # no gradients accumulate any more this step
        self.catch_up(timers, lead=True)

    def settle(self, timers: Timers) -> None:
        """Catch up on every true activation owed, with no idle update: before an evaluation, a
        checkpoint or the end."""
        self.idle_ok = False
        self.catch_up(timers, everything=True)

    def catch_up(self, timers: Timers, everything: bool = False, lead: bool = False) -> None:
        """See [Note: catching up on a true input]. Without waiting; with ``everything`` waiting for
        all; with ``lead`` for those ``dni.max_staleness`` steps old."""
        while self.late:  # oldest first: activations arrive in step order, and go on in it
            (step, mb), late = next(iter(self.late.items()))
            if not self.transport.arrived("prev", Kind.ACTIVATION, step, mb):
                if not (everything or (lead and self.step - step >= self.cfg.max_staleness)):
                    return
                self._idle(step, mb, late.piece, timers)
            del self.late[(step, mb)]
            h = timers.run("wait_input", self.transport.recv, "prev", Kind.ACTIVATION, step, mb, self.input)
            timers.run("compute", self._catch_up_one, step, mb, late, h)

    # -- the compute ------------------------------------------------------------------------------

    def _backward_predicted(self, key: int, piece: Microbatch) -> Optional[torch.Tensor]:
        """Forward and backward on the predicted input; returns the predicted input's gradient."""
        stage, x = self.stage, self.si.predict(piece.inputs)
        with stage.frozen_norm_stats():  # till after the backward: it reads the statistics the forward saw
            h = stage.forward(key, x, piece.targets, piece.weight)
            grad = None if stage.is_last else self.gradients.predict(h, self.gradients.labels(piece.targets))
            return stage.backward(key, grad)

    def _catch_up_one(self, step: int, mb: int, late: Late, h: torch.Tensor) -> None:
        stage, piece, gradients = self.stage, late.piece, self.gradients
        self.fit(piece, h)
        exact = self.cfg.si_gradient == "true_input"
        if stage.is_last:
            grad_in = stage.input_grad(*stage.input_forward(h, piece.targets, piece.weight)) if exact else late.grad
        else:
            labels = gradients.labels(piece.targets)
            if exact:
                x, out = stage.input_forward(h)
                grad_in = stage.input_grad(x, out, gradients.predict(out.detach(), labels))
            else:
                with torch.no_grad():
                    out, grad_in = stage.run(h), late.grad
            self.transport.send("next", Kind.ACTIVATION, step, mb, out)
            gradients.keep(step, {mb: (out.detach(), labels)})
        self.send_grad(step, mb, grad_in)

    def _idle(self, step: int, mb: int, piece: Microbatch, timers: Timers) -> None:
        """Extra updates on predicted inputs of ``piece``'s batch while (step, mb)'s true activation
        has not arrived, as many as ``dni.si_idle_updates`` leaves this step."""
        trusted = self.si.trusted and (self.gradients is None or self.gradients.trusted)  # else it would not update now
        while self.idle_ok and self.idle_left > 0 and trusted and \
                not self.transport.arrived("prev", Kind.ACTIVATION, step, mb):
            self.idle_left, self.num_idle = self.idle_left - 1, self.num_idle + 1
            loss = self.stage.batch_loss  # the step's reported loss is its batch's
            timers.run("compute", self._backward_predicted, IDLE_KEY, piece)
            self.stage.batch_loss = loss
            self.update(timers, count=False)

    def fit(self, piece: Microbatch, h: torch.Tensor) -> None:
        self.r2s.append(self.si.fit(piece.inputs, h)[1])

    # -- reporting and state ----------------------------------------------------------------------

    def write(self, stats: StepStats) -> None:
        stats.extra["si_predicted"] = self.num_predicted
        stats.extra["si_idle"] = self.num_idle
        stats.extra["si_late"] = len(self.late)
        if self.r2s:
            stats.extra["si_r2"] = sum(self.r2s) / len(self.r2s)

    def held_bytes(self) -> int:
        held = [t for late in self.late.values() for t in (late.piece.inputs, late.piece.targets, late.grad)]
        return sum(t.nbytes for t in held if t is not None)

    def state_dict(self) -> dict:
        return self.si.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.si.load_state_dict(state)


METRICS = (
    MetricSpec("si_predicted", "predicted_input_updates", "sum", "si pred", "d"),
    MetricSpec("si_idle", "idle_updates", "sum", "si idle", "d"),
    MetricSpec("si_r2", "si_r2", "ema", "si R2", ".2f"),
    MetricSpec("si_late", "max_si_late", "max", "si late", "d"),
)
