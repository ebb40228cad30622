"""The peer: torch.distributed.pipelining's ScheduleGPipe / Schedule1F1B on pipedni's own stages.

For an honest benchmark the peer shares everything but the schedule: the same stage modules,
data, loss (``stage.loss_fn``), optimizer, LR schedule and clipping (``Stage.step``), metrics and
evaluation. Forward, backward and their point-to-point messages are torch's (``PipelineStage``
over the default process group). pipedni's transport is used only where torch's schedules have
nothing to offer: the start-up shape probe and the forward-only evaluation pass.
"""

from __future__ import annotations

import time
from typing import Iterable, Optional

import torch
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from pipedni.stage import Stage, loss_fn
from pipedni.transport import TensorSpec, Transport
from pipedni.worker import EvalResult, StageWorker, StepStats

SCHEDULES = {"torch_gpipe": ScheduleGPipe, "torch_1f1b": Schedule1F1B}


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


def _example(spec: TensorSpec, rows: int, device: torch.device, requires_grad: bool) -> torch.Tensor:
    """A microbatch-shaped example; torch reads from requires_grad which gradients travel back."""
    return torch.empty((rows, *spec.shape[1:]), dtype=spec.dtype, device=device, requires_grad=requires_grad)


class PeerWorker:
    """Same interface as StageWorker for ``train.schedule: torch_gpipe | torch_1f1b``."""

    def __init__(self, stage: Stage, transport: Transport, schedule: str, num_microbatches: int, batch_size: int):
        self.stage, self.transport = stage, transport
        self.schedule_name, self.num_microbatches, self.batch_size = schedule, num_microbatches, batch_size
        self.locked = StageWorker(stage, transport, "1f1b", num_microbatches)  # probe and evaluation
        self.pipe: Optional[_TimedStage] = None
        self.schedule = None
        self.bytes_per_step = 0

    @property
    def num_evals(self) -> int:
        return self.locked.num_evals

    def connect(self, sample_spec: TensorSpec, num_classes: int) -> None:
        """Probe shapes with pipedni's transport, then give torch static microbatch shapes
        (no shape inference round at the first step)."""
        self.locked.connect(sample_spec, num_classes)
        stage, rows = self.stage, self.batch_size // self.num_microbatches
        self.pipe = _TimedStage(stage.module, stage.stage_index, stage.num_stages, stage.device,
                                input_args=_example(stage.input_spec, rows, stage.device, not stage.is_first),
                                output_args=_example(stage.output_spec, rows, stage.device, True))
        self.schedule = SCHEDULES[self.schedule_name](self.pipe, self.num_microbatches, loss_fn=loss_fn)
        # What torch's schedule sends per step: M activations forward (but the last stage) and M
        # input gradients backward (but the first); torch keeps no byte counters of its own.
        out_bytes = 0 if stage.is_last else stage.output_spec.num_bytes(rows)
        in_bytes = 0 if stage.is_first else stage.input_spec.num_bytes(rows)
        self.bytes_per_step = self.num_microbatches * (out_bytes + in_bytes)

    def train_step(self, step: int, inputs: Optional[torch.Tensor], targets: torch.Tensor) -> StepStats:
        stage, start = self.stage, time.perf_counter()
        compute_before = self.pipe.compute_sec
        losses: Optional[list] = [] if stage.is_last else None
        args = (inputs.to(stage.device),) if stage.is_first else ()
        target = targets.to(stage.device) if stage.is_last else None
        self.schedule.step(*args, target=target, losses=losses, return_outputs=False)
        step_start = time.perf_counter()
        grad_norm = stage.step()  # same clipping, optimizer and LR schedule as pipedni's schedules
        end = time.perf_counter()
        stats = StepStats(step, step_sec=end - start, bytes_sent=self.bytes_per_step, grad_norm=grad_norm,
                          compute_sec=self.pipe.compute_sec - compute_before + (end - step_start))
        if stage.is_last:  # each microbatch's mean loss; scale_grads averages them like the gradients
            stats.loss = float(sum(loss.detach() for loss in losses)) / len(losses)
        return stats

    def finish(self) -> None:
        """Nothing is owed: torch's schedule waits for every message within the step."""

    def held_bytes(self) -> int:
        return 0

    def extra_state(self) -> dict:
        return {}

    def evaluate(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Optional[EvalResult]:
        return self.locked.evaluate(batches)
