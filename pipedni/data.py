"""Data sets (IDX files, the mnist_5k CSV, kjv text, synthetic) and the batch order every rank shares."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from pipedni.config import DataConfig
from pipedni.datafiles import (
    FILE_NAMES,
    MNIST_5K,
    fetch,
    find_idx_files,
    find_mnist_5k,
    read_idx,
    read_mnist_5k_csv,
)
from pipedni.errors import DataError
from pipedni.textdata import KJV, TEXT_NAMES, fetch_kjv, find_kjv, read_kjv, split_windows

NUM_CLASSES = {"fashion_mnist": 10, "mnist": 10, "mnist_5k": 10}

MNIST_5K_SPLIT_SEED = 5000  # fixed, never run.seed: the test set is the same in every run
MNIST_5K_TEST_EVERY = 5  # one sample in five of each class is a test sample: 4000 / 1000


@dataclass
class Dataset:
    inputs: torch.Tensor  # one sample per row: float32 (N, *shape), normalised if asked, or int64 token ids (N, T)
    targets: torch.Tensor  # int64 labels in 0..num_classes-1: (N,) one per sample, or (N, T) one per position
    num_classes: int  # classes, or the vocabulary size of a text set
    name: str

    def __len__(self) -> int:
        return int(self.targets.shape[0])


# --------------------------------------------------------------------------- loading


def _load_idx_split(files: dict[str, Path], split: str, name: str) -> Dataset:
    images = read_idx(files[f"{split}_images"])
    labels = read_idx(files[f"{split}_labels"])
    where = f"{files[f'{split}_images']} / {files[f'{split}_labels']}"
    if images.dim() != 3 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{name} {split}: images {tuple(images.shape)} and labels {tuple(labels.shape)} do not "
            f"match ({where}); expected (N, H, W) and (N,), fetch the files again"
        )
    return _to_dataset(images, labels, name, f"{name} {split}", where)


def _to_dataset(images: torch.Tensor, labels: torch.Tensor, name: str, what: str, where: str) -> Dataset:
    """(N, H, W) pixels 0-255 and integer labels as a Dataset with inputs in [0, 1]."""
    targets = labels.long()
    num_classes = NUM_CLASSES[name]
    if len(targets) and (targets.min() < 0 or targets.max() >= num_classes):
        raise DataError(f"{what}: labels outside 0..{num_classes - 1} in {where}; fetch the files again")
    inputs = images.unsqueeze(1).float().div_(255.0)
    return Dataset(inputs=inputs, targets=targets, num_classes=num_classes, name=name)


def _synthetic(cfg: DataConfig, seed: int) -> tuple[Dataset, Dataset]:
    """Class-dependent means plus unit noise: learnable, cheap, and fixed by `seed` alone."""
    shape, num_classes, size = list(cfg.synthetic_shape), cfg.synthetic_classes, cfg.synthetic_size
    if not shape or min(shape) < 1 or num_classes < 2 or size < 1:
        raise DataError(
            f"synthetic data needs positive data.synthetic_shape (got {shape}), data.synthetic_classes "
            f">= 2 (got {num_classes}) and data.synthetic_size >= 1 (got {size})"
        )
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(num_classes, *shape, generator=gen)

    def draw(n: int) -> Dataset:
        targets = torch.randint(num_classes, (n,), generator=gen)
        inputs = means[targets] + torch.randn(n, *shape, generator=gen)
        return Dataset(inputs=inputs, targets=targets, num_classes=num_classes, name="synthetic")

    return draw(size), draw(max(1, size // 4))


def _limit(dataset: Dataset, limit: int, key: str) -> Dataset:
    if limit < 0:
        raise DataError(f"data.{key} = {limit}; must be >= 0 (0: all samples)")
    if limit == 0 or limit >= len(dataset):
        return dataset
    # clone: a view would keep the whole set alive and be normalised in place through it.
    inputs, targets = dataset.inputs[:limit].clone(), dataset.targets[:limit].clone()
    return Dataset(inputs=inputs, targets=targets, num_classes=dataset.num_classes, name=dataset.name)


def _normalize(train: Dataset, test: Dataset) -> None:
    """Standardise both sets in place with the training set's scalar mean and std (float inputs
    only: token ids are indices, not measurements)."""
    if not train.inputs.is_floating_point():
        return
    std, mean = torch.std_mean(train.inputs, correction=0)
    std = std if std > 0 else torch.ones(())  # a constant input: centre it, do not divide by 0
    for dataset in (train, test):
        dataset.inputs.sub_(mean).div_(std)


def load_datasets(cfg: DataConfig, seed: int = 0) -> tuple[Dataset, Dataset]:
    """(train, test) with data.train_limit / data.test_limit and normalisation applied.

    Limits come first, so the normalisation statistics describe the samples actually trained on.
    """
    if cfg.name == "synthetic":
        train, test = _synthetic(cfg, seed)
    elif cfg.name == MNIST_5K:
        train, test = _load_mnist_5k(cfg.root)
    elif cfg.name == KJV:
        train, test = _load_kjv(cfg.root, cfg.seq_len)
    else:
        files = find_idx_files(cfg.name, cfg.root)
        train, test = _load_idx_split(files, "train", cfg.name), _load_idx_split(files, "test", cfg.name)
    train = _limit(train, cfg.train_limit, "train_limit")
    test = _limit(test, cfg.test_limit, "test_limit")
    if cfg.normalize:
        _normalize(train, test)
    return train, test


# --------------------------------------------------------------------------- mnist_5k (CSV)

# [Note: mnist_5k split]
# The CSV has no train/test split and its rows are sorted by label, so a plain slice would put
# whole classes in one split. stratified_split keeps one sample in MNIST_5K_TEST_EVERY of each
# class for the test set, picked by a generator seeded with MNIST_5K_SPLIT_SEED rather than
# run.seed: changing the run seed must never move samples between train and test. Both splits
# come out shuffled (a second shuffle, after the per-class choice), so that data.train_limit /
# data.test_limit, which keep a prefix, keep the class balance too.


def stratified_split(targets: torch.Tensor, test_every: int, seed: int) -> tuple[torch.Tensor, ...]:
    """(train, test) indices, both shuffled; len(class) // test_every of each class go to test.

    See [Note: mnist_5k split].
    """
    gen = torch.Generator().manual_seed(seed)
    is_test = torch.zeros(len(targets), dtype=torch.bool)
    for label in targets.unique():
        members = torch.nonzero(targets == label).flatten()
        is_test[members[torch.randperm(len(members), generator=gen)[: len(members) // test_every]]] = True
    # Shuffled anew, not kept in the sorted file order, so any prefix of a split is balanced too.
    train, test = torch.nonzero(~is_test).flatten(), torch.nonzero(is_test).flatten()
    return train[torch.randperm(len(train), generator=gen)], test[torch.randperm(len(test), generator=gen)]


def _load_mnist_5k(root: str) -> tuple[Dataset, Dataset]:
    path = find_mnist_5k(root)
    images, labels = read_mnist_5k_csv(path)
    full = _to_dataset(images, labels, MNIST_5K, MNIST_5K, str(path))
    train_index, test_index = stratified_split(full.targets, MNIST_5K_TEST_EVERY, MNIST_5K_SPLIT_SEED)

    def subset(index: torch.Tensor) -> Dataset:
        return Dataset(full.inputs[index], full.targets[index], full.num_classes, MNIST_5K)

    return subset(train_index), subset(test_index)


# --------------------------------------------------------------------------- kjv (text)


def _load_kjv(root: str, seq_len: int) -> tuple[Dataset, Dataset]:
    """Next-character prediction: seq_len-character windows and the same windows shifted by one."""
    (train_inputs, train_targets), (test_inputs, test_targets), vocab_size = split_windows(
        read_kjv(find_kjv(root)), seq_len
    )
    return (Dataset(train_inputs, train_targets, vocab_size, KJV), Dataset(test_inputs, test_targets, vocab_size, KJV))


# --------------------------------------------------------------------------- batch order


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
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
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
        yield step, dataset.inputs.index_select(0, index), dataset.targets.index_select(0, index)


def eval_batches(dataset: Dataset, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The data set in order, in batches of batch_size (the last may be smaller)."""
    if batch_size < 1:
        raise DataError(f"eval batch size {batch_size}; must be >= 1")
    for start in range(0, len(dataset), batch_size):
        yield dataset.inputs[start : start + batch_size], dataset.targets[start : start + batch_size]


# --------------------------------------------------------------------------- command line


def _info(name: str, root: str) -> None:
    train, test = load_datasets(DataConfig(name=name, root=root), seed=0)
    if name == "synthetic":
        where = "generated"
    elif name == MNIST_5K:
        where = f"file {find_mnist_5k(root)}"
    elif name == KJV:
        where = f"file {find_kjv(root)}"
    else:
        where = f"files in {find_idx_files(name, root)['train_images'].parent}"
    print(
        f"{name}: train {len(train)}, test {len(test)}, input shape {tuple(train.inputs.shape[1:])}, "
        f"{train.num_classes} classes ({where})"
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipedni.data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    fetch_parser = commands.add_parser("fetch", help="make a data set's files available")
    fetch_parser.add_argument("name", choices=FILE_NAMES + TEXT_NAMES)
    info_parser = commands.add_parser("info", help="print sizes, input shape and classes")
    info_parser.add_argument("name", choices=FILE_NAMES + TEXT_NAMES + ("synthetic",))
    for sub in (fetch_parser, info_parser):
        sub.add_argument("--root", default="data", help="directory searched first (default: data)")
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch" and args.name == KJV:
            print(f"{args.name}: text file in {fetch_kjv(args.root)}")
        elif args.command == "fetch":
            kind = "CSV file" if args.name == MNIST_5K else "IDX files"
            print(f"{args.name}: {kind} in {fetch(args.name, args.root)}")
        else:
            _info(args.name, args.root)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
