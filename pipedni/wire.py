"""What one message is on the wire: its kind, and the header that precedes its payload.

A header is a fixed-size int64 tensor (kind, step, microbatch, dtype, wire dtype, shape), so
the receiver can allocate the payload before it arrives and check it against what it expects.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional

import torch

from pipedni.errors import TransportError

MAX_DIMS = 8
HEADER_LEN = 6 + MAX_DIMS
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8, torch.bool]


class Kind(enum.IntEnum):
    ACTIVATION = 0
    GRADIENT = 1
    EVAL = 2
    SHAPE = 3
    WARMUP = 4
    CLOSE = 5


@dataclass(frozen=True)
class Header:
    kind: Kind
    step: int
    microbatch: int
    dtype: torch.dtype  # the tensor's own, which the receiver gets
    shape: tuple[int, ...]
    wire_dtype: Optional[torch.dtype] = None  # the payload's on the wire (None: the tensor's own)

    def encode(self) -> torch.Tensor:
        if len(self.shape) > MAX_DIMS:
            raise TransportError(f"tensor of {len(self.shape)} dims exceeds the transport's {MAX_DIMS}")
        dims = list(self.shape) + [0] * (MAX_DIMS - len(self.shape))
        values = [int(self.kind), self.step, self.microbatch, DTYPES.index(self.dtype),
                  DTYPES.index(self.wire_dtype or self.dtype), len(self.shape), *dims]
        return torch.tensor(values, dtype=torch.int64)

    @staticmethod
    def decode(t: torch.Tensor) -> "Header":
        v = t.tolist()
        dtype, wire = DTYPES[v[3]], DTYPES[v[4]]
        return Header(Kind(v[0]), v[1], v[2], dtype, tuple(v[6 : 6 + v[5]]), None if wire == dtype else wire)

    @property
    def payload_dtype(self) -> torch.dtype:
        return self.wire_dtype or self.dtype

    def describe(self) -> str:
        return f"{list(self.shape)} {str(self.dtype).replace('torch.', '')}"


def describe_message(kind: Kind, step: int, microbatch: int) -> str:
    return f"{kind.name.lower()} of step {step} microbatch {microbatch}"
