"""The ``async`` schedule: every stage updates from the true gradient of an earlier step.

Delayed gradients (the DDG / PipeDream family: Huo et al. 2018, arXiv 1804.10574; Narayanan et
al., SOSP 2019; 2BW, arXiv 2006.09503). No stage waits for the backward pass of its own step:

    stage i of N, step t, delay d_i = delayed.delay x (N-1-i)   (d = 0 on the last stage)
    x_t = batch t's inputs (first stage) or the activation of step t from stage i-1
    h_t = f_i(x_t);  send h_t to stage i+1; keep what the backward of step t will need
    s = t - d_i:  take the gradient of h_s from stage i+1 (it waits only if stage i+1 is more
                  than delayed.delay steps behind), backpropagate it through step s, send
                  x_s.grad to stage i-1 tagged s, clip (this stage's norm) and step

The delay is fixed, not "whatever has arrived", so a run is deterministic and equals a single
process applying the same delays (tests/test_delayed.py). Stage i+1 sends the gradient of s at
its step s + d_{i+1} = s + d_i - delay, so stage i can run at most ``delay`` steps ahead of
stage i+1: that bound is the back-pressure, and the mailbox never holds more than delay + 1
messages of a kind. Each stage makes one update per step; the d_i updates still owed when
training ends are made by ``finish`` (the drain), so every stage makes exactly one update per
batch and every message sent is received.

[Note: weight stashing]
What the delayed backward of step s needs is kept one of two ways (``delayed.weight_stashing``):
- true (default): the autograd graph of step s, built on a copy of the weights its forward used
  (``Stage.stash``), so the gradient is exactly that of the forward that ran (PipeDream's weight
  stashing). Memory: d_i + 1 graphs and weight copies in flight; no extra compute.
- false: only the input x_s; the forward is recomputed with the current weights just before the
  backward (features replay, arXiv 1807.04511). Memory: d_i + 1 inputs; one more forward a step.
Keeping the graph without a copy is not an option: the optimizer updates the weights in place,
and autograd refuses a backward through tensors modified since they were saved.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch

from pipedni.metrics.records import MetricSpec, StepStats
from pipedni.schedules.spec import ScheduleSpec, WorkerContext
from pipedni.schedules.worker import Timers, Worker, grad_norm
from pipedni.transport import Kind


class DelayedWorker(Worker):
    def __init__(self, ctx: WorkerContext):
        super().__init__(ctx)
        stage, cfg = self.stage, ctx.cfg.delayed
        self.delay = 0 if stage.is_last else cfg.delay * (stage.num_stages - 1 - stage.stage_index)
        self.stashing = cfg.weight_stashing
        # step -> its input (recompute), or None (its graph lives in the stage), oldest first
        self.pending: OrderedDict[int, Optional[torch.Tensor]] = OrderedDict()

    def train_step(self, step: int, inputs: Optional[torch.Tensor], targets: torch.Tensor) -> StepStats:
        stage, timers = self.stage, Timers(self.transport)
        x = inputs.to(stage.device, non_blocking=True) if stage.is_first else timers.run(
            "wait_input", self.transport.recv, "prev", Kind.ACTIVATION, step, 0, self.shapes.input)
        norm = None
        if stage.is_last:  # exact: the loss's gradient at once
            timers.run("compute", stage.forward, step, x, targets.to(stage.device, non_blocking=True))
            norm = self._update(step, None, timers)
        else:
            self._forward(step, x, timers)
            if step - self.delay in self.pending:
                norm = self._apply(step - self.delay, timers)
        stats = timers.stats(step, stage, norm)
        if not stage.is_last:
            stats.extra.update(staleness=self.delay, store_size=len(self.pending))
        return stats

    def _forward(self, step: int, x: torch.Tensor, timers: Timers) -> None:
        stage = self.stage
        if self.stashing:
            h = timers.run("compute", stage.forward, step, x, None, 1.0, timers.run("compute", stage.stash))
        else:
            with torch.no_grad():
                h = timers.run("compute", stage.module, x)
        self.transport.send("next", Kind.ACTIVATION, step, 0, h)
        self.pending[step] = None if self.stashing else x

    def _apply(self, step: int, timers: Timers) -> Optional[float]:
        """The delayed backward and update of ``step``, once its gradient has arrived."""
        grad = timers.run("wait_grad", self.transport.recv, "next", Kind.GRADIENT, step, 0, self.shapes.output)
        x = self.pending.pop(step)
        if x is not None:  # features replay: the forward again, on the current weights
            timers.run("compute", self.stage.forward, step, x)
        return self._update(step, grad, timers)

    def _update(self, step: int, grad: Optional[torch.Tensor], timers: Timers) -> Optional[float]:
        stage = self.stage
        grad_in = timers.run("compute", stage.backward, step, grad)
        if not stage.is_first:
            self.transport.send("prev", Kind.GRADIENT, step, 0, grad_in)
        norm = timers.run("compute", grad_norm, stage)  # this stage's own: no barrier across stages
        timers.run("compute", stage.step, norm)
        return norm

    def finish(self) -> None:
        """The updates still owed: take each remaining gradient in step order and apply it."""
        timers = Timers(self.transport)
        while self.pending:
            self._apply(next(iter(self.pending)), timers)

    def held_bytes(self) -> int:
        """Inputs kept for recomputation (weight stashing keeps graphs, which autograd meters)."""
        return sum(x.nbytes for x in self.pending.values() if x is not None)


METRICS = (
    MetricSpec("staleness", "mean_staleness", "ema", "stale", ".1f"),
    MetricSpec("store_size", "max_store_size", "max", "store", "d"),
)
SPEC = ScheduleSpec("async", "delayed true gradients: stage i updates from the gradient of step t - d_i "
                    "(delayed.* settings)", build=DelayedWorker, min_stages=2, locked=False, metrics=METRICS,
                    wait_grad_header="backpressure s")
