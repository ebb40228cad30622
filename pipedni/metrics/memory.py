"""Activation memory: the bytes a stage keeps alive for its backward pass, counted exactly.

A process's peak resident set (CPU) or peak allocation (GPU) mixes weights, optimizer state,
the data set and the allocator's caching with the activations a schedule keeps in flight, so
it cannot tell GPipe's M stashed microbatches from 1F1B's few. ``ActivationMeter`` counts the
activations themselves: every tensor autograd saves for backward passes through a
saved-tensors pack hook, which counts its storage until autograd drops it (after the backward
that used it, or with the graph). Parameters are excluded (they live anyway) and a storage
saved by several operations counts once. Tensors a schedule holds outside autograd (a DNI
stage's store of outputs awaiting their gradient) are declared with ``hold``.

The pack hook costs one Python call per saved tensor, so metering is opt-in
(``run.activation_memory``); ``NullMeter`` is the same interface doing nothing.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch


class _Saved:
    """What autograd keeps instead of a saved tensor; releases its count when autograd drops it."""

    __slots__ = ("tensor", "meter", "key")

    def __init__(self, tensor: torch.Tensor, meter: "ActivationMeter", key: int):
        self.tensor, self.meter, self.key = tensor, meter, key

    def __del__(self):
        self.meter._release(self.key)


class ActivationMeter:
    """``with meter: <forward passes>`` counts what they save; ``peak_bytes`` is the most alive at once."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter]):
        self._excluded = {p.untyped_storage().data_ptr() for p in parameters}
        self._live: dict[int, list[int]] = {}  # storage address -> [bytes, number of saves]
        self.saved_bytes = 0  # saved for backward now
        self.held_bytes = 0  # declared by the schedule (see hold)
        self.peak_bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def __enter__(self) -> "ActivationMeter":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    def hold(self, num_bytes: int) -> None:
        """Tensors the schedule itself keeps for later (replaces the previous declaration)."""
        self.held_bytes = num_bytes
        self._update_peak()

    def _pack(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self._excluded or storage.nbytes() == 0:
            return tensor
        entry = self._live.get(key)
        if entry is None:
            self._live[key] = [storage.nbytes(), 1]
            self.saved_bytes += storage.nbytes()
            self._update_peak()
        else:
            entry[1] += 1
        # Detached: the same storage without the grad_fn link, so a saved output does not hold
        # its own graph node alive (a reference cycle Python cannot see) when a graph is dropped.
        return _Saved(tensor.detach(), self, key)

    @staticmethod
    def _unpack(saved) -> torch.Tensor:
        return saved.tensor if isinstance(saved, _Saved) else saved

    def _release(self, key: int) -> None:
        entry = self._live[key]
        entry[1] -= 1
        if entry[1] == 0:
            del self._live[key]
            self.saved_bytes -= entry[0]

    def _update_peak(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self.saved_bytes + self.held_bytes)


class NullMeter:
    """Metering off: the same interface, no hooks, no figure."""

    peak_bytes: Optional[int] = None

    def __enter__(self) -> "NullMeter":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def hold(self, num_bytes: int) -> None:
        pass


def make_meter(enabled: bool, parameters: Iterable[torch.nn.Parameter]) -> ActivationMeter | NullMeter:
    return ActivationMeter(parameters) if enabled else NullMeter()
