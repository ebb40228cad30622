"""Entry point: ``torchrun --nproc_per_node=N -m pipedni.train cfg.yaml [--section.key=value ...]``.

Without torchrun, ``python -m pipedni.train cfg.yaml`` trains the whole model in one process.
``run`` is the same from code, with a model, data and loss of the caller's (``pipedni.fit``).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import Optional

from torch import nn

from pipedni.config import Config, load_config
from pipedni.data import Dataset
from pipedni.engine import Trainer
from pipedni.errors import RUN_FAILURES, USER_ERRORS, DivergenceError, same_on_every_rank
from pipedni.runtime import init_runtime, shutdown
from pipedni.schedules.registry import REFERENCE, check_config
from pipedni.stage import Loss

# An error every rank hits alike is printed by rank 0 only; the others wait this long before
# exiting, since the launcher stops all ranks as soon as one exits.
_QUIET_RANK_EXIT_DELAY_SEC = 3.0
USAGE = "usage: torchrun --nproc_per_node=N -m pipedni.train CONFIG.yaml [--section.key=value ...] [--resume[=STEP]]"


def record_for_torchrun(message: str) -> None:
    """Put the one-line error where torchrun's failure summary reads a stage's error from (its
    ``TORCHELASTIC_ERROR_FILE``), instead of its "To enable traceback see ..." placeholder."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {"message": {"message": message, "extraInfo": {"py_callstack": message,
                                                           "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as f:
            json.dump(data, f)
    except OSError:
        pass  # the summary then shows torch's placeholder; the error itself was printed


def train(argv: list[str]) -> Optional[dict]:
    # 1. config: defaults < YAML < command line; identical on every rank
    if not argv or argv[0].startswith("--"):
        raise SystemExit(USAGE)
    with same_on_every_rank():
        cfg = load_config(argv[0], argv[1:])
    return run(cfg)


def run(cfg: Config, model: Optional[nn.Module] = None, data: Optional[tuple[Dataset, Dataset]] = None,
        loss: Optional[Loss] = None) -> Optional[dict]:
    """Train as ``cfg`` says (its model, data and loss, or the ones given); summary.json's
    content on the last stage."""
    with same_on_every_rank():
        check_config(cfg)
    if "RANK" not in os.environ and cfg.train.schedule != REFERENCE:
        print(f"no torchrun: training the whole model in one process instead of {cfg.train.schedule}")
        cfg.train.schedule = REFERENCE
    # 2. this process: device pinned from LOCAL_RANK, then the process group
    runtime = init_runtime(cfg)
    # 3. this rank's stage: model, partition, transport, shapes checked end to end
    trainer = Trainer(cfg, runtime, model, data, loss)
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
        record_for_torchrun(prefix + message)
        quiet = getattr(err, "printed_elsewhere", False) or (rank != 0 and getattr(err, "on_every_rank", False))
        consequence = getattr(err, "neighbour_lost", False) or (isinstance(err, DivergenceError) and rank != world - 1)
        if quiet or consequence:
            # let the rank that prints it go first: a lost neighbour's own error says why it went,
            # and a diverged run's cause is reported by the last stage that saw it (a non-finite
            # gradient flows upstream); the launcher stops this stage before it repeats the news
            time.sleep(_QUIET_RANK_EXIT_DELAY_SEC)
        if not quiet:
            print(f"{prefix}error: {message}", file=sys.stderr, flush=True)
        code = 1 if isinstance(err, RUN_FAILURES) else 2
    except KeyboardInterrupt:
        code = 130
    except Exception as err:
        lines = traceback.format_exc().rstrip().splitlines()
        print("\n".join(prefix + line for line in lines), file=sys.stderr, flush=True)
        record_for_torchrun(f"{prefix}{type(err).__name__}: {err}")
        code = 1
    # A failed stage leaves receiver threads and peers mid-conversation: exit now rather than
    # risk blocking in interpreter or process-group teardown. torchrun then stops the others.
    sys.stdout.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
