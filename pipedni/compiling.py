"""Compiled stages (``train.compile``): ``torch.compile`` of each stage module, compiled before
training starts so that its time is reported apart from training time, and eager where it
cannot be compiled.

[Note: compiling a stage]
The module's forward is compiled in place (on the instance, so its parameter names stay; not
``nn.Module.compile``, whose ``fullgraph`` finds nothing to compile in torch 2.13) as one graph
(``fullgraph``): a graph break would split a millisecond stage into pieces that cost more than
they save, so a model that breaks, or a backend that fails, runs eager, said in one line naming
the reason. torch compiles lazily, on the first call of each input shape: a warm-up forward and
backward of each microbatch size the schedule will run (``torch.tensor_split`` makes at most two)
compiles both graphs before the clock starts, and leaves no trace (no gradient, batch-norm
statistics and RNG as they were). Parameters are graph inputs, not constants (dynamo's default
for ``nn.Module``s), so a forward on stashed weights (``Stage.stash``) reuses the graph. An
evaluation's batch size compiles once more, during the first evaluation, which is not
training time either.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

from pipedni.crossing import StageShapes, example, gradient_spec
from pipedni.stage import Stage, kept_norm_stats

WARM_KEY = -1  # the warm-up microbatch's key: no schedule uses a negative one


def microbatch_rows(batch_size: int, num_microbatches: int) -> list[int]:
    """The distinct sizes of the microbatches ``torch.tensor_split`` cuts a batch into."""
    sizes = {len(piece) for piece in torch.tensor_split(torch.empty(batch_size), num_microbatches)}
    return sorted(sizes - {0}, reverse=True)


def compile_stage(stage: Stage, shapes: StageShapes, rows: Sequence[int],
                  labels_shape: tuple[int, ...]) -> tuple[float, bool]:
    """Compile ``stage``'s module and warm it on microbatches of ``rows`` samples; returns the
    seconds that took and whether it compiled. A stage that cannot be is left eager, saying why."""
    start, module = time.perf_counter(), stage.module
    eager = module.__dict__.get("forward")  # the instance's own (train.activation_checkpointing), or None
    module.forward = torch.compile(module.forward, fullgraph=True)
    try:
        for n in rows:
            _warm(stage, shapes, n, labels_shape)
    except Exception as err:  # a graph break, an unsupported op, a failing backend: see the note
        if eager is None:
            del module.forward
        else:
            module.forward = eager
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"stage {stage.stage_index}: train.compile: runs eager, the stage cannot be compiled as one graph "
              f"({type(err).__name__}: {reason[:200]})", flush=True)
        return time.perf_counter() - start, False
    return time.perf_counter() - start, True


def _warm(stage: Stage, shapes: StageShapes, rows: int, labels_shape: tuple[int, ...]) -> None:
    """One forward and backward of ``rows`` samples that leaves nothing behind."""
    x = example(shapes.input, rows, stage.device)
    target = torch.zeros((rows, *labels_shape), dtype=torch.long, device=stage.device) if stage.is_last else None
    grad = None if stage.is_last else example(gradient_spec(shapes.output), rows, stage.device)
    with kept_norm_stats(stage.module), torch.random.fork_rng(devices=_devices(stage.device)):
        try:
            stage.forward(WARM_KEY, x, target)
            stage.backward(WARM_KEY, grad)
        finally:
            stage.inputs.pop(WARM_KEY, None)
            stage.outputs.pop(WARM_KEY, None)
            stage.optimizer.zero_grad(set_to_none=True)
            stage.take_loss()


def _devices(device: torch.device) -> list:
    return [device] if device.type == "cuda" else []
