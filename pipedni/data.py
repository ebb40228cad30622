"""Data sets and the deterministic batch order every rank shares."""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from pipedni.config import DataConfig
from pipedni.errors import DataError

IDX_NAMES = ("fashion_mnist", "mnist")
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
NUM_CLASSES = {"fashion_mnist": 10, "mnist": 10}
# Where torchvision's FashionMNIST / MNIST classes unpack their raw files under a root.
TORCHVISION_DIRS = {"fashion_mnist": "FashionMNIST/raw", "mnist": "MNIST/raw"}
# Searched last; `apt-get install dataset-fashion-mnist` puts the .gz files here.
DEBIAN_DIRS = {
    "fashion_mnist": Path("/usr/share/datasets/fashion-mnist"),
    "mnist": Path("/usr/share/datasets/mnist"),
}
DEBIAN_PACKAGES = {"fashion_mnist": "dataset-fashion-mnist"}
MIRRORS = {
    "fashion_mnist": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
    "mnist": ["https://ossci-datasets.s3.amazonaws.com/mnist/"],
}
# IDX type code -> big-endian numpy dtype (the format stores multi-byte values big-endian).
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass
class Dataset:
    inputs: torch.Tensor  # float32, (N, C, H, W), normalised if asked
    targets: torch.Tensor  # int64, (N,)
    num_classes: int
    name: str

    def __len__(self) -> int:
        return int(self.targets.shape[0])


# --------------------------------------------------------------------------- IDX files


def _read_bytes(path: Path) -> bytes:
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:
        # gzip.BadGzipFile is an OSError; a cut-off .gz raises EOFError.
        raise DataError(f"IDX file '{path}' cannot be read ({err}); delete it and fetch it again") from None


def _parse_header(raw: bytes, path: Path) -> tuple[str, list[int], int]:
    """(numpy dtype, dims, header length) of an IDX byte string, validated against its size."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise DataError(
            f"'{path}' is not an IDX file: magic bytes {raw[:4].hex() or 'missing'}, expected "
            "00 00 <type 08|09|0b|0c|0d|0e> <ndim>; delete it and fetch it again"
        )
    ndim, header_len = raw[3], 4 + 4 * raw[3]
    if ndim == 0 or len(raw) < header_len:
        raise DataError(f"IDX file '{path}' has a bad header ({ndim} dims, {len(raw)} bytes); fetch it again")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    dtype = IDX_DTYPES[raw[2]]
    expected = header_len + int(np.prod(dims)) * np.dtype(dtype).itemsize
    if len(raw) != expected:
        raise DataError(
            f"IDX file '{path}' holds {len(raw)} bytes but its header (dims {dims}) says {expected}; "
            "the file is truncated or corrupt, delete it and fetch it again"
        )
    return dtype, dims, header_len


def read_idx(path: Path) -> torch.Tensor:
    """One IDX file (gzipped when the name ends with .gz) as a tensor of its stored type."""
    path = Path(path)
    raw = _read_bytes(path)
    dtype, dims, header_len = _parse_header(raw, path)
    # One vectorised copy into native byte order ("i4" from ">i4"); the copy is also writable,
    # which torch wants, and unlike torch.frombuffer it accepts an empty (0-sample) file.
    array = np.frombuffer(raw, dtype=dtype, offset=header_len).astype(dtype[1:])
    return torch.from_numpy(array).reshape(dims)


def _fetch_command(name: str, root: str) -> str:
    return f"python -m pipedni.data fetch {name} --root {root}"


def _candidate_dirs(name: str, root: str) -> list[Path]:
    base = Path(root)
    dirs = [base, base / name, base / name.replace("_", "-"), base / TORCHVISION_DIRS[name]]
    dirs.append(DEBIAN_DIRS[name])
    return list(dict.fromkeys(dirs))  # drop duplicates (mnist == mnist), keep the order


def _files_in(directory: Path) -> dict[str, Path]:
    """The IDX files present in one directory; the raw file wins over .gz (no decompression)."""
    found = {}
    for key, stem in IDX_FILES.items():
        for candidate in (directory / stem, directory / f"{stem}.gz"):
            if candidate.is_file():
                found[key] = candidate
                break
    return found


def _check_name(name: str) -> None:
    if name not in IDX_NAMES:
        raise DataError(f"data set '{name}' has no IDX files; choose one of {', '.join(IDX_NAMES)}")


def find_idx_files(name: str, root: str) -> dict[str, Path]:
    """The four IDX files of `name` (keys train_images, train_labels, test_images, test_labels).

    All four come from one directory, the first in the search order that holds them all, so a
    train set from one copy is never paired with a test set from another.
    """
    _check_name(name)
    dirs = _candidate_dirs(name, root)
    best: dict[str, Path] = {}
    for directory in dirs:
        found = _files_in(directory)
        if len(found) == len(IDX_FILES):
            return found
        best = found if len(found) > len(best) else best
    missing = [f"{IDX_FILES[k]}[.gz]" for k in IDX_FILES if k not in best]
    raise DataError(
        f"{name}: missing {', '.join(missing)} (looked in {', '.join(str(d) for d in dirs)}); "
        f"fix: {_fetch_command(name, root)}"
    )


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
    targets = labels.long()
    num_classes = NUM_CLASSES[name]
    if len(targets) and (targets.min() < 0 or targets.max() >= num_classes):
        raise DataError(
            f"{name} {split}: labels outside 0..{num_classes - 1} in {where}; fetch the files again"
        )
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
    """Standardise both sets in place with the training set's scalar mean and std."""
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
    else:
        files = find_idx_files(cfg.name, cfg.root)
        train, test = _load_idx_split(files, "train", cfg.name), _load_idx_split(files, "test", cfg.name)
    train = _limit(train, cfg.train_limit, "train_limit")
    test = _limit(test, cfg.test_limit, "test_limit")
    if cfg.normalize:
        _normalize(train, test)
    return train, test


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


# --------------------------------------------------------------------------- fetching


def _try_find(name: str, root: str) -> Optional[Path]:
    try:
        return find_idx_files(name, root)["train_images"].parent
    except DataError:
        return None


def _apt_install(name: str, root: str, tried: list[str]) -> Optional[Path]:
    """Install the Debian data set package when we can (root, apt-get present); else None."""
    package = DEBIAN_PACKAGES.get(name)
    if package is None or shutil.which("apt-get") is None or os.geteuid() != 0:
        return None
    install = ["apt-get", "install", "-y", package]
    # A fresh machine often has empty package lists, hence one `apt-get update` and a retry.
    for commands in ([install], [["apt-get", "update"], install]):
        for command in commands:
            result = _run_quietly(command)
        found = _try_find(name, root)
        if found is not None:
            return found
        tried.append(f"{' '.join(install)} (exit {result.returncode}: {result.stderr.strip()[-200:]})")
    return None


def _run_quietly(command: list[str]) -> subprocess.CompletedProcess:
    print(f"fetch: running {' '.join(command)}", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _download_one(url: str, target: Path) -> None:
    """Download `url` to `target` through a temporary file, checked as IDX before it lands."""
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part.gz")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            shutil.copyfileobj(response, out)
        read_idx(tmp)  # a truncated download never replaces a good file
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _download(name: str, root: str, tried: list[str]) -> Optional[Path]:
    target_dir = Path(root) / name
    for mirror in MIRRORS[name]:
        try:
            target_dir.mkdir(parents=True, exist_ok=True)
            for stem in IDX_FILES.values():
                print(f"fetch: downloading {mirror}{stem}.gz", file=sys.stderr)
                _download_one(f"{mirror}{stem}.gz", target_dir / f"{stem}.gz")
            return target_dir
        except (OSError, DataError) as err:  # URLError and timeouts are OSErrors
            tried.append(f"download from {mirror} ({err})")
    return None


def fetch(name: str, root: str) -> Path:
    """Make the IDX files of `name` available and return the directory that holds them."""
    _check_name(name)
    found = _try_find(name, root)
    if found is not None:
        return found
    tried: list[str] = []
    found = _apt_install(name, root, tried) or _download(name, root, tried)
    if found is not None:
        return found
    files = ", ".join(f"{stem}.gz" for stem in IDX_FILES.values())
    raise DataError(
        f"could not fetch {name}: tried {'; '.join(tried)}; place {files} by hand in {Path(root) / name}"
    )


# --------------------------------------------------------------------------- command line


def _info(name: str, root: str) -> None:
    train, test = load_datasets(DataConfig(name=name, root=root), seed=0)
    if name == "synthetic":
        where = "generated"
    else:
        where = f"files in {find_idx_files(name, root)['train_images'].parent}"
    print(
        f"{name}: train {len(train)}, test {len(test)}, input shape {tuple(train.inputs.shape[1:])}, "
        f"{train.num_classes} classes ({where})"
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipedni.data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    fetch_parser = commands.add_parser("fetch", help="make a data set's IDX files available")
    fetch_parser.add_argument("name", choices=IDX_NAMES)
    info_parser = commands.add_parser("info", help="print sizes, input shape and classes")
    info_parser.add_argument("name", choices=IDX_NAMES + ("synthetic",))
    for sub in (fetch_parser, info_parser):
        sub.add_argument("--root", default="data", help="directory searched first (default: data)")
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            print(f"{args.name}: IDX files in {fetch(args.name, args.root)}")
        else:
            _info(args.name, args.root)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
