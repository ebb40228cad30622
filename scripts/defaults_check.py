"""Decoupled schedules at their defaults on an ordinary config, as a new user would run them.

Takes a locked config (configs/mlp_fashion.yaml with Adam 1e-3, as issue 9 measured it),
changes only ``train.schedule``, and reports final test accuracy per schedule, stage count and
seed, plus the mean. Every run is a real ``python -m pipedni.launch`` job; results append to
OUT/runs.jsonl (a rerun skips what is done).

    python scripts/defaults_check.py --out results/defaults                 # the sweep
    python scripts/defaults_check.py --out results/defaults --report        # the table

``--set=--section.key=value`` (repeatable) adds an override to every run: an ablation, kept in
its own --out directory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

# (stages, epochs): the two layouts of issue 9's measurement
LAYOUTS = ((2, 3.0), (4, 1.0))
BASE = ["configs/mlp_fashion.yaml", "--optim.name=adam", "--optim.lr=1e-3", "--run.log_every=1000000",
        "--checkpoint.enabled=false"]


def run(out: Path, schedule: str, stages: int, epochs: float, seed: int, extra: list[str]) -> dict:
    run_dir = out / f"{schedule}-n{stages}-s{seed}"
    cmd = [sys.executable, "-m", "pipedni.launch", f"--nproc_per_node={stages}", *BASE, *extra,
           f"--train.schedule={schedule}", f"--train.epochs={epochs}", f"--run.seed={seed}", f"--run.dir={run_dir}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.strip().splitlines()[-1:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    chosen = [line for line in proc.stdout.splitlines() if "dni.kind auto" in line]
    return {"schedule": schedule, "stages": stages, "epochs": epochs, "seed": seed,
            "test_accuracy": summary["test_accuracy"], "wall_time_sec": summary["wall_time_sec"],
            "samples_per_sec": summary["samples_per_sec"], "predictors": chosen}


def report(records: list[dict]) -> str:
    lines = ["| stages, epochs | schedule | test accuracy per seed | mean | samples/s (median) |",
             "| --- | --- | --- | --- | --- |"]
    keys = sorted({(r["stages"], r["epochs"], r["schedule"]) for r in records})
    for stages, epochs, schedule in keys:
        rs = sorted((r for r in records if (r["stages"], r["epochs"], r["schedule"]) == (stages, epochs, schedule)),
                    key=lambda r: r["seed"])
        accs = [r["test_accuracy"] for r in rs]
        rate = statistics.median(r["samples_per_sec"] for r in rs)
        lines.append(f"| {stages}, {epochs:g} | {schedule} | {' / '.join(f'{a:.2%}' for a in accs)} | "
                     f"{statistics.mean(accs):.2%} | {rate:,.0f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--schedules", default="1f1b,dni,async")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="--SECTION.KEY=VALUE",
                        help="an override for every run (repeatable)")
    args = parser.parse_args()
    log = args.out / "runs.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    if args.report:
        print(report(records))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    done = {(r["schedule"], r["stages"], r["seed"]) for r in records}
    for seed in range(args.seeds):  # seed-major: a partial sweep covers every cell
        for stages, epochs in LAYOUTS:
            for schedule in args.schedules.split(","):
                if (schedule, stages, seed) in done:
                    continue
                record = run(args.out, schedule, stages, epochs, seed, args.set)
                print(json.dumps(record), flush=True)
                with log.open("a") as f:
                    f.write(json.dumps(record) + "\n")
    print(report([json.loads(line) for line in log.read_text().splitlines()]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
