"""Export: per-stage checkpoints merge by name only when they belong to one run."""

from __future__ import annotations

import pytest
import torch

from pipedni.checkpoint import save_atomic
from pipedni.export import ExportError, main, merge_checkpoints


def write_stage(run_dir, index, num_stages=2, step=10, token="a", names=("w",)):
    state = {"model": {f"{n}{index}": torch.full((2,), float(index)) for n in names}, "stage_index": index,
             "num_stages": num_stages, "step": step, "run_token": token}
    save_atomic(state, run_dir / "checkpoints" / f"stage{index}.pt")


def test_merges_every_stage_by_name(tmp_path):
    write_stage(tmp_path, 0)
    write_stage(tmp_path, 1)
    merged = merge_checkpoints(tmp_path)
    assert sorted(merged) == ["w0", "w1"] and torch.equal(merged["w1"], torch.ones(2))


def test_refuses_stages_of_different_runs(tmp_path):
    """Regression: a rerun that died after stage 0 saved left a new stage0.pt beside an old
    stage1.pt, and export merged them silently into a model no run ever trained."""
    write_stage(tmp_path, 0, step=50, token="new")
    write_stage(tmp_path, 1, step=20, token="old")
    with pytest.raises(ExportError, match="come from different runs"):
        merge_checkpoints(tmp_path)


def test_missing_stage_and_empty_dir(tmp_path):
    with pytest.raises(ExportError, match="no checkpoints"):
        merge_checkpoints(tmp_path)
    write_stage(tmp_path, 1)
    with pytest.raises(ExportError, match=r"stages \[1\] but the run had 2 stages"):
        merge_checkpoints(tmp_path)


def test_stray_and_broken_files(tmp_path, capsys):
    write_stage(tmp_path, 0, num_stages=1)
    (tmp_path / "checkpoints" / "stage0_old.pt").write_bytes(b"ignored: not stage<i>.pt")
    assert list(merge_checkpoints(tmp_path)) == ["w0"]
    (tmp_path / "checkpoints" / "stage0.pt").write_bytes(b"not a checkpoint")
    assert main([str(tmp_path), str(tmp_path / "out.pt")]) == 2
    assert "is not a readable checkpoint" in capsys.readouterr().err
