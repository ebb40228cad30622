"""What a data set is: its tensors (Dataset) and its registry entry (Source: how to find, fetch and load it)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from pipedni.config import DataConfig
from pipedni.crossing import Value, describe_spec, input_spec
from pipedni.errors import DataError


@dataclass
class Dataset:
    # One sample per row: float32 (N, *shape), normalised if asked, or int64 token ids (N, T); a
    # user's data (data.factory) may give several inputs, a tuple of such tensors in the order
    # the model's first stage takes them (named by input_names when they came as a dict).
    inputs: Value
    targets: torch.Tensor  # int64 labels in 0..num_classes-1: (N,) one per sample, or (N, T) one per position
    num_classes: int  # classes, or the vocabulary size of a text set
    name: str
    input_names: tuple[str, ...] = ()  # the names of a tuple's inputs (forward's parameters), if given by name

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def in_order(self, names: Sequence[str]) -> Dataset:
        """This set with its inputs named by ``names`` (the first stage's, in its order): named
        inputs are put in that order, a tuple's take the names in turn."""
        if not isinstance(self.inputs, tuple) or list(names) == list(self.input_names):
            return self
        if not self.input_names:
            return dataclasses.replace(self, input_names=tuple(names))
        where = {name: i for i, name in enumerate(self.input_names)}
        return dataclasses.replace(self, inputs=tuple(self.inputs[where[n]] for n in names), input_names=tuple(names))

    def describe_inputs(self) -> str:
        """One sample's inputs, e.g. ``[1, 28, 28] float32`` or ``(input_ids [64] int64, ...)``."""
        return describe_spec(input_spec(self.inputs, self.input_names))

    @classmethod
    def from_images(
        cls, images: torch.Tensor, labels: torch.Tensor, num_classes: int, name: str, what: str, where: str
    ) -> Dataset:
        """(N, H, W) pixels 0-255 and integer labels as a Dataset with inputs in [0, 1]; `what` and
        `where` name the split and its files in the error about a label out of range."""
        targets = labels.long()
        if len(targets) and (targets.min() < 0 or targets.max() >= num_classes):
            raise DataError(f"{what}: labels outside 0..{num_classes - 1} in {where}; fetch the files again")
        inputs = images.unsqueeze(1).float().div_(255.0)
        return cls(inputs=inputs, targets=targets, num_classes=num_classes, name=name)


@dataclass(frozen=True)
class Source:
    """One data set of the registry (pipedni/data/registry.py): all that its data.name stands for."""

    name: str  # the data.name value
    load: Callable[[DataConfig, int], tuple[Dataset, Dataset]]  # (cfg, seed) -> (train, test), before limits
    num_classes: Optional[int]  # classes of every load; None: the file or the config decide (kjv, synthetic)
    find: Optional[Callable[[str], Path]] = None  # root -> its file, or the directory of its files; None: generated
    fetch: Optional[Callable[[str], Path]] = None  # root -> the directory now holding its files; None: no files
    files: str = ""  # what fetch makes available, in its message: "IDX files", "CSV file", "text file"
