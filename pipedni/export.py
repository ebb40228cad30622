"""``python -m pipedni.export RUN_DIR OUT.pt [--step N]``: merge one checkpoint's stage files into
the whole model's state_dict (the latest checkpoint unless a step is given)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import torch

from pipedni import checkpoint
from pipedni.checkpoint import save_atomic
from pipedni.errors import CheckpointError, PipeDNIError

ExportError = CheckpointError  # what export raised before checkpoints had their own error


def merge_checkpoints(run_dir: Path, step: Optional[int] = None) -> dict[str, torch.Tensor]:
    """The whole model's state_dict from ``RUN_DIR``'s latest checkpoint (or that of ``step``),
    written under any number of stages.

    Every file must come from the same run (launch id, step, stage count): a rerun that failed
    half way must not be merged with the stages an earlier run left behind.
    """
    root = run_dir / "checkpoints"
    if not checkpoint.has_checkpoint(root):
        raise CheckpointError(f"no checkpoints in {root}; run training with checkpoint.enabled=true")
    folder = checkpoint.find(root, "latest" if step is None else str(step))
    return checkpoint.merged_model(checkpoint.load_folder(folder), folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipedni.export", description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--step", type=int, default=None, help="the checkpoint of this step (default: the latest)")
    args = parser.parse_args(argv)
    try:
        merged = merge_checkpoints(args.run_dir, args.step)
        save_atomic(merged, args.out)
    except PipeDNIError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: cannot write {args.out} ({err.strerror or err}); choose a writable path", file=sys.stderr)
        return 2
    print(f"wrote {len(merged)} tensors to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
