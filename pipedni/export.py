"""``python -m pipedni.export RUN_DIR OUT.pt``: merge per-stage checkpoints into one state_dict."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from pipedni.checkpoint import save_atomic
from pipedni.errors import PipeDNIError


class ExportError(PipeDNIError, ValueError):
    pass


def merge_checkpoints(run_dir: Path) -> dict[str, torch.Tensor]:
    """The whole model's state_dict from ``RUN_DIR/checkpoints/stage*.pt`` (any number of stages)."""
    files = sorted((run_dir / "checkpoints").glob("stage*.pt"), key=lambda p: int(p.stem[5:]))
    if not files:
        raise ExportError(f"no checkpoints in {run_dir / 'checkpoints'}; run training with checkpoint.enabled=true")
    states = [torch.load(f, map_location="cpu", weights_only=False) for f in files]
    num_stages = states[0]["num_stages"]
    found = sorted(s["stage_index"] for s in states)
    if found != list(range(num_stages)):
        raise ExportError(f"{run_dir} has checkpoints of stages {found} but the run had {num_stages} stages")
    merged: dict[str, torch.Tensor] = {}
    for state in sorted(states, key=lambda s: s["stage_index"]):
        for name, tensor in state["model"].items():
            if name in merged:
                raise ExportError(f"parameter {name!r} appears in two stage checkpoints of {run_dir}")
            merged[name] = tensor
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipedni.export", description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    try:
        merged = merge_checkpoints(args.run_dir)
    except PipeDNIError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    save_atomic(merged, args.out)
    print(f"wrote {len(merged)} tensors to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
