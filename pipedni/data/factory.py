"""A user's own data sets (``data.factory``): torch Datasets of (input, label) pairs, gathered
once into the tensors every rank batches from (as the built-in sets are held). An input may be
several tensors: a tuple in forward's order, or a dict by forward's parameter names."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from pipedni.config import DataConfig
from pipedni.crossing import Value, describe_spec, input_spec, num_inputs
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
    the largest label seen + 1). An input is a tensor, a tuple of tensors (the model's inputs
    in forward's order) or a dict of them by forward's parameter names."""
    train_x, train_y, names = gather(train, f"{whose} train set")
    test_x, test_y, test_names = gather(test, f"{whose} test set")
    if test_names != names or num_inputs(test_x) != num_inputs(train_x):
        raise DataError(f"{whose} test set's inputs are {describe_spec(input_spec(test_x, test_names))} but its train "
                        f"set's are {describe_spec(input_spec(train_x, names))}; give both sets the same inputs")
    largest = int(max(train_y.max(), test_y.max()))
    if num_classes and largest >= num_classes:
        raise DataError(f"data.num_classes = {num_classes} but {whose} data has label {largest}; raise it, or set 0 "
                        "to count the labels seen")
    classes = num_classes or largest + 1
    return Dataset(train_x, train_y, classes, name, names), Dataset(test_x, test_y, classes, name, names)


def gather(dataset: Any, what: str) -> tuple[Value, torch.Tensor, tuple[str, ...]]:
    """Every (input, label) of a map-style dataset as stacked tensors (labels int64): the
    inputs, the labels, and the inputs' names when they come as dicts."""
    try:
        pairs = [dataset[i] for i in range(len(dataset))]
    except TypeError as err:
        raise DataError(f"{what} is a {type(dataset).__name__}, not a Dataset with len() and [i] ({err})") from None
    if not pairs:
        raise DataError(f"{what} is empty")
    if not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in pairs[:1]):
        raise DataError(f"{what}[0] is a {type(pairs[0]).__name__}; each item must be an (input, label) pair")
    names, inputs = _stack_inputs([x for x, _ in pairs], what)
    targets = _stack([y for _, y in pairs], what, "label")
    if targets.is_floating_point() or targets.dtype == torch.bool or (len(targets) and targets.min() < 0):
        raise DataError(f"{what}: labels must be integers from 0 (class indices), got {targets.dtype} "
                        f"{targets.min().item()}..{targets.max().item()}")
    return inputs, targets.long(), names


def _stack_inputs(items: list, what: str) -> tuple[tuple[str, ...], Value]:
    """The inputs of every item stacked: one tensor, or one per position (tuple) or name (dict)."""
    first = items[0]
    if isinstance(first, Mapping):
        names = tuple(first)
        if not names or any(not isinstance(x, Mapping) or tuple(x) != names for x in items):
            raise DataError(f"{what}: inputs are dicts, but not all with the same keys as the first ({list(names)}); "
                            "give every item the same named inputs")
        return names, tuple(_stack([x[k] for x in items], what, f"input {k!r}") for k in names)
    if isinstance(first, (tuple, list)):
        if not first or any(not isinstance(x, (tuple, list)) or len(x) != len(first) for x in items):
            raise DataError(f"{what}: inputs are sequences, but not all of {len(first)} tensors like the first; give "
                            "every item the same inputs")
        return (), tuple(_stack([x[k] for x in items], what, f"input {k}") for k in range(len(first)))
    return (), _stack(items, what, "input")


def _stack(values: list, what: str, which: str) -> torch.Tensor:
    try:
        return torch.stack([torch.as_tensor(v) for v in values])
    except (RuntimeError, TypeError, ValueError) as err:
        raise DataError(f"{what}: items' {which} differ in shape or type ({str(err).splitlines()[0]}); every input "
                        "must have one shape and every label be an integer (or integers of one shape)") from None
