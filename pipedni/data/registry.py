"""The data set registry: each data.name is one Source entry, and loading and fetching by name go through it.

Adding a data set is one module that builds its `Source` plus one line in `DATASETS`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from pipedni.config import DataConfig
from pipedni.crossing import input_slice
from pipedni.data import factory, idx, kjv, mnist_5k, synthetic
from pipedni.data.dataset import Dataset, Source
from pipedni.errors import DataError

DATASETS: dict[str, Source] = {
    source.name: source
    for source in (
        idx.FASHION_MNIST,
        idx.MNIST,
        mnist_5k.SOURCE,
        kjv.SOURCE,
        synthetic.SOURCE,
    )
}


FETCHABLE = tuple(name for name, source in DATASETS.items() if source.fetch is not None)


def get_source(name: str) -> Source:
    if name not in DATASETS:
        raise DataError(f"data set '{name}' is unknown; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


# --------------------------------------------------------------------------- loading


def _limit(dataset: Dataset, limit: int, key: str) -> Dataset:
    if limit < 0:
        raise DataError(f"data.{key} = {limit}; must be >= 0 (0: all samples)")
    if limit == 0 or limit >= len(dataset):
        return dataset
    # clone: a view would keep the whole set alive and be normalised in place through it.
    inputs = input_slice(dataset.inputs, 0, limit)
    inputs = tuple(t.clone() for t in inputs) if isinstance(inputs, tuple) else inputs.clone()
    return dataclasses.replace(dataset, inputs=inputs, targets=dataset.targets[:limit].clone())


def _normalize(train: Dataset, test: Dataset) -> None:
    """Standardise both sets in place with the training set's scalar mean and std (a single
    float input only: token ids are indices, not measurements, and of several inputs, a mask or
    a position would be ruined by it)."""
    if isinstance(train.inputs, tuple) or not train.inputs.is_floating_point():
        return
    std, mean = torch.std_mean(train.inputs, correction=0)
    std = std if std > 0 else torch.ones(())  # a constant input: centre it, do not divide by 0
    for dataset in (train, test):
        dataset.inputs.sub_(mean).div_(std)


def load_datasets(cfg: DataConfig, seed: int = 0) -> tuple[Dataset, Dataset]:
    """(train, test) of data.name (or the user's data.factory) with data.train_limit /
    data.test_limit and normalisation applied.

    Limits come first, so the normalisation statistics describe the samples actually trained on.
    """
    if cfg.factory:
        train, test = factory.load(cfg)
    else:
        source = get_source(cfg.name)
        train, test = source.load(cfg, seed)
        assert source.num_classes in (None, train.num_classes), (source.name, train.num_classes)
    return prepare(cfg, train, test)


def prepare(cfg: DataConfig, train: Dataset, test: Dataset) -> tuple[Dataset, Dataset]:
    """data.train_limit, data.test_limit, then data.normalize, on any (train, test)."""
    train = _limit(train, cfg.train_limit, "train_limit")
    test = _limit(test, cfg.test_limit, "test_limit")
    if cfg.normalize:
        _normalize(train, test)
    return train, test


# --------------------------------------------------------------------------- files


def fetch(name: str, root: str) -> Path:
    """Make the files of `name` available and return the directory that holds them."""
    source = DATASETS.get(name)
    if source is None or source.fetch is None:
        raise DataError(f"data set '{name}' has no files to fetch; choose one of {', '.join(FETCHABLE)}")
    return source.fetch(root)


def where(name: str, root: str) -> str:
    """Where the data of `name` comes from, in words: "generated", "file F" or "files in D"."""
    source = get_source(name)
    if source.find is None:
        return "generated"
    path = source.find(root)
    return f"file {path}" if path.is_file() else f"files in {path}"
