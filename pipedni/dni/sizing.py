"""Choosing a stage's synthetic-gradient predictor by its measured cost (``dni.kind: auto``).

[Note: predictor budget]
A predictor runs on its stage's device at every step: a prediction before each backward and a
fit for each gradient that arrives. A predictor costlier than the stage it serves makes that
stage the pipeline's slowest and undoes the point of decoupling (the default two 1024-wide
hidden layers cost more than a 256-wide MLP stage). ``auto`` therefore takes the richest
candidate (conv on feature maps, then mlp, lowrank, linear) whose predict+fit time is within
``BUDGET`` of the stage's own forward+backward, measured once at start-up on one microbatch of
the real shapes (zero-valued: dense compute does not depend on values; BatchNorm statistics
are restored afterwards). If none fits, the cheapest measured. The choice and its timings are printed;
a run that must not depend on timing sets ``dni.kind`` itself.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable

import torch

from pipedni.config import DNIConfig
from pipedni.crossing import StageShapes, TensorSpec, example, trained_specs
from pipedni.dni.predictors import SyntheticGradientTrainer, labels_per_sample
from pipedni.stage import Stage

BUDGET = 0.12  # predict+fit time as a fraction of the stage's forward+backward


def candidates(feature_shape: tuple[int, ...], cfg: DNIConfig) -> list[DNIConfig]:
    """The predictors ``auto`` may pick for this boundary, richest first."""
    kinds = (["conv"] if len(feature_shape) == 3 else []) + ["mlp", "lowrank", "linear"]
    return [dataclasses.replace(cfg, kind=kind) for kind in kinds]


def median_sec(fn: Callable[[int], None], iters: int, warmup: int = 1, seconds: float = 0.0) -> float:
    """Median seconds of ``fn(i)``: ``warmup`` untimed calls (allocations, kernel selection), then
    ``iters`` calls or ``seconds`` of them; on a GPU each call is timed to the end of its kernels.
    The benchmark's profile times with it too."""
    sync = torch.cuda.synchronize if torch.cuda.is_initialized() else (lambda: None)
    for i in range(warmup):
        fn(i)
    samples, end = [], time.perf_counter() + seconds
    while len(samples) < iters or time.perf_counter() < end:
        sync()
        start = time.perf_counter()
        fn(len(samples))
        sync()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def stage_sec(stage: Stage, shapes: StageShapes, rows: int) -> float:
    """Seconds of one forward+backward of ``rows`` samples through the stage; the stage's
    gradients and buffers are left as they were."""
    x = example(shapes.input, rows, stage.device)
    grads = [torch.ones((rows, *s.shape[1:]) if s.batched else s.shape, dtype=s.dtype, device=stage.device)
             for s in trained_specs(shapes.output)]
    grad = grads[0] if isinstance(shapes.output, TensorSpec) else tuple(grads)  # a tuple: each trained tensor's
    buffers = {name: b.clone() for name, b in stage.module.named_buffers()}

    def run(_: int) -> None:
        stage.forward(-1, x)
        stage.backward(-1, grad)

    seconds = median_sec(run, iters=3)
    stage.optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        for name, b in stage.module.named_buffers():
            b.copy_(buffers[name])
    return seconds


def predictor_sec(trainer: SyntheticGradientTrainer, output: TensorSpec, rows: int,
                  labels_shape: tuple[int, ...], device: torch.device) -> float:
    """Seconds of one prediction and one fit for ``rows`` samples of the tensor ``output``."""
    h = torch.zeros((rows, *output.shape[1:]), dtype=output.dtype, device=device)
    grad = torch.randn_like(h) / rows
    labels = (torch.zeros((rows, *labels_shape), dtype=torch.int64, device=device)
              if trainer.cfg.condition_on_labels else None)

    def run(_: int) -> None:
        trainer.predict(h, labels)
        trainer.fit(h, labels, grad)

    return median_sec(run, iters=3)


def choose(stage: Stage, shapes: StageShapes, output: TensorSpec, cfg: DNIConfig, num_classes: int, batch_size: int,
           microbatches: int, labels_shape: tuple[int, ...]) -> tuple[SyntheticGradientTrainer, str]:
    """The richest predictor within the budget (see [Note: predictor budget]) for the stage's
    output tensor ``output``, built, and a line saying what was chosen and why."""
    feature_shape = tuple(output.shape[1:])
    rows = max(1, batch_size // microbatches)
    own = stage_sec(stage, shapes, rows)
    tried, costs = [], []
    for option in candidates(feature_shape, cfg):
        trainer = SyntheticGradientTrainer(feature_shape, num_classes, option, stage.device, batch_size,
                                           labels_per_sample(feature_shape), precision=stage.precision)
        costs.append((predictor_sec(trainer, output, rows, labels_shape, stage.device), option))
        tried.append(f"{option.kind} {costs[-1][0] * 1e3:.1f} ms")
        if costs[-1][0] <= BUDGET * own:
            break
    cost, option = costs[-1] if costs[-1][0] <= BUDGET * own else min(costs, key=lambda c: c[0])
    verdict = "within" if cost <= BUDGET * own else "the cheapest, yet over"
    fresh = SyntheticGradientTrainer(feature_shape, num_classes, option, stage.device, batch_size,
                                     labels_per_sample(feature_shape), precision=stage.precision)  # not the timed one
    return fresh, (f"stage {stage.stage_index}: dni.kind auto -> {option.kind}, {verdict} {BUDGET:.0%} of the "
                   f"stage's {own * 1e3:.1f} ms forward+backward for {rows} samples (predict+fit: {', '.join(tried)})")
