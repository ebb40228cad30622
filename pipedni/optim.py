"""Optimizers and learning-rate schedules (clipping: ``Stage.step`` with the norm its schedule measured)."""

from __future__ import annotations

import math
from typing import Iterable

import torch

from pipedni.config import OptimConfig


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    params = list(params)
    if not params:
        # A stage without parameters (pooling, activations, a user's reshaping layer) still runs
        # the schedule's STEP and LR schedule; an empty placeholder never gets a gradient.
        params = [torch.nn.Parameter(torch.zeros(0))]
    if cfg.name == "sgd":
        return fused(torch.optim.SGD, params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    betas = (cfg.betas[0], cfg.betas[1])
    kind = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
    return fused(kind, params, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay)


def fused(kind: type[torch.optim.Optimizer], params: list, **kwargs) -> torch.optim.Optimizer:
    """``kind`` with its fused kernel where torch has one for these parameters, else the default.

    The default per-parameter loop dominates a CPU stage's update: Adam over 2.1 M weights took
    12.6 ms a step against 1.7 ms fused (torch 2.13, 1 thread) next to ~24 ms of forward+backward.
    """
    try:
        return kind(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for this device or dtype
        return kind(params, **kwargs)


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier of ``cfg.lr`` at ``step`` (0-based): constant, or linear warmup then cosine."""
    if cfg.lr_schedule == "constant":
        return 1.0
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.min_lr / cfg.lr
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, total_steps))
