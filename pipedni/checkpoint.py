"""Per-stage checkpoints keyed by the whole model's parameter names, written atomically."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pipedni.stage import Stage


def stage_path(run_dir: Path, stage_index: int) -> Path:
    return run_dir / "checkpoints" / f"stage{stage_index}.pt"


def save_atomic(obj: object, path: Path) -> None:
    """Write to a temporary file in the same directory, then rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class Checkpointer:
    def __init__(self, run_dir: Path, enabled: bool, run_token: str = ""):
        self.run_dir, self.enabled, self.run_token = run_dir, enabled, run_token

    def save(self, stage: Stage, step: int, num_stages: int, config: dict, extra: dict | None = None) -> None:
        if not self.enabled:
            return
        state = {**stage.state_dict(), **(extra or {})}
        state.update(step=step, stage_index=stage.stage_index, num_stages=num_stages, run_token=self.run_token,
                     layers=[name for name, _ in stage.module.named_children()], config=config)
        save_atomic(state, stage_path(self.run_dir, stage.stage_index))
