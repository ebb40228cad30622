"""The transport's per-message cost against torch's own point-to-point, on this machine.

Two processes over gloo ping-pong one tensor: rank 0 sends it, rank 1 sends it back, N times
per size, interleaved between the two ways of sending so that machine noise hits both:
- pipedni: ``Transport.send`` / ``Transport.recv`` (a header and a payload per message, both
  received by a thread that files them in a mailbox, the consumer taking it by key; the
  payload's receive is posted with the header's once sizes repeat: [Note: pre-posted payloads]);
- pipedni direct: the same, received on the consumer's thread as a locked schedule's stages
  receive ([Note: who receives] in pipedni/transport/transport.py);
- torch: ``dist.isend`` / ``dist.irecv`` of a tensor whose shape both sides know, as
  ``torch.distributed.pipelining`` sends once its shapes are set up (no header).
Half a round trip is one message's cost, transfer included; the difference between the two
is what pipedni's message format and threads add. Each way runs with only its own transport
alive, as in a run (another transport's idle receives slowed the one measured).

    python scripts/transport_bench.py [--sizes 1024,262144,1048576] [--rounds 200] [--repeats 3] [--load 2]

On 2 cores, the stages of a real run keep both busy; ``--load 2`` runs that many busy Python
loops (own processes) beside the benchmark to measure the cost there.

To compare two versions of the transport, run it alternately from two checkouts, each on its
own path: ``PYTHONPATH=OTHER_CHECKOUT python OTHER_CHECKOUT/scripts/transport_bench.py``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipedni.transport import Kind, Transport


def _torch_round(rank: int, x: torch.Tensor, buf: torch.Tensor) -> None:
    if rank == 0:
        dist.isend(x, dst=1).wait()
        dist.irecv(buf, src=1).wait()
    else:
        dist.irecv(buf, src=0).wait()
        dist.isend(buf, dst=0).wait()


def _ours_round(rank: int, t: Transport, x: torch.Tensor, step: int) -> None:
    if rank == 0:
        t.send("next", Kind.ACTIVATION, step, 0, x)
        t.recv("next", Kind.GRADIENT, step, 0)
    else:
        y = t.recv("prev", Kind.ACTIVATION, step, 0)
        t.send("prev", Kind.GRADIENT, step, 0, y)


WAYS = ("ours", "direct", "torch")
WARM_UP = 10  # untimed rounds first: a new transport's payload guess needs a few messages (wire.REPEATS_TO_GUESS)


def _worker(rank: int, port: int, sizes: list[int], rounds: int, repeats: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=120))
    cpu = torch.device("cpu")
    results = {}
    for size in sizes:
        x, buf = torch.randn(size // 4), torch.empty(size // 4)
        for r in range(repeats):
            for way in WAYS[r % 3:] + WAYS[:r % 3]:  # each way first in turn
                # only this way's transport alive: a run has one (another's idle threads slow this one)
                t = None if way == "torch" else Transport(rank, 2, cpu, cpu, timeout=120.0,
                                                          direct_receive=way == "direct")
                for step in range(WARM_UP + rounds):
                    if step == WARM_UP:
                        dist.barrier()
                        start = time.perf_counter()
                    if t is not None:
                        _ours_round(rank, t, x, step)
                    else:
                        _torch_round(rank, x, buf)
                results.setdefault((size, way), []).append((time.perf_counter() - start) / rounds / 2)
                if t is not None:
                    t.close()
    if rank == 0:
        out.put(results)
    dist.destroy_process_group()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1024,262144,1048576", help="payload bytes, default 1 KiB, 256 KiB, 1 MiB")
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--load", type=int, default=0, help="busy Python loops to run beside it (cores kept busy)")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    load = [ctx.Process(target=_busy, daemon=True) for _ in range(args.load)]
    procs = [ctx.Process(target=_worker, args=(r, port, sizes, args.rounds, args.repeats, out)) for r in range(2)]
    for proc in load + procs:
        proc.start()
    try:
        results = out.get(timeout=600)
    finally:
        for proc in load:
            proc.kill()
    for proc in procs:
        proc.join(60)
    print(f"| payload | pipedni, thread us/message | pipedni, direct | torch | thread / torch | direct / torch |"
          f"  (median of {args.repeats}, min-max{f'; {args.load} busy loops beside' if args.load else ''})")
    print("|---|---|---|---|---|---|")
    for size in sizes:
        cells = {way: results[(size, way)] for way in WAYS}
        med = {way: statistics.median(v) for way, v in cells.items()}
        shown = " | ".join(f"{med[w] * 1e6:.0f} ({min(cells[w]) * 1e6:.0f}-{max(cells[w]) * 1e6:.0f})" for w in WAYS)
        print(f"| {size:,} B | {shown} | {med['ours'] / med['torch']:.2f}x | {med['direct'] / med['torch']:.2f}x |")
    return 0


def _busy() -> None:
    while True:
        pass


if __name__ == "__main__":
    sys.exit(main())
