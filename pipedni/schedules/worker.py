"""The contract every schedule's worker keeps, and the pieces every worker shares: one
microbatch split, one step timer, one way to measure the gradient norm for clipping.

The trainer drives any worker alike: ``train_step`` once per batch (every stage with the same
step), ``finish`` when training ends (take what is still owed), ``evaluate`` (forward-only,
through the whole pipe), ``held_bytes`` (tensors kept between steps outside autograd) and
``extra_state`` / ``load_extra_state`` (what a checkpoint adds to the stage's own state, taken
after ``finish`` so that nothing is in flight).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch

from pipedni.crossing import Value, input_split, input_to
from pipedni.metrics.records import StepStats
from pipedni.metrics.timeline import WAITS, category_of
from pipedni.schedules.passes import EvalResult, evaluate
from pipedni.schedules.spec import WorkerContext
from pipedni.stage import Stage


class Worker:
    """Base of every schedule's worker; a schedule overrides ``train_step`` and what it owes."""

    def __init__(self, ctx: WorkerContext):
        self.stage, self.transport, self.shapes = ctx.stage, ctx.transport, ctx.shapes
        self.num_evals = 0

    def train_step(self, step: int, inputs: Optional[Value], targets: torch.Tensor) -> StepStats:
        raise NotImplementedError

    def finish(self) -> None:
        """Nothing is owed after a locked step: every gradient was consumed within it."""

    def held_bytes(self) -> int:
        """Bytes of activations kept between steps outside autograd: none, a locked step ends clean."""
        return 0

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        """``extra_state`` of a checkpoint written under the same split, at the step it resumes."""

    def evaluate(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Optional[EvalResult]:
        eval_id, self.num_evals = self.num_evals, self.num_evals + 1
        return evaluate(self.stage, self.transport, self.shapes, eval_id, batches)


@dataclass
class Microbatch:
    inputs: Optional[Value]  # the network's: the first stage's, or one that predicts its input
    targets: torch.Tensor
    weight: float  # its share of the batch: the last stage weights its loss by it


def split_batch(stage: Stage, inputs: Optional[Value], targets: torch.Tensor, m: int,
                keep_inputs: bool = False) -> list[Microbatch]:
    """The batch in ``m`` microbatches on the stage's device, each with its loss weight, so that
    accumulated gradients equal those of one full-batch step. Network inputs go to the first
    stage, and to a later one that predicts its input from them (``keep_inputs``)."""
    pieces = list(torch.tensor_split(targets.to(stage.device, non_blocking=True), m))
    xs = (input_split(input_to(inputs, stage.device, non_blocking=True), m) if stage.is_first or keep_inputs
          else [None] * len(pieces))
    return [Microbatch(x, t, t.shape[0] / targets.shape[0]) for x, t in zip(xs, pieces)]


def sum_tied(stage: Stage, transport) -> None:
    """Each tied weight's gradient summed over the stages that hold it (``REDUCE_TIED``): the
    gradient one process would accumulate on the one parameter, on every copy."""
    for weight in stage.tied:
        param = stage.module.get_parameter(weight.name)
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        transport.all_reduce(param.grad, group=weight.group)


class TiedSync:
    """Decoupled schedules' tied weights (``train.tied_sync_every``): each copy trains on its
    own stage's gradients, and every ``every`` steps (and before a checkpoint) each copy takes
    the sum of every copy's updates since the last sync: with plain SGD and ``every`` = 1, the
    update one process makes from the summed gradient. The holders meet in a collective then,
    the first stage waiting for the last to finish the same step."""

    def __init__(self, stage: Stage, transport, every: int):
        self.stage, self.transport, self.every = stage, transport, every
        self.base = {w.name: stage.module.get_parameter(w.name).detach().clone() for w in stage.tied}

    def after(self, step: int) -> None:
        if self.base and (step + 1) % self.every == 0:
            self.sync()

    @torch.no_grad()
    def reset(self) -> None:
        """The copies are equal now (a locked step summed their gradients): count updates from here."""
        for name, base in self.base.items():
            base.copy_(self.stage.module.get_parameter(name))

    @torch.no_grad()
    def sync(self) -> None:
        """Every holder at once (a collective of the holders)."""
        for weight in self.stage.tied:
            param, base = self.stage.module.get_parameter(weight.name), self.base[weight.name]
            delta = param - base
            self.transport.all_reduce(delta, group=weight.group)
            param.copy_(base + delta)
            base.copy_(param)


def grad_norm(stage: Stage, transport=None) -> Optional[float]:
    """The gradient norm ``Stage.step`` clips by (or fp16 agrees on): None when it needs none;
    this stage's alone, or the whole model's when given the transport (an all-reduce over every stage)."""
    if not stage.needs_norm:
        return None
    sq = stage.grad_sq_norm()
    if transport is not None:
        transport.all_reduce(sq)
    return float(sq.sqrt())


class Timers:
    """Seconds spent per bucket (compute, wait_input, wait_grad) during one step; each call also
    goes on the transport's timeline when it records (``run.timeline_steps``), named by
    ``label`` when a locked plan sets it to the action running ("F3"), else by the function."""

    def __init__(self, transport):
        self.seconds = {"compute": 0.0, "wait_input": 0.0, "wait_grad": 0.0}
        self.transport, self.timeline = transport, transport.timeline
        self.label: Optional[str] = None
        self.send_wait_before, self.bytes_before = transport.send_wait_sec, transport.bytes_sent
        self.start = time.perf_counter()

    def run(self, bucket: str, fn: Callable, *args):
        start = time.perf_counter()
        result = fn(*args)
        end = time.perf_counter()
        self.seconds[bucket] += end - start
        if self.timeline.recording:
            category = category_of(bucket, fn)
            name = self.label or (category if bucket in WAITS else getattr(fn, "__name__", bucket))
            self.timeline.record(name, category, start, end)
        return result

    def run_as(self, label: str, bucket: str, fn: Callable, *args):
        """``run``, named ``label`` on the timeline (an action, as ``action_name`` names it)."""
        self.label = label
        try:
            return self.run(bucket, fn, *args)
        finally:
            self.label = None

    def stats(self, step: int, stage: Stage, grad_norm: Optional[float]) -> StepStats:
        """The step's record: its timers, the transport's counters since it began, and on the
        last stage the batch's loss."""
        return StepStats(step, loss=stage.take_loss() if stage.is_last else None,
                         step_sec=time.perf_counter() - self.start, compute_sec=self.seconds["compute"],
                         wait_input_sec=self.seconds["wait_input"], wait_grad_sec=self.seconds["wait_grad"],
                         send_wait_sec=self.transport.send_wait_sec - self.send_wait_before,
                         bytes_sent=self.transport.bytes_sent - self.bytes_before, grad_norm=grad_norm)
