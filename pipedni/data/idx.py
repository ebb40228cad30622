"""The IDX data sets (fashion_mnist, mnist): reading IDX files, finding a set's four, fetching them."""

from __future__ import annotations

import gzip
import sys
import zlib
from functools import partial
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from pipedni.config import DataConfig
from pipedni.data.dataset import Dataset, Source
from pipedni.data.files import apt_install, download, fetch_command, present
from pipedni.errors import DataError

IDX_NAMES = ("fashion_mnist", "mnist")


IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


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


NUM_CLASSES = 10


# --------------------------------------------------------------------------- reading


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


# --------------------------------------------------------------------------- finding


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
        f"fix: {fetch_command(name, root)}"
    )


def find_idx_dir(name: str, root: str) -> Path:
    """The directory that holds the four IDX files of `name` (see `find_idx_files`)."""
    return find_idx_files(name, root)["train_images"].parent


# --------------------------------------------------------------------------- loading


def _load_split(files: dict[str, Path], split: str, name: str) -> Dataset:
    images = read_idx(files[f"{split}_images"])
    labels = read_idx(files[f"{split}_labels"])
    where = f"{files[f'{split}_images']} / {files[f'{split}_labels']}"
    if images.dim() != 3 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{name} {split}: images {tuple(images.shape)} and labels {tuple(labels.shape)} do not "
            f"match ({where}); expected (N, H, W) and (N,), fetch the files again"
        )
    return Dataset.from_images(images, labels, NUM_CLASSES, name, f"{name} {split}", where)


def load_idx(cfg: DataConfig, seed: int) -> tuple[Dataset, Dataset]:
    """(train, test) of data.name from its IDX files; `seed` plays no part."""
    files = find_idx_files(cfg.name, cfg.root)
    return _load_split(files, "train", cfg.name), _load_split(files, "test", cfg.name)


# --------------------------------------------------------------------------- fetching


def _download(name: str, root: str, tried: list[str]) -> Optional[Path]:
    target_dir = Path(root) / name
    for mirror in MIRRORS[name]:
        try:
            target_dir.mkdir(parents=True, exist_ok=True)
            for stem in IDX_FILES.values():
                print(f"fetch: downloading {mirror}{stem}.gz", file=sys.stderr)
                download(f"{mirror}{stem}.gz", target_dir / f"{stem}.gz", read_idx)
            return target_dir
        except (OSError, DataError) as err:  # URLError and timeouts are OSErrors
            tried.append(f"download from {mirror} ({err})")
    return None


def fetch_idx(name: str, root: str) -> Path:
    """Make the IDX files of `name` available (already there, apt, download) and return their directory."""
    find = partial(find_idx_dir, name)
    found = present(find, root)
    if found is not None:
        return found
    tried: list[str] = []
    package = DEBIAN_PACKAGES.get(name)
    found = apt_install(package, lambda: present(find, root), tried) if package else None
    found = found or _download(name, root, tried)
    if found is not None:
        return found
    files = ", ".join(f"{stem}.gz" for stem in IDX_FILES.values())
    raise DataError(
        f"could not fetch {name}: tried {'; '.join(tried)}; place {files} by hand in {Path(root) / name}"
    )


def _source(name: str) -> Source:
    """The registry entry of one IDX set: the same code, its own name, directories and mirrors."""
    find, fetch = partial(find_idx_dir, name), partial(fetch_idx, name)
    return Source(name, load_idx, NUM_CLASSES, find=find, fetch=fetch, files="IDX files")


FASHION_MNIST = _source("fashion_mnist")
MNIST = _source("mnist")
