"""``run_distributed(fn, world_size)``: run ``fn(rank, world_size, *args)`` in real processes over gloo.

Each process gets the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, ...), a gloo
default process group and its own CPU thread. Results come back in rank order. The first
process to fail fails the call with its traceback; the others are then stopped, so a broken
stage can never leave a test waiting.
"""

from __future__ import annotations

import datetime
import os
import queue
import socket
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp


class RankFailed(Exception):
    def __init__(self, rank: int, error: BaseException | None, text: str):
        super().__init__(f"rank {rank} failed:\n{text}")
        self.rank, self.error, self.text = rank, error, text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world_size, port, args, results, backend):
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60))
        results.put((rank, True, fn(rank, world_size, *args), None))
    except BaseException as err:  # reported to the parent, which fails the test
        try:
            pickled: BaseException | None = err
            results.put((rank, False, traceback.format_exc(), pickled))
        except Exception:
            results.put((rank, False, traceback.format_exc(), None))
    finally:
        results.close()
        results.join_thread()
        os._exit(0)  # skip teardown: a failed peer may leave gloo threads mid-conversation


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0,
                    allow_failures: bool = False, backend: str = "gloo") -> list[Any]:
    """Results of ``fn`` per rank. With ``allow_failures``, a failed rank's entry is its RankFailed
    (and the call waits for every rank to finish or fail) instead of raising at the first failure."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, args, results, backend), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    try:
        while len(out) < world_size:
            try:
                rank, ok, value, err = results.get(timeout=timeout)
            except queue.Empty:
                missing = sorted(set(range(world_size)) - set(out))
                raise TimeoutError(f"ranks {missing} did not finish within {timeout:.0f}s") from None
            if ok:
                out[rank] = value
            elif allow_failures:
                out[rank] = RankFailed(rank, err, value)
            else:
                raise RankFailed(rank, err, value)
        return [out[r] for r in range(world_size)]
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
