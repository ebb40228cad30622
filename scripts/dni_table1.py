"""Reproduce the DNI paper's Table 1 experiment (arXiv 1608.05343): backprop vs DNI vs cDNI for
fully connected nets of 3 to 6 layers with a synthetic-gradient predictor between every layer.

Each run is a real pipedni job: backprop is the one-process reference (`single`, equal by test
to every locked pipeline); DNI and cDNI run one stage per layer under torchrun. Runs are
interleaved seed-major so a partial sweep covers every cell. Results append to
OUT/runs.jsonl (a rerun skips what is done); `--report` prints the markdown table.

    python scripts/dni_table1.py --out results/table1                    # the sweep
    python scripts/dni_table1.py --out results/table1 --report > t.md    # the table
    python scripts/dni_table1.py --out results/table1 --layers 6 --methods cdni \
        --tag=-stale1 --set=--dni.max_staleness=1                         # an ablation
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from pipedni.schedules import registry

METHODS = ("backprop", "dni", "cdni")


def overrides(args: argparse.Namespace, layers: int, method: str, seed: int, run_dir: Path) -> list[str]:
    common = [
        f"--run.dir={run_dir}", f"--run.seed={seed}", "--run.log_every=1000000",
        "--model.name=mlp", f"--model.depth={layers - 1}", f"--model.width={args.width}", "--model.batchnorm=true",
        f"--data.name={args.data}", f"--data.root={args.data_root}", f"--data.batch_size={args.batch_size}",
        f"--train.steps={args.steps}", "--train.microbatches=1", "--checkpoint.enabled=false",
        "--optim.name=adam", f"--optim.lr={args.lr}", "--partition.method=uniform",
    ]
    if method == "backprop":
        return common + ["--train.schedule=single"]
    spec, variant = registry.mode(method)  # dni or cdni
    return common + [f"--train.schedule={spec.name}", f"--dni.kind={args.predictor}", f"--dni.lr={args.sg_lr}",
                     *variant.overrides, *args.set]


def run_one(args: argparse.Namespace, layers: int, method: str, seed: int) -> dict:
    run_dir = args.out / "runs" / f"{args.data}-L{layers}-{method}{args.tag}-s{seed}"
    if method == "backprop":
        cmd = [sys.executable, "-m", "pipedni.train", args.config]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={layers}",
               "--standalone", "-m", "pipedni.train", args.config]
    cmd += overrides(args, layers, method, seed, run_dir)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"data": args.data, "layers": layers, "method": method + args.tag, "seed": seed, "steps": summary["steps"],
            "test_accuracy": summary["test_accuracy"], "test_error_pct": 100 * (1 - summary["test_accuracy"]),
            "wall_time_sec": summary["wall_time_sec"], "job_sec": elapsed, "num_stages": summary["num_stages"]}


def sweep(args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "runs.jsonl"
    done = {(r["data"], r["layers"], r["method"], r["seed"]) for r in _read(log)}
    for seed in args.seeds:
        for layers in args.layers:
            for method in args.methods:
                if (args.data, layers, method + args.tag, seed) in done:
                    continue
                row = run_one(args, layers, method, seed)
                with log.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{args.data} L={layers} {method:8s} seed {seed}: test error {row['test_error_pct']:.2f}% "
                      f"({row['wall_time_sec']:.0f}s)", flush=True)


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _cell(rows: list[dict], key: str, fmt: str) -> str:
    values = [r[key] for r in rows]
    if not values:
        return "-"
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"


def report(args: argparse.Namespace) -> str:
    rows = [r for r in _read(args.out / "runs.jsonl") if r["data"] == args.data]
    layers = sorted({r["layers"] for r in rows})
    seeds = sorted({r["seed"] for r in rows})
    steps = sorted({r["steps"] for r in rows})
    lines = [f"Test error (%) on {args.data}, mean ± standard deviation over seeds {seeds}, {steps} steps each:", "",
             "| method | " + " | ".join(f"{n} layers" for n in layers) + " |",
             "| --- |" + " --- |" * len(layers)]
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    methods += sorted({r["method"] for r in rows} - set(METHODS))  # ablations, by tag
    for method in methods:
        cells = [_cell([r for r in rows if r["method"] == method and r["layers"] == n], "test_error_pct", ".2f")
                 for n in layers]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "Wall time per run (s), mean ± standard deviation:", "",
              "| method | " + " | ".join(f"{n} layers" for n in layers) + " |", "| --- |" + " --- |" * len(layers)]
    for method in methods:
        cells = [_cell([r for r in rows if r["method"] == method and r["layers"] == n], "wall_time_sec", ".0f")
                 for n in layers]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "Every run (seeds in order):", "", "| layers | method | test error % | wall time s | stages |",
              "| --- | --- | --- | --- | --- |"]
    for n in layers:
        for method in methods:
            runs = sorted((r for r in rows if r["method"] == method and r["layers"] == n), key=lambda r: r["seed"])
            if runs:
                errors = " / ".join(f"{r['test_error_pct']:.2f}" for r in runs)
                walls = " / ".join(f"{r['wall_time_sec']:.0f}" for r in runs)
                lines.append(f"| {n} | {method} | {errors} | {walls} | {runs[0]['num_stages']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", default="configs/mlp_fashion.yaml", help="base config (overridden below)")
    parser.add_argument("--data", default="fashion_mnist")
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 4, 5, 6])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--sg-lr", type=float, default=3e-4)
    parser.add_argument("--predictor", default="linear", choices=["linear", "lowrank", "mlp"])
    parser.add_argument("--set", action="append", default=[], metavar="--dni.KEY=VALUE",
                        help="an extra override for the dni/cdni runs (an ablation; repeat it for several); "
                             "give --tag too")
    parser.add_argument("--tag", default="", help="suffix naming the method in results, e.g. -stale1")
    parser.add_argument("--report", action="store_true", help="print the markdown table of OUT and exit")
    args = parser.parse_args()
    if args.report:
        sys.stdout.write(report(args))
    else:
        sweep(args)


if __name__ == "__main__":
    main()
