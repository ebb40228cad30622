"""The batch order every rank shares: shuffled full batches per epoch, fixed by (seed, epoch) alone."""

from __future__ import annotations

from typing import Iterator

import torch

from pipedni.crossing import Value, input_rows, input_slice
from pipedni.data.dataset import Dataset
from pipedni.errors import DataError


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    """Full batches in one epoch (the last partial batch is dropped)."""
    if batch_size < 1:
        raise DataError(f"batch size {batch_size}; must be >= 1")
    if num_samples < batch_size:
        raise DataError(
            f"{num_samples} training samples cannot fill one batch of {batch_size}; "
            "lower data.batch_size or raise data.train_limit"
        )
    return num_samples // batch_size


def batch_indices(num_samples: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """The shuffled batches of one epoch, each exactly `batch_size` int64 indices.

    The order depends on (seed, epoch) only, so every rank derives the same batches without
    communicating; the large odd multiplier keeps (seed, epoch) pairs from colliding.
    """
    num_batches = steps_per_epoch(num_samples, batch_size)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_samples, generator=gen)
    return list(order[: num_batches * batch_size].split(batch_size))


def train_batches(
    dataset: Dataset, batch_size: int, seed: int, num_steps: int, start_step: int = 0
) -> Iterator[tuple[int, Value, torch.Tensor]]:
    """(step, inputs, targets) for steps start_step .. num_steps-1, epoch = step // steps_per_epoch."""
    if start_step < 0:
        raise DataError(f"start step {start_step}; must be >= 0")
    per_epoch = steps_per_epoch(len(dataset), batch_size)
    epoch, batches = -1, []
    for step in range(start_step, num_steps):
        if step // per_epoch != epoch:
            epoch = step // per_epoch
            batches = batch_indices(len(dataset), batch_size, seed, epoch)
        index = batches[step % per_epoch]
        yield step, input_rows(dataset.inputs, index), dataset.targets.index_select(0, index)


def eval_batches(dataset: Dataset, batch_size: int) -> Iterator[tuple[Value, torch.Tensor]]:
    """The data set in order, in batches of batch_size (the last may be smaller)."""
    if batch_size < 1:
        raise DataError(f"eval batch size {batch_size}; must be >= 1")
    for start in range(0, len(dataset), batch_size):
        yield input_slice(dataset.inputs, start, start + batch_size), dataset.targets[start : start + batch_size]
