"""What crosses a stage boundary: the spec of the tensor a stage receives and sends."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TensorSpec:
    """What a receiver expects: the shape past the batch dimension, and the dtype."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    def matches(self, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
        return dtype == self.dtype and tuple(shape[1:]) == tuple(self.shape[1:])

    def describe(self) -> str:
        return f"[{', '.join(['*', *map(str, self.shape[1:])])}] {str(self.dtype).replace('torch.', '')}"

    def num_bytes(self, rows: int) -> int:
        """Payload bytes of ``rows`` samples of this spec."""
        return rows * math.prod(self.shape[1:]) * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class StageShapes:
    """What one stage receives and sends, learnt at start-up by the shape probe
    (``pipedni.schedules.passes.probe_shapes``); workers are built with it."""

    input: TensorSpec
    output: TensorSpec
