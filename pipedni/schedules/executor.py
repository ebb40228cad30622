"""The one executor of locked schedules: runs a stage's action list for one batch, timing it.

Each action is one method (``_do_f``, ``_do_send_b``...); the executor holds only what flows
between actions within the step (received inputs, outputs to send, gradients) and ends the
step clean. A plan with ``FIT`` actions hands each arrived gradient, before the backward uses
it, to the ``fit`` it was built with (DNI's warm-up fits its predictor on true gradients).
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch

from pipedni.crossing import gradient_spec
from pipedni.metrics.records import StepStats
from pipedni.schedules.actions import Action, ActionKind, Plan, stage_actions, with_fits
from pipedni.schedules.spec import WorkerContext
from pipedni.schedules.worker import Microbatch, Timers, grad_norm, split_batch, sum_tied
from pipedni.transport import Kind

# Called with (a microbatch's output, detached; the microbatch; the true gradient of that output).
Fit = Callable[[torch.Tensor, Microbatch, torch.Tensor], None]


class LockedExecutor:
    def __init__(self, ctx: WorkerContext, schedule: Union[str, Plan], num_microbatches: int,
                 whole_model_norm: bool = True, fit: Optional[Fit] = None):
        """``whole_model_norm``: clip by the norm of every stage's gradients (an ``ALL_REDUCE``
        in the plan), as one process would; else by this stage's alone."""
        self.stage, self.transport, self.shapes = ctx.stage, ctx.transport, ctx.shapes
        stage = ctx.stage
        self.num_microbatches = 1 if schedule == "single" else num_microbatches
        self.whole_model_norm, self.fit = whole_model_norm, fit
        plan = stage_actions(schedule, stage.stage_index, stage.num_stages, num_microbatches,
                             reduce_norm=stage.needs_norm and whole_model_norm, reduce_tied=bool(stage.tied))
        self.plan: list[Action] = with_fits(plan) if fit is not None else plan
        backwards = [a.microbatch for a in self.plan if a.kind is ActionKind.B]
        self._last_backward = backwards[-1] if backwards else None  # it averages over replicas
        self._microbatches: list[Microbatch] = []
        self._received: dict[int, torch.Tensor] = {}
        self._outputs: dict[int, torch.Tensor] = {}  # detached, until the microbatch's backward
        self._grads: dict[int, Optional[torch.Tensor]] = {}
        self._norm: Optional[float] = None

    def run(self, step: int, inputs: Optional[torch.Tensor], targets: torch.Tensor) -> StepStats:
        """Run this stage's actions for one batch; every stage calls it with the same ``step``."""
        self._microbatches = split_batch(self.stage, inputs, targets, self.num_microbatches)
        self._timers, self._norm = Timers(self.transport), None
        for action in self.plan:
            self._timers.label = str(action)
            getattr(self, f"_do_{action.kind.lower()}")(step, action.microbatch)
        self.transport.settle()  # every message of the step is taken within it: see [Note: who receives]
        return self._timers.stats(step, self.stage, self._norm)

    def _timed(self, bucket: str, fn, *args):
        return self._timers.run(bucket, fn, *args)

    def _do_recv_f(self, step: int, mb: int) -> None:
        recv = self.transport.recv
        self._received[mb] = self._timed("wait_input", recv, "prev", Kind.ACTIVATION, step, mb, self.shapes.input)

    def _do_f(self, step: int, mb: int) -> None:
        stage, piece = self.stage, self._microbatches[mb]
        x = piece.inputs if stage.is_first else self._received.pop(mb)
        target, weight = (piece.targets, piece.weight) if stage.is_last else (None, 1.0)
        self._outputs[mb] = self._timed("compute", stage.forward, mb, x, target, weight)

    def _do_send_f(self, step: int, mb: int) -> None:
        self.transport.send("next", Kind.ACTIVATION, step, mb, self._outputs[mb])

    def _do_recv_b(self, step: int, mb: int) -> None:
        recv = self.transport.recv
        self._grads[mb] = self._timed("wait_grad", recv, "next", Kind.GRADIENT, step, mb, gradient_spec(self.shapes.output))

    def _do_fit(self, step: int, mb: int) -> None:
        self._timed("compute", self.fit, self._outputs[mb], self._microbatches[mb], self._grads[mb])

    def _do_b(self, step: int, mb: int) -> None:
        self._outputs.pop(mb)  # the output (or the last stage's loss value) is no longer needed
        last = mb == self._last_backward
        self._grads[mb] = self._timed("compute", self.stage.backward, mb, self._grads.pop(mb, None), last)

    def _do_send_b(self, step: int, mb: int) -> None:
        self.transport.send("prev", Kind.GRADIENT, step, mb, self._grads.pop(mb))

    # A collective waits for every stage it spans to reach it: timed as waiting for gradients, not
    # as compute, so a stage's busy time (and the simulator's calibration on it) is its own work.

    def _do_reduce_tied(self, step: int, mb: int) -> None:
        self._timed("wait_grad", sum_tied, self.stage, self.transport)

    def _do_all_reduce(self, step: int, mb: int) -> None:
        squared = self._timed("compute", self.stage.grad_sq_norm)
        self._timed("wait_grad", self.transport.all_reduce, squared)
        self._norm = float(squared.sqrt())

    def _do_step(self, step: int, mb: int) -> None:
        self._grads.clear()
        if not self.whole_model_norm:
            self._norm = self._timed("compute", grad_norm, self.stage)
        self._timed("compute", self.stage.step, self._norm)
        assert not self.stage.in_flight, "a locked plan left microbatches without backward"
