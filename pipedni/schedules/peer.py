"""The peer: torch.distributed.pipelining's ScheduleGPipe / Schedule1F1B on pipedni's own stages.

For an honest benchmark the peer shares everything but the schedule: the same stage modules,
data, loss (``stage.loss_fn``), precision, optimizer, LR schedule and clipping (``Stage.step``),
metrics and evaluation. Forward, backward and their point-to-point messages are torch's (``PipelineStage``
over the default process group). pipedni's transport is used only where torch's schedules have
nothing to offer: the start-up shape probe and the forward-only evaluation pass.
"""

from __future__ import annotations

import time
from typing import Optional

import torch
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
from torch.nn.parallel import DistributedDataParallel

from pipedni.config import Config
from pipedni.crossing import Spec, Value, example, gradient_spec, input_to
from pipedni.errors import LaunchError
from pipedni.metrics.records import StepStats
from pipedni.precision import Autocast, fp32
from pipedni.replicas import NO_BUFFER_SYNC
from pipedni.schedules.spec import ScheduleSpec, WorkerContext
from pipedni.schedules.worker import Worker, grad_norm, sum_tied
from pipedni.stage import loss_fn


class _TimedStage(PipelineStage):
    """torch's PipelineStage, adding up the seconds its forward and backward chunks compute."""

    compute_sec = 0.0

    def forward_one_chunk(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return super().forward_one_chunk(*args, **kwargs)
        finally:
            self.compute_sec += time.perf_counter() - start

    def backward_one_chunk(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return super().backward_one_chunk(*args, **kwargs)
        finally:
            self.compute_sec += time.perf_counter() - start


def _example(spec: Spec, rows: int, device: torch.device, requires_grad: bool) -> Value:
    """A microbatch-shaped example; torch reads from requires_grad which gradients travel back
    (in a tuple, those of the tensors that need one)."""
    value = example(spec, rows, device)
    if isinstance(value, tuple):
        return value if requires_grad else tuple(t.detach() for t in value)
    return value.requires_grad_(requires_grad)


def _num_bytes(spec: Spec, rows: int) -> int:
    return sum(s.num_bytes(rows) for s in (spec if isinstance(spec, tuple) else (spec,)))


class PeerWorker(Worker):
    """torch's ScheduleGPipe or Schedule1F1B runs the step; pipedni clips, steps and evaluates."""

    def __init__(self, ctx: WorkerContext, schedule: type):
        super().__init__(ctx)
        stage, shapes, m = self.stage, self.shapes, ctx.cfg.train.microbatches
        rows = ctx.cfg.data.batch_size // ctx.cfg.dist.data_parallel // m
        # Static microbatch shapes from the start-up probe: no shape inference round at the first step.
        module = Autocast(stage.module, stage.precision) if stage.precision.mixed else stage.module
        ddp = stage.replicas.ddp
        if ddp is not None:  # torch's stage syncs a DDP submodule on its last backward
            module = DistributedDataParallel(module, process_group=ddp.process_group, device_ids=ddp.device_ids,
                                             **NO_BUFFER_SYNC)
        self.pipe = _TimedStage(module, stage.stage_index, stage.num_stages, stage.device,
                                input_args=_example(shapes.input, rows, stage.device, not stage.is_first),
                                output_args=_example(shapes.output, rows, stage.device, True),
                                group=self.transport.group)
        self.schedule = schedule(self.pipe, m, loss_fn=self._loss)
        # What torch's schedule sends per step: M activations forward (but the last stage) and M
        # input gradients backward (but the first); torch keeps no byte counters of its own.
        out_bytes = 0 if stage.is_last else _num_bytes(shapes.output, rows)
        in_bytes = 0 if stage.is_first else _num_bytes(gradient_spec(shapes.input), rows)
        self.bytes_per_step = m * (out_bytes + in_bytes)

    def _loss(self, scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The loss torch's schedule backpropagates: in fp32, times fp16's loss scale."""
        scale = self.stage.loss_scale
        loss = loss_fn(fp32(scores), targets)
        return loss if scale is None else loss * scale.value

    def train_step(self, step: int, inputs: Optional[Value], targets: torch.Tensor) -> StepStats:
        stage, start = self.stage, time.perf_counter()
        compute_before = self.pipe.compute_sec
        losses: Optional[list] = [] if stage.is_last else None
        x = input_to(inputs, stage.device) if stage.is_first else ()
        args = x if isinstance(x, tuple) else (x,)
        target = targets.to(stage.device) if stage.is_last else None
        scale = 1.0 if stage.loss_scale is None else stage.loss_scale.value  # before the step moves it
        self.schedule.step(*args, target=target, losses=losses, return_outputs=False)
        reduce_start = time.perf_counter()
        sum_tied(stage, self.transport)
        norm = grad_norm(stage, self.transport)  # the whole model's, as pipedni's locked schedules
        update_start = time.perf_counter()  # the collectives above waited for every stage: not compute
        stage.step(norm)  # same clipping, optimizer and LR schedule as pipedni's schedules
        end = time.perf_counter()
        stats = StepStats(step, step_sec=end - start, bytes_sent=self.bytes_per_step, grad_norm=norm,
                          compute_sec=self.pipe.compute_sec - compute_before + (end - update_start),
                          wait_grad_sec=update_start - reduce_start)
        if stage.is_last:  # each microbatch's mean loss; scale_grads averages them like the gradients
            stats.loss = float(sum(loss.detach() for loss in losses)) / len(losses) / scale
        return stats


def _equal_microbatches(cfg: Config, num_stages: int) -> None:
    """torch's equal-microbatch averaging would silently train something else on an uneven split."""
    m, batch, d = cfg.train.microbatches, cfg.data.batch_size, cfg.dist.data_parallel
    if batch % (m * d):
        per = f" x dist.data_parallel = {d} replicas" if d > 1 else ""
        raise LaunchError(
            f"train.schedule = {cfg.train.schedule!r} gives torch equal microbatches but data.batch_size = "
            f"{batch} does not divide into train.microbatches = {m}{per}; make it a multiple of {m * d}"
        )


def _one_f_one_b(cfg: Config, num_stages: int) -> None:
    """torch's Schedule1F1B raises a bare ValueError for M < N: refuse it at start-up instead."""
    _equal_microbatches(cfg, num_stages)
    if cfg.train.microbatches < num_stages:
        raise LaunchError(
            f"train.schedule = {cfg.train.schedule!r} needs train.microbatches >= stages, got "
            f"{cfg.train.microbatches} < {num_stages}; use --train.microbatches={num_stages} or more"
        )


SPECS = (
    ScheduleSpec("torch_gpipe", "torch.distributed.pipelining's ScheduleGPipe on the same stages (the peer)",
                 build=lambda ctx: PeerWorker(ctx, ScheduleGPipe), min_stages=2, check=_equal_microbatches),
    ScheduleSpec("torch_1f1b", "torch.distributed.pipelining's Schedule1F1B on the same stages (the peer)",
                 build=lambda ctx: PeerWorker(ctx, Schedule1F1B), min_stages=2, check=_one_f_one_b),
)
