"""``python -m pipedni.export RUN_DIR OUT.pt``: merge per-stage checkpoints into one state_dict."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

from pipedni.checkpoint import save_atomic
from pipedni.errors import PipeDNIError


class ExportError(PipeDNIError, ValueError):
    pass


STAGE_FILE = re.compile(r"stage(\d+)\.pt")


def _load(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated, not a torch file, ...
        raise ExportError(f"{path} is not a readable checkpoint ({type(err).__name__}: {err})") from None
    missing = {"model", "stage_index", "num_stages", "step"} - set(state)
    if missing:
        raise ExportError(f"{path} is not a pipedni stage checkpoint (no {', '.join(sorted(missing))})")
    return state


def merge_checkpoints(run_dir: Path) -> dict[str, torch.Tensor]:
    """The whole model's state_dict from ``RUN_DIR/checkpoints/stage<i>.pt`` (any number of stages).

    Every file must come from the same run (launch id, step, stage count): a rerun that failed
    half way must not be merged with the stages an earlier run left behind.
    """
    files = sorted((p for p in (run_dir / "checkpoints").glob("stage*.pt") if STAGE_FILE.fullmatch(p.name)),
                   key=lambda p: int(STAGE_FILE.fullmatch(p.name).group(1)))
    if not files:
        raise ExportError(f"no checkpoints in {run_dir / 'checkpoints'}; run training with checkpoint.enabled=true")
    states = [_load(f) for f in files]
    num_stages = states[0]["num_stages"]
    found = sorted(s["stage_index"] for s in states)
    if found != list(range(num_stages)):
        raise ExportError(f"{run_dir} has checkpoints of stages {found} but the run had {num_stages} stages")
    runs = {(s.get("run_token"), s["step"], s["num_stages"]) for s in states}
    if len(runs) > 1:
        steps = ", ".join(f"stage {s['stage_index']}: step {s['step']}" for s in states)
        raise ExportError(f"{run_dir}'s stage checkpoints come from different runs ({steps}); rerun training")
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
