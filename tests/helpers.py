"""What the tests share: one place, imported by test modules (which never import each other).

``run_distributed(fn, world_size)`` runs ``fn(rank, world_size, *args)`` in real processes over
gloo. Each process gets the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, ...), a gloo
default process group and its own CPU thread. Results come back in rank order. The first
process to fail fails the call with its traceback; the others are then stopped, so a broken
stage can never leave a test waiting. Below it: the locked parity config and its
one-process reference, a kjv.jsonl fixture, the command line (``run_cli``), a decoupled
stage's run and message accounting, and the transport tests' messages.
"""

from __future__ import annotations

import datetime
import json
import os
import pickle
import queue
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from pipedni.config import load_config
from pipedni.engine import Trainer
from pipedni.errors import TransportError
from pipedni.export import merge_checkpoints
from pipedni.runtime import Runtime
from pipedni.transport import Kind, Transport


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
        # pickled here, by value: a queue pickles in a thread of its own, whose failure would never
        # reach the parent, and would hand tensors over as file descriptors this exiting process closes
        results.put((rank, True, pickle.dumps(fn(rank, world_size, *args)), None))
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
                out[rank] = pickle.loads(value)
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


# --- Locked parity: one config, one process, one comparison


def make_config(run_dir: Path, schedule: str, microbatches: int, *extra: str):
    return load_config(None, [
        f"--run.dir={run_dir}", "--run.seed=3", "--run.log_every=1000",
        "--model.name=mlp", "--model.depth=3", "--model.width=32",
        "--data.name=synthetic", "--data.synthetic_size=256", "--data.batch_size=30", "--data.eval_batch_size=64",
        "--partition.method=uniform", f"--train.schedule={schedule}", f"--train.microbatches={microbatches}",
        "--train.steps=4", "--optim.name=sgd", "--optim.lr=0.1", "--optim.momentum=0.9", *extra,
    ])


def train_single(run_dir: Path, *extra: str) -> tuple[dict, dict]:
    cfg = make_config(run_dir, "single", 1, *extra)
    trainer = Trainer(cfg, Runtime(0, 1, 0, 1, torch.device("cpu"), "none"))
    summary = trainer.fit()
    return merge_checkpoints(run_dir), summary


def assert_same_parameters(actual: dict, expected: dict, label: str, atol: float = 1e-6) -> None:
    assert actual.keys() == expected.keys(), label
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=atol, msg=lambda m: f"{label} {name}: {m}")


# --- A kjv.jsonl fixture


VERSES = [
    "In the beginning God created the heaven and the earth.",
    "And the earth was without form, and void; and darkness was upon the face of the deep.",
    "And God said, Let there be light: and there was light.",
    "And God saw the light, that it was good: and God divided the light from the darkness.",
    "And God called the light Day, and the darkness he called Night.",
    "And the evening and the morning were the first day.",
] * 4  # 24 verses, 1,660 characters: enough for a few windows on each side of the split


def write_kjv(path: Path, verses: list[str] = VERSES) -> str:
    """A small kjv.jsonl in the real file's format; returns the text pipedni should read from it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"citation": f"Genesis 1:{i + 1}", "text": text, "book": "Genesis", "chapter": 1, "verse": i + 1}
            for i, text in enumerate(verses)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return "\n".join(verses)


# --- The command line


TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


FASHION = Path("/usr/share/datasets/fashion-mnist")


needs_fashion = pytest.mark.skipif(not FASHION.is_dir(), reason="Debian package dataset-fashion-mnist not installed")


def run_cli(args: list[str], nproc: int | None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m pipedni.train ARGS`` (nproc None: one plain process) or under torchrun with
    nproc stages, from the repository root, with tests/ importable (own models and data)."""
    if nproc is None:
        cmd = [sys.executable, "-m", "pipedni.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", "-m", "pipedni.train", *args]
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=path)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


# --- Decoupled runs: a stage in a gloo process, its metrics, its messages


def gloo_runtime(rank: int, world_size: int) -> Runtime:
    return Runtime(rank, world_size, rank, world_size, torch.device("cpu"), "gloo")


def train_run(rank, world_size, run_dir, overrides, model=None):
    cfg = load_config(None, [f"--run.dir={run_dir}", "--run.log_every=100000", *overrides])
    trainer = Trainer(cfg, gloo_runtime(rank, world_size), model=model)
    summary = trainer.fit()
    trainer.close()  # raises if any message was left unconsumed
    return summary, trainer.worker.transport.counts()


def read_steps(run_dir: Path, stage: int) -> list[dict]:
    lines = (run_dir / f"metrics/stage{stage}.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "step" in r]


def assert_every_message_received(counts: list[dict]) -> None:
    for i in range(len(counts) - 1):
        assert counts[i]["sent_next"] == counts[i + 1]["received_prev"] > 0, counts
        assert counts[i + 1]["sent_prev"] == counts[i]["received_next"] > 0, counts


class Slow(nn.Module):
    """Sleeps on every training forward: makes its stage the bottleneck."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds

    def forward(self, x):
        if self.training:
            time.sleep(self.seconds)
        return x


# --- Split models


def run_stages(stages, *inputs):
    """Chain a split model's stage modules in one process: each takes what the one before returned."""
    value = stages[0](*inputs)
    for stage in stages[1:]:
        value = stage(*value) if isinstance(value, tuple) else stage(value)
    return value


# --- Transport messages


CPU = torch.device("cpu")


def recv_error(t: Transport, step: int, microbatch: int) -> tuple[str, float]:
    """(the TransportError's message, seconds until it was raised) for an activation that never comes."""
    start = time.monotonic()
    try:
        t.recv("prev", Kind.ACTIVATION, step, microbatch)
    except TransportError as err:
        return str(err), time.monotonic() - start
    return "no error", 0.0


# (kind, tensor) sent by stage 0: one size repeated (guessed), an evaluation's larger batch (a
# wrong guess: a filler), back again, then dtypes and shapes whose payload is odd or empty.
def changing_messages() -> list[tuple[Kind, torch.Tensor]]:
    train = [(Kind.ACTIVATION, torch.full((8, 3), float(i))) for i in range(5)]
    evaluation = [(Kind.EVAL, torch.arange(600.0).view(200, 3) + i) for i in range(4)]
    odd = [(Kind.ACTIVATION, torch.tensor([True, False, True])), (Kind.ACTIVATION, torch.tensor(7)),
           (Kind.ACTIVATION, torch.empty(0, 3)), (Kind.ACTIVATION, torch.arange(6.0).view(2, 3).to(torch.bfloat16))]
    return train + evaluation + train + odd + train


def tuple_messages() -> list:
    """What a split model's boundary sends: several tensors (one needing a gradient, an int64
    without), the same again so that every part's size is guessed, a tuple of one, an empty
    tuple (a gradient message where nothing needs one), and bare tensors in between."""
    h = torch.randn(3, 4).requires_grad_()
    ids = torch.arange(3)
    several = [(h, ids, torch.ones(3, 2, dtype=torch.bfloat16)) for _ in range(5)]
    return [*several, (torch.randn(2, 2),), (), torch.randn(3, 4), *several, torch.randn(3, 4)]


def same_values(got: list, expected: list) -> bool:
    def same(a, b) -> bool:
        return a.dtype == b.dtype and a.requires_grad == b.requires_grad and torch.equal(a, b.detach())

    return all(
        type(g) is type(e) and (same(g, e) if isinstance(g, torch.Tensor) else len(g) == len(e) and all(map(same, g, e)))
        for g, e in zip(got, expected))


def chain_steps(t: Transport, rank: int, world_size: int) -> list[float]:
    """5 steps down the chain and back (each stage adds 1 going forward, the last doubles); each
    step ends settled, as a locked step does (a no-op with receiver threads)."""
    out = []
    for step in range(5):
        x = torch.tensor([float(step)]) if rank == 0 else t.recv("prev", Kind.ACTIVATION, step, 0) + 1
        if rank < world_size - 1:
            t.send("next", Kind.ACTIVATION, step, 0, x)
            g = t.recv("next", Kind.GRADIENT, step, 0)
        else:
            out.append(float(x))
            g = x * 2
        if rank > 0:
            t.send("prev", Kind.GRADIENT, step, 0, g)
        else:
            out.append(float(g))
        t.settle()
    return out
