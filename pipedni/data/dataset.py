"""What a data set is: its tensors (Dataset) and its registry entry (Source: how to find, fetch and load it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from pipedni.config import DataConfig
from pipedni.errors import DataError


@dataclass
class Dataset:
    inputs: torch.Tensor  # one sample per row: float32 (N, *shape), normalised if asked, or int64 token ids (N, T)
    targets: torch.Tensor  # int64 labels in 0..num_classes-1: (N,) one per sample, or (N, T) one per position
    num_classes: int  # classes, or the vocabulary size of a text set
    name: str

    def __len__(self) -> int:
        return int(self.targets.shape[0])

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
