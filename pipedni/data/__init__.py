"""Data sets (IDX files, the mnist_5k CSV, kjv text, synthetic) and the batch order every rank shares."""

from pipedni.data.batches import batch_indices, eval_batches, steps_per_epoch, train_batches
from pipedni.data.cli import main
from pipedni.data.dataset import Dataset, Source
from pipedni.data.idx import find_idx_files, read_idx
from pipedni.data.mnist_5k import MNIST_5K_SPLIT_SEED, find_mnist_5k, stratified_split
from pipedni.data.registry import DATASETS, fetch, load_datasets

__all__ = [
    "DATASETS",
    "MNIST_5K_SPLIT_SEED",
    "Dataset",
    "Source",
    "batch_indices",
    "eval_batches",
    "fetch",
    "find_idx_files",
    "find_mnist_5k",
    "load_datasets",
    "main",
    "read_idx",
    "steps_per_epoch",
    "stratified_split",
    "train_batches",
]
