"""The stage worker: runs a schedule's actions with one stage and its transport, and times them.

Start-up (``connect``) passes a one-sample probe down the pipe so every stage learns the
shape and dtype it will receive, and a stage that cannot take its neighbour's output fails
before training starts, naming both stages.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch

from pipedni.errors import PartitionError
from pipedni.schedules import Action, stage_actions
from pipedni.stage import Stage, loss_fn, num_correct
from pipedni.transport import Kind, TensorSpec, Transport


@dataclass
class StepStats:
    """What one stage did during one training step (seconds); None where it does not apply."""

    step: int
    loss: Optional[float] = None
    step_sec: float = 0.0
    compute_sec: float = 0.0
    wait_input_sec: float = 0.0
    wait_grad_sec: float = 0.0  # locked: waiting for gradients; dni: back-pressure of the store
    send_wait_sec: float = 0.0
    bytes_sent: int = 0  # payload bytes this stage sent during the step (both directions)
    grad_norm: Optional[float] = None  # norm before clipping (when clipping): whole model, or the stage's under dni
    sg_loss: Optional[float] = None  # dni: mean regression loss of the fits done this step
    sg_cosine: Optional[float] = None  # dni: mean cosine(predicted, arrived gradient) of those fits
    staleness: Optional[float] = None  # dni: mean steps between a prediction and its target
    store_size: Optional[int] = None  # dni: steps still awaiting their gradient after this step


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    num_samples: int


class Timers:
    """Seconds spent per bucket (compute, wait_input, wait_grad) during one step."""

    def __init__(self, transport: Optional[Transport] = None):
        self.seconds = {"compute": 0.0, "wait_input": 0.0, "wait_grad": 0.0}
        self.transport = transport
        self.send_wait_before = transport.send_wait_sec if transport else 0.0
        self.bytes_before = transport.bytes_sent if transport else 0
        self.start = time.perf_counter()

    def run(self, bucket: str, fn: Callable, *args):
        start = time.perf_counter()
        result = fn(*args)
        self.seconds[bucket] += time.perf_counter() - start
        return result

    def stats(self, step: int) -> StepStats:
        stats = StepStats(step, step_sec=time.perf_counter() - self.start, compute_sec=self.seconds["compute"],
                          wait_input_sec=self.seconds["wait_input"], wait_grad_sec=self.seconds["wait_grad"])
        if self.transport is not None:
            stats.send_wait_sec = self.transport.send_wait_sec - self.send_wait_before
            stats.bytes_sent = self.transport.bytes_sent - self.bytes_before
        return stats


# Called with (microbatch output detached, its labels, the true gradient that arrived for it).
GradientObserver = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


class StageWorker:
    def __init__(self, stage: Stage, transport: Optional[Transport], schedule: str, num_microbatches: int):
        self.stage, self.transport = stage, transport
        self.plan: list[Action] = stage_actions(schedule, stage.stage_index, stage.num_stages, num_microbatches)
        self.num_microbatches = 1 if schedule == "single" else num_microbatches
        self.num_evals = 0
        self._mb_inputs: list[torch.Tensor] = []
        self._mb_targets: list[torch.Tensor] = []
        self._weights: list[float] = []
        self._received: dict[int, torch.Tensor] = {}
        self._grads: dict[int, Optional[torch.Tensor]] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self._grad_norm: Optional[float] = None
        self.on_gradient: Optional[GradientObserver] = None  # sees every true gradient (dni warm-up)

    # ------------------------------------------------------------------ start-up

    def connect(self, sample_spec: TensorSpec, num_classes: int) -> None:
        """Propagate output shapes down the pipe; raise PartitionError where a stage cannot fit."""
        stage, transport = self.stage, self.transport
        spec = sample_spec
        if not stage.is_first:
            probe = transport.recv("prev", Kind.SHAPE, 0, 0)
            spec = TensorSpec(tuple(probe.shape), probe.dtype)
        try:
            out = stage.probe(spec)
        except PartitionError:
            raise
        except Exception as err:  # the user's layers reject the input: name both stages
            source = "the data set" if stage.is_first else f"stage {stage.stage_index - 1}"
            raise PartitionError(
                f"stage {stage.stage_index} cannot take the output of {source}, {spec.describe()}: "
                f"{type(err).__name__}: {str(err).splitlines()[0]}; move the cut (partition.balance)"
            ) from None
        if not stage.is_last:
            transport.send("next", Kind.SHAPE, 0, 0, torch.zeros((1, *out.shape[1:]), dtype=out.dtype))
        elif len(out.shape) < 2 or out.shape[-1] != num_classes:
            # [B, C] scores for one label per sample, [B, T, C] for one per position (see loss_fn)
            raise PartitionError(
                f"the last stage (stage {stage.stage_index}) outputs {out.describe()} but the loss needs "
                f"[*, {num_classes}] class scores on the last dimension; end the model with a layer of "
                f"{num_classes} outputs"
            )

    # ------------------------------------------------------------------ training

    def train_step(self, step: int, inputs: Optional[torch.Tensor], targets: Optional[torch.Tensor]) -> StepStats:
        """Run this stage's actions for one batch; every stage calls it with the same ``step``."""
        stage, m = self.stage, self.num_microbatches
        if stage.is_first:
            self._mb_inputs = list(torch.tensor_split(inputs.to(stage.device, non_blocking=True), m))
        self._mb_targets = list(torch.tensor_split(targets.to(stage.device, non_blocking=True), m))
        self._weights = [t.shape[0] / targets.shape[0] for t in self._mb_targets]
        self._timers = Timers(self.transport)
        for action in self.plan:
            getattr(self, f"_do_{action.kind.lower()}")(step, action.microbatch)
        stats = self._timers.stats(step)
        if stage.is_last:
            stats.loss = stage.take_loss()
        stats.grad_norm = self._grad_norm
        return stats

    def _timed(self, bucket: str, fn, *args):
        return self._timers.run(bucket, fn, *args)

    def _do_recv_f(self, step: int, mb: int) -> None:
        recv = self.transport.recv
        self._received[mb] = self._timed("wait_input", recv, "prev", Kind.ACTIVATION, step, mb, self.stage.input_spec)

    def _do_f(self, step: int, mb: int) -> None:
        stage = self.stage
        x = self._mb_inputs[mb] if stage.is_first else self._received.pop(mb)
        target = self._mb_targets[mb] if stage.is_last else None
        weight = self._weights[mb] if stage.is_last else 1.0
        self._outputs[mb] = self._timed("compute", stage.forward, mb, x, target, weight)

    def _do_send_f(self, step: int, mb: int) -> None:
        self.transport.send("next", Kind.ACTIVATION, step, mb, self._outputs.pop(mb))

    def _do_recv_b(self, step: int, mb: int) -> None:
        recv = self.transport.recv
        self._grads[mb] = self._timed("wait_grad", recv, "next", Kind.GRADIENT, step, mb, self.stage.output_spec)

    def _do_b(self, step: int, mb: int) -> None:
        self._outputs.pop(mb, None)  # the last stage's loss value
        grad = self._grads.pop(mb, None)
        if self.on_gradient is not None and grad is not None:
            self._timed("compute", self.on_gradient, self.stage.outputs[mb].detach(), self._mb_targets[mb], grad)
        self._grads[mb] = self._timed("compute", self.stage.backward, mb, grad)

    def _do_send_b(self, step: int, mb: int) -> None:
        self.transport.send("prev", Kind.GRADIENT, step, mb, self._grads.pop(mb))

    def _do_step(self, step: int, mb: int) -> None:
        self._grads.clear()
        self._grad_norm = self._timed("compute", self.stage.step)

    def finish(self) -> None:
        """Nothing is owed after a locked step: every gradient was consumed within it."""

    def held_bytes(self) -> int:
        """Bytes of activations kept between steps outside autograd: none, a locked step ends clean."""
        return 0

    def extra_state(self) -> dict:
        return {}

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Optional[EvalResult]:
        """Forward-only pass over ``batches`` through the whole pipe; the last stage returns the result.

        Every stage must pass the same batches (each uses the half it needs); the first stage's
        sends run ahead of the consumers, so the pass pipelines on its own.
        """
        stage, transport, eval_id = self.stage, self.transport, self.num_evals
        self.num_evals += 1
        stage.module.eval()
        loss_sum, correct, count = 0.0, 0, 0
        try:
            for b, (inputs, targets) in enumerate(batches):
                x = inputs.to(stage.device) if stage.is_first else transport.recv("prev", Kind.EVAL, eval_id, b, stage.input_spec)
                out = stage.evaluate(x)
                if not stage.is_last:
                    transport.send("next", Kind.EVAL, eval_id, b, out)
                    continue
                targets = targets.to(stage.device)
                loss_sum += float(loss_fn(out, targets, reduction="sum"))
                correct += num_correct(out, targets)
                count += targets.numel()
        finally:
            stage.module.train()
        if not stage.is_last or count == 0:
            return None
        return EvalResult(loss_sum / count, correct / count, count)
