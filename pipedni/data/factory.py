"""A user's own data sets (``data.factory``): torch Datasets of (input, label) pairs, gathered
once into the tensors every rank batches from (as the built-in sets are held)."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from pipedni.config import DataConfig
from pipedni.data.dataset import Dataset
from pipedni.errors import DataError
from pipedni.importing import call, import_function


def load(cfg: DataConfig) -> tuple[Dataset, Dataset]:
    """(train, test) from ``data.factory``."""
    key = "data.factory"
    made = call(key, import_function(key, cfg.factory), cfg.factory_args)
    if not (isinstance(made, Sequence) and len(made) == 2):
        raise DataError(f"{key} = {cfg.factory!r} returned a {type(made).__name__}; it must return (train, test), "
                        "two Datasets of (input, label) pairs")
    return from_torch(made[0], made[1], cfg.factory, cfg.num_classes, f"{key}'s")


def from_torch(train: Any, test: Any, name: str, num_classes: int = 0, whose: str = "the") -> tuple[Dataset, Dataset]:
    """Two torch Datasets of (input, label) pairs as pipedni's, of ``num_classes`` classes (0:
    the largest label seen + 1)."""
    train_x, train_y = gather(train, f"{whose} train set")
    test_x, test_y = gather(test, f"{whose} test set")
    largest = int(max(train_y.max(), test_y.max()))
    if num_classes and largest >= num_classes:
        raise DataError(f"data.num_classes = {num_classes} but {whose} data has label {largest}; raise it, or set 0 "
                        "to count the labels seen")
    classes = num_classes or largest + 1
    return Dataset(train_x, train_y, classes, name), Dataset(test_x, test_y, classes, name)


def gather(dataset: Any, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (input, label) of a map-style dataset as two stacked tensors (labels int64)."""
    try:
        pairs = [dataset[i] for i in range(len(dataset))]
    except TypeError as err:
        raise DataError(f"{what} is a {type(dataset).__name__}, not a Dataset with len() and [i] ({err})") from None
    if not pairs:
        raise DataError(f"{what} is empty")
    if not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in pairs[:1]):
        raise DataError(f"{what}[0] is a {type(pairs[0]).__name__}; each item must be an (input, label) pair")
    try:
        inputs = torch.stack([torch.as_tensor(x) for x, _ in pairs])
        targets = torch.stack([torch.as_tensor(y) for _, y in pairs])
    except (RuntimeError, TypeError, ValueError) as err:
        raise DataError(f"{what}: items differ in shape or type ({str(err).splitlines()[0]}); every input must have "
                        "one shape and every label be an integer (or integers of one shape)") from None
    if targets.is_floating_point() or targets.dtype == torch.bool or (len(targets) and targets.min() < 0):
        raise DataError(f"{what}: labels must be integers from 0 (class indices), got {targets.dtype} "
                        f"{targets.min().item()}..{targets.max().item()}")
    return inputs, targets.long()
