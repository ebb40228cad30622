"""Mixed precision: the dtype stages, predictors and synthetic inputs compute in (``train.precision``),
and fp16's loss scale, whose every move the stages agree on.

[Note: mixed precision]
Parameters, their gradients and the optimizer state stay fp32 (the master weights); only the
forward runs under ``torch.autocast`` (matmuls and convolutions in bf16/fp16, reductions as
autocast keeps them), and its backward follows the dtypes the forward chose. The loss is taken
on fp32 scores, outside autocast. One autocast region per forward, never one around a whole
step: autocast caches each weight's low-precision copy until its region ends, so a region that
spanned an update would keep computing with the weights before it.

fp16's range is narrow, so its gradients are computed of the loss times a scale (torch's
``GradScaler`` rule and defaults: 2^16, halved after a step with a non-finite gradient, doubled
after 2000 finite ones). The scaled gradient crosses every boundary, so every stage unscales by
the same factor; and the decision to skip a step must be one decision: a stage that skipped
alone would train on a different model from the others. The locked schedules already all-reduce
the gradient norm over stages (for clipping): it is non-finite on every stage as soon as it is on
one, so that sum is the agreed found-inf, and each stage's copy of the scale moves alike.
Decoupled schedules have no step all stages share, hence no fp16 (bf16 needs no scale).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """``train.precision`` on one device type."""

    name: str = "fp32"
    device_type: str = "cpu"

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    @property
    def mixed(self) -> bool:
        return self.name != "fp32"

    @property
    def scaled(self) -> bool:
        """Whether gradients are taken of a scaled loss (fp16)."""
        return self.name == "fp16"

    def autocast(self):
        """The region one forward runs in: see [Note: mixed precision]."""
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def wire_dtype(self, setting: str) -> Optional[torch.dtype]:
        """What floating tensors travel in between stages for ``dist.wire_dtype`` (None: their own):
        auto follows the compute dtype."""
        if setting == "auto":
            return self.dtype if self.mixed else None
        return None if setting == "same" else getattr(torch, setting)


FP32 = Precision()


def fp32(value):
    """A floating tensor as fp32 (scores for the loss: see [Note: mixed precision]); anything else as it is."""
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float32:
        return value.float()
    return value


class Autocast(nn.Module):
    """``module`` whose forward runs under ``precision``'s autocast: for torch's PipelineStage,
    which calls the module itself (the peer)."""

    def __init__(self, module: nn.Module, precision: Precision):
        super().__init__()
        self.module, self.precision = module, precision

    def forward(self, *args):
        with self.precision.autocast():
            return self.module(*args)


class LossScale:
    """fp16's dynamic loss scale, as ``torch.amp.GradScaler`` moves its own; the schedule tells
    it whether a step's gradients were finite on any stage (see [Note: mixed precision])."""

    def __init__(self, init: float = 2.0 ** 16, growth: float = 2.0, backoff: float = 0.5, interval: int = 2000):
        self.value, self.growth, self.backoff, self.interval = init, growth, backoff, interval
        self.finite_in_a_row = 0

    def update(self, finite: bool) -> None:
        if not finite:
            self.value, self.finite_in_a_row = self.value * self.backoff, 0
            return
        self.finite_in_a_row += 1
        if self.finite_in_a_row == self.interval:
            self.value, self.finite_in_a_row = self.value * self.growth, 0

    def state_dict(self) -> dict:
        return {"value": self.value, "finite_in_a_row": self.finite_in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.finite_in_a_row = float(state["value"]), int(state["finite_in_a_row"])
