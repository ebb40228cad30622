"""The DNI paper's RNN experiments (arXiv 1608.05343, section 3.1) at a CPU budget: truncated
BPTT against BPTT with synthetic gradients (DNI) and DNI + the auxiliary task, for windows T.

    copy    Copy task, curriculum on the sequence length N (N + 1 when the error of the last
            window-group is under 0.15 bits per scored step); result: the largest N solved.
    repeat  Repeat Copy with one pattern (N = 1), curriculum on the repeat count R; result:
            the largest R solved (the pattern must be held R + 1 steps and counted).
    lm      character-level language model on the King James Bible (data/kjv); result: test
            bits per character after the same number of training characters for every T, and
            the wall-clock time of each run's first evaluation at or under --target-bpc.

Every run is one process with one thread; ``--jobs 2`` runs two at a time (2 cores). Results
append to OUT/runs.jsonl (a rerun skips what is done); ``--report`` prints the markdown tables.

    python scripts/dni_rnn.py --out results/rnn --task copy --task repeat --task lm
    python scripts/dni_rnn.py --out results/rnn --report
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("bptt", "dni", "dni_aux")
CURRICULUM_BITS = 0.15  # the paper's threshold: the next N (or R) once the error is below this


def build(method: str, state_features: int, batch: int, window: int, args: argparse.Namespace):
    """The Boundary for ``method`` (None for plain BPTT) and the aux weight: the library's defaults
    (or --kind, --sg-lr) plus the paper's output scale 0.1 and the batch's label count for the
    target's normalisation."""
    from pipedni.dni import Boundary

    if method.startswith("bptt"):
        return None, 0.0
    options = {"kind": args.kind, "lr": args.sg_lr}  # None: Boundary's own default
    boundary = Boundary((state_features,), output_scale=0.1, batch_size=batch * window,
                        **{k: v for k, v in options.items() if v is not None})
    return boundary, (1.0 if method.startswith("dni_aux") else 0.0)


def run_copy(args: argparse.Namespace, task: str, method: str, window: int, seed: int) -> dict:
    import torch

    from pipedni.data.copy_task import CopyStream, bits_loss
    from pipedni.dni.tbptt import RecurrentNet, TruncatedBPTT

    torch.manual_seed(seed)
    stream = CopyStream(args.batch, 1, repeats=1 if task == "repeat" else None, seed=seed)
    net = RecurrentNet(args.hidden, stream.output_size, inputs=stream.input_size)
    boundary, aux = build(method, net.state_features, args.batch, window, args)
    trainer = TruncatedBPTT(net, bits_loss, lr=args.lr, boundary=boundary, aux_weight=aux)
    group = max(1, args.group_steps // window)  # windows per curriculum check: the same steps for every T
    solved, loss_sum, scored, windows, start, last = 0, 0.0, 0.0, 0, time.perf_counter(), None
    for _ in range(args.copy_steps // window):
        inputs, targets = stream.window(window)
        count = float(targets[..., -1].sum())
        loss_sum += trainer.step(inputs, targets) * count
        scored, windows = scored + count, windows + 1
        if windows == group:
            last = [stream.length if task == "copy" else stream.repeats, loss_sum / max(scored, 1.0)]
            if scored and loss_sum / scored < CURRICULUM_BITS:
                if task == "repeat":
                    solved, stream.repeats = stream.repeats, stream.repeats + 1
                else:
                    solved, stream.length = stream.length, stream.length + 1
            loss_sum, scored, windows = 0.0, 0.0, 0
    # last: the task size trained at the end and its error (bits per scored step), for runs that stall
    return {"solved": solved, "last": last, "wall_sec": time.perf_counter() - start}


def run_lm(args: argparse.Namespace, method: str, window: int, seed: int) -> dict:
    import torch
    import torch.nn.functional as F

    from pipedni.data.kjv import encode, find_kjv, read_kjv
    from pipedni.dni.tbptt import RecurrentNet, TruncatedBPTT

    ids, vocab = encode(read_kjv(find_kjv(args.data_root)))
    cut = len(ids) - len(ids) // 10
    train = _streams(ids[:cut], args.batch)
    test = _streams(ids[cut:cut + args.test_chars], args.test_batch)
    torch.manual_seed(seed)
    net = RecurrentNet(args.hidden, len(vocab), vocab=len(vocab))
    boundary, aux = build(method, net.state_features, args.batch, window, args)

    def loss_fn(logits, targets):
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    trainer = TruncatedBPTT(net, loss_fn, lr=args.lr, boundary=boundary, aux_weight=aux)
    test_windows = [(test[:, i:i + 50], test[:, i + 1:i + 51]) for i in range(0, test.shape[1] - 51, 50)]
    offset = seed * 9973 % max(1, train.shape[1] - args.lm_chars - 1)  # each seed its own stretch of text
    curve, train_sec = [], 0.0
    steps = args.lm_chars // window
    marks = {round(steps * j / args.evals) for j in range(1, args.evals + 1)}  # evenly spaced evaluations
    for k in range(steps):
        i = offset + k * window
        begin = time.perf_counter()
        trainer.step(train[:, i:i + window], train[:, i + 1:i + window + 1])
        train_sec += time.perf_counter() - begin
        if k + 1 in marks:
            bpc = trainer.evaluate(test_windows) / math.log(2)
            curve.append([(k + 1) * window, round(train_sec, 2), round(bpc, 4)])  # chars/stream, sec, BPC
    return {"bpc": curve[-1][2], "curve": curve, "train_sec": train_sec}


def _streams(ids, batch: int):
    """ids cut into ``batch`` contiguous rows (one stream each)."""
    length = len(ids) // batch
    return ids[:length * batch].reshape(batch, length)


# --------------------------------------------------------------------------- the sweep


def cells(args: argparse.Namespace) -> list[dict]:
    """Every run, seed-major so a partial sweep covers every cell."""
    return [{"task": task, "method": method + args.tag, "window": window, "seed": seed}
            for seed in range(args.seeds) for task in args.task for window in args.windows for method in args.methods]


def key(cell: dict) -> str:
    return f"{cell['task']}/{cell['method']}/T{cell['window']}/s{cell['seed']}"


def one(args: argparse.Namespace, cell: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    if cell["task"] == "lm":
        result = run_lm(args, cell["method"], cell["window"], cell["seed"])
    else:
        result = run_copy(args, cell["task"], cell["method"], cell["window"], cell["seed"])
    return {**cell, **result}


def sweep(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = out / "runs.jsonl"
    done = {key(json.loads(line)) for line in runs.read_text().splitlines()} if runs.exists() else set()
    todo = [c for c in cells(args) if key(c) not in done]
    running: list[tuple[dict, subprocess.Popen]] = []
    while todo or running:
        while todo and len(running) < args.jobs:
            cell = todo.pop(0)
            command = [sys.executable, __file__, "--one", json.dumps(cell), *sys.argv[1:]]
            running.append((cell, subprocess.Popen(command, stdout=subprocess.PIPE, text=True)))
        time.sleep(0.5)
        for cell, proc in list(running):
            if proc.poll() is None:
                continue
            running.remove((cell, proc))
            line = proc.stdout.read().strip().splitlines()[-1:] if proc.returncode == 0 else []
            if not line:
                print(f"{key(cell)} failed (exit {proc.returncode})", file=sys.stderr)
                continue
            with runs.open("a") as f:
                f.write(line[0] + "\n")
            print(key(cell), line[0][:160], flush=True)


# --------------------------------------------------------------------------- the tables


def report(args: argparse.Namespace) -> None:
    rows = [json.loads(line) for line in (Path(args.out) / "runs.jsonl").read_text().splitlines()]
    windows = sorted({r["window"] for r in rows})
    for task, field, title in (("copy", "solved", "Copy: largest N solved"),
                               ("repeat", "solved", "Repeat Copy (N = 1): largest R solved"),
                               ("lm", "bpc", "Char LM (kjv): test bits per character")):
        table = [r for r in rows if r["task"] == task]
        if not table or task not in args.task:
            continue
        print(f"\n{title}; median (min-max) over seeds\n")
        print("| method | " + " | ".join(f"T = {w}" for w in windows) + " |")
        print("|---|" + "---|" * len(windows))
        for method in _methods(table):
            print(f"| {method} | " + " | ".join(_cell([r[field] for r in table if r["method"] == method
                                                       and r["window"] == w]) for w in windows) + " |")
        if task != "lm":
            print("\nAt the end of each run (one entry per seed): the size being trained and its error, "
                  "bits per scored step\n")
            print("| method | " + " | ".join(f"T = {w}" for w in windows) + " |")
            print("|---|" + "---|" * len(windows))
            for method in _methods(table):
                print(f"| {method} | " + " | ".join(_last([r for r in table if r["method"] == method
                                                          and r["window"] == w]) for w in windows) + " |")
        if task == "lm":
            print(f"\nSeconds of training to test BPC <= {args.target_bpc} (runs that got there / runs)\n")
            print("| method | " + " | ".join(f"T = {w}" for w in windows) + " |")
            print("|---|" + "---|" * len(windows))
            for method in _methods(table):
                print(f"| {method} | " + " | ".join(_seconds([r for r in table if r["method"] == method
                                                             and r["window"] == w], args.target_bpc) for w in windows) + " |")


def _methods(rows: list[dict]) -> list[str]:
    """The methods present, the paper's three first."""
    present = {r["method"] for r in rows}
    return [m for m in METHODS if m in present] + sorted(present - set(METHODS))


def _last(runs: list[dict]) -> str:
    return ", ".join(f"{r['last'][0]}: {r['last'][1]:.2f}" for r in sorted(runs, key=lambda r: r["seed"])
                     if r.get("last")) or "-"


def _cell(values: list) -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    return f"{med:g} ({min(values):g}-{max(values):g})" if len(values) > 1 else f"{med:g}"


def _seconds(runs: list[dict], target: float) -> str:
    """Median training seconds to the first evaluation at or under ``target`` BPC."""
    got = [next(sec for _, sec, bpc in r["curve"] if bpc <= target) for r in runs
           if any(bpc <= target for *_, bpc in r["curve"])]
    if not runs:
        return "-"
    return (f"{statistics.median(got):.0f} s ({len(got)}/{len(runs)})" if got else f"never (0/{len(runs)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--task", action="append", choices=("copy", "repeat", "lm"))
    parser.add_argument("--windows", type=int, nargs="+", default=[2, 3, 4, 5, 8])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--kind", choices=("linear", "lowrank", "mlp"), help="the predictor (default: Boundary's)")
    parser.add_argument("--tag", default="", help="appended to the method names (an ablation's rows)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--sg-lr", type=float, help="the predictor's learning rate (default: Boundary's, 3e-4)")
    parser.add_argument("--copy-steps", type=int, default=60000, help="time steps of training per copy run")
    parser.add_argument("--group-steps", type=int, default=600, help="time steps per curriculum check")
    parser.add_argument("--lm-chars", type=int, default=12000, help="characters per stream (x batch) per LM run")
    parser.add_argument("--evals", type=int, default=10)
    parser.add_argument("--test-chars", type=int, default=40000)
    parser.add_argument("--test-batch", type=int, default=16)
    parser.add_argument("--target-bpc", type=float, default=2.3, help="--report: the BPC timed to")
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.task = args.task or ["copy", "repeat", "lm"]
    if args.one:
        print(json.dumps(one(args, json.loads(args.one))))
    elif args.report:
        report(args)
    else:
        sweep(args)


if __name__ == "__main__":
    main()
