"""What crosses a stage boundary: the spec of what a stage receives and sends, one tensor, or a
tuple of them where a split model passes several (see [Note: what crosses a boundary] in
split/stages.py)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence, Union

import torch

if TYPE_CHECKING:
    from pipedni.transport.wire import Header


@dataclass(frozen=True)
class TensorSpec:
    """What a receiver expects: the shape past the batch dimension, and the dtype."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool = False  # in a tuple: the tensor needs a gradient (a bare one always gets one)
    batched: bool = True  # in a tuple: the first dimension is the batch's (a rotary table is not)
    name: str = ""  # in a tuple of a split model: the tensor's name in the model's graph (for messages)

    def matches(self, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
        return dtype == self.dtype and tuple(shape[1:]) == tuple(self.shape[1:])

    def describe(self) -> str:
        shape = f"[{', '.join(['*', *map(str, self.shape[1:])])}] {str(self.dtype).replace('torch.', '')}"
        return f"{self.name} {shape}" if self.name else shape

    def num_bytes(self, rows: int) -> int:
        """Payload bytes of ``rows`` samples of this spec (of the tensor as it is, if not batched)."""
        size = rows * math.prod(self.shape[1:]) if self.batched else math.prod(self.shape)
        return size * self.dtype.itemsize


Value = Union[torch.Tensor, tuple[torch.Tensor, ...]]  # what one message carries
Spec = Union[TensorSpec, tuple[TensorSpec, ...]]  # what a receiver expects of it


PROBE_ROWS = 2  # samples in the start-up probe: a tuple's tensors of another first dimension are not batched


def spec_of(value: Value, rows: int = PROBE_ROWS) -> Spec:
    """The spec of a message of ``rows`` samples (a tuple's tensors whose first dimension is not
    ``rows`` are marked as not batched)."""
    if isinstance(value, tuple):
        return tuple(TensorSpec(tuple(t.shape), t.dtype, t.requires_grad, t.dim() > 0 and t.shape[0] == rows)
                     for t in value)
    return TensorSpec(tuple(value.shape), value.dtype)


def example(spec: Spec, rows: int, device: torch.device) -> Value:
    """Zeros of ``rows`` samples shaped by ``spec``; in a tuple, needing a gradient where it
    says, and a tensor that is not batched keeps its own shape."""
    if isinstance(spec, tuple):
        return tuple(torch.zeros((rows, *s.shape[1:]) if s.batched else s.shape, dtype=s.dtype, device=device)
                     .requires_grad_(s.requires_grad) for s in spec)
    return torch.zeros((rows, *spec.shape[1:]), dtype=spec.dtype, device=device)


def named(spec: Spec, names: Sequence[str]) -> Spec:
    """A tuple's specs with the names of its tensors (a split model's boundary), for messages."""
    if not isinstance(spec, tuple) or len(names) != len(spec):
        return spec
    return tuple(dataclasses.replace(s, name=name) for s, name in zip(spec, names))


def gradient_spec(spec: Spec) -> Spec:
    """What the gradient message of a boundary with ``spec`` carries: one gradient for a bare
    tensor, else one per tensor that needs it, in order."""
    if isinstance(spec, tuple):
        return tuple(s for s in spec if s.requires_grad)
    return spec


def num_tensors(spec: Spec) -> int:
    return len(spec) if isinstance(spec, tuple) else 1


def trained_indices(spec: Spec) -> Optional[list[int]]:
    """Where in a tuple the tensors a decoupled boundary learns the gradients of sit: those that
    need a gradient (None for a bare tensor)."""
    if not isinstance(spec, tuple):
        return None
    return [i for i, s in enumerate(spec) if s.requires_grad]


def trained_specs(spec: Spec) -> list[TensorSpec]:
    """The specs of the tensors a decoupled boundary learns the gradients of."""
    return [spec] if isinstance(spec, TensorSpec) else [spec[i] for i in trained_indices(spec)]


def value_bytes(value: Optional[Value]) -> int:
    """Bytes of a tensor, or of every tensor of a tuple (0 for None)."""
    if value is None:
        return 0
    return sum(t.nbytes for t in value) if isinstance(value, tuple) else value.nbytes


# A batch of network inputs is a Value too: one tensor, or a tuple of tensors (the model's
# inputs in its forward's order), every one with the batch on its first dimension.


def input_rows(value: Value, index: torch.Tensor) -> Value:
    """The samples at ``index`` of every tensor of a batch."""
    return tuple(t.index_select(0, index) for t in value) if isinstance(value, tuple) else value.index_select(0, index)


def input_slice(value: Value, start: int, stop: Optional[int]) -> Value:
    """Samples ``start:stop`` of every tensor of a batch (views)."""
    return tuple(t[start:stop] for t in value) if isinstance(value, tuple) else value[start:stop]


def input_to(value: Value, device: torch.device, non_blocking: bool = False) -> Value:
    if isinstance(value, tuple):
        return tuple(t.to(device, non_blocking=non_blocking) for t in value)
    return value.to(device, non_blocking=non_blocking)


def input_split(value: Value, parts: int) -> list[Value]:
    """A batch in ``parts`` microbatches, as ``torch.tensor_split`` cuts each tensor."""
    if isinstance(value, tuple):
        return list(zip(*(torch.tensor_split(t, parts) for t in value)))
    return list(torch.tensor_split(value, parts))


def num_inputs(value: Value) -> int:
    return len(value) if isinstance(value, tuple) else 1


def input_spec(value: Value, names: Sequence[str] = ()) -> Spec:
    """The spec of one sample of a batch (every tensor batched, none needing a gradient), with
    the inputs' ``names`` where they have them."""
    if isinstance(value, tuple):
        labels = list(names) or [""] * len(value)
        return tuple(TensorSpec((1, *t.shape[1:]), t.dtype, name=name) for t, name in zip(value, labels))
    return TensorSpec((1, *value.shape[1:]), value.dtype)


def describe_spec(spec: Spec) -> str:
    if isinstance(spec, tuple):
        return f"({', '.join(s.describe() for s in spec)})"
    return spec.describe()


def spec_matches(spec: Spec, headers: Sequence["Header"]) -> bool:
    """Whether a message with these headers is what ``spec`` expects (tuple for tuple, and each tensor)."""
    if isinstance(spec, tuple):
        if not headers[0].grouped:
            return False
        if headers[0].num_parts == 0:
            return not spec
        return len(spec) == len(headers) and all(s.matches(h.shape, h.dtype) for s, h in zip(spec, headers))
    return not headers[0].grouped and spec.matches(headers[0].shape, headers[0].dtype)


def describe_headers(headers: Sequence["Header"]) -> str:
    if headers[0].grouped:
        return "()" if headers[0].num_parts == 0 else f"({', '.join(h.describe() for h in headers)})"
    return headers[0].describe()


@dataclass(frozen=True)
class StageShapes:
    """What one stage receives and sends, learnt at start-up by the shape probe
    (``pipedni.schedules.passes.probe_shapes``); workers are built with it."""

    input: Spec
    output: Spec
