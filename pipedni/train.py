"""Entry point: ``torchrun --nproc_per_node=N -m pipedni.train cfg.yaml [--section.key=value ...]``.

Without torchrun, ``python -m pipedni.train cfg.yaml`` trains the whole model in one process.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from typing import Optional

from pipedni.config import load_config
from pipedni.engine import Trainer
from pipedni.errors import USER_ERRORS, TransportError, same_on_every_rank
from pipedni.runtime import init_runtime, shutdown
from pipedni.schedules.registry import REFERENCE

# An error every rank hits alike is printed by rank 0 only; the others wait this long before
# exiting, since the launcher stops all ranks as soon as one exits.
_QUIET_RANK_EXIT_DELAY_SEC = 3.0
USAGE = "usage: torchrun --nproc_per_node=N -m pipedni.train CONFIG.yaml [--section.key=value ...]"


def train(argv: list[str]) -> Optional[dict]:
    # 1. config: defaults < YAML < command line; identical on every rank
    if not argv or argv[0].startswith("--"):
        raise SystemExit(USAGE)
    with same_on_every_rank():
        cfg = load_config(argv[0], argv[1:])
    if "RANK" not in os.environ and cfg.train.schedule != REFERENCE:
        print(f"no torchrun: training the whole model in one process instead of {cfg.train.schedule}")
        cfg.train.schedule = REFERENCE
    # 2. this process: device pinned from LOCAL_RANK, then the process group
    runtime = init_runtime(cfg)
    # 3. this rank's stage: model, partition, transport, shapes checked end to end
    trainer = Trainer(cfg, runtime)
    # 4. train, evaluate, checkpoint, summarise
    summary = trainer.fit()
    # 5. drain: every message sent was received, then tear down (a failure skips this: see main)
    trainer.close()
    shutdown(runtime)
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    prefix = f"[stage {rank}/{world}] " if world > 1 else ""
    try:
        train(argv)
        return 0
    except USER_ERRORS as err:
        message = str(err)
        prefix = "" if message.startswith(f"stage {rank}/{world}") else prefix
        if rank == 0 or not getattr(err, "on_every_rank", False):
            print(f"{prefix}error: {message}", file=sys.stderr, flush=True)
        else:
            time.sleep(_QUIET_RANK_EXIT_DELAY_SEC)  # let rank 0 print before the launcher stops it
        code = 1 if isinstance(err, TransportError) else 2
    except KeyboardInterrupt:
        code = 130
    except Exception:
        lines = traceback.format_exc().rstrip().splitlines()
        print("\n".join(prefix + line for line in lines), file=sys.stderr, flush=True)
        code = 1
    # A failed stage leaves receiver threads and peers mid-conversation: exit now rather than
    # risk blocking in interpreter or process-group teardown. torchrun then stops the others.
    sys.stdout.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
