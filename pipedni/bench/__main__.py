"""``python -m pipedni.bench CONFIG --stages N --modes LIST --out DIR``: benchmark the schedules.

Two phases, both real torchrun jobs on the same stage modules, data, batch and loss:
1. throughput: every job runs ``--steps`` steps, ``--repeats`` times, interleaved (repeat r runs
   every job before repeat r+1 starts, in a rotated order) next to a per-stage profile that gives
   the ideal pipeline limit; the first ``--warmup`` steps (at least 1) of each run are not timed;
2. time to accuracy: one job per mode (swept modes at their fastest microbatch count) trains for
   the same ``--budget`` seconds of training time, evaluating along the way, ``--budget-repeats``
   times, interleaved the same way.
Then a table, ``results.json``, CSV files and plots in DIR; ``--docs`` regenerates a docs page.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from pipedni.bench import report
from pipedni.bench.plan import DEFAULT_MODES, Job, parse_boundaries, parse_counts, parse_modes, plan_jobs
from pipedni.bench.profile import limits
from pipedni.bench.runner import JobFailed, measure, read_curve, run_job, set_target, spread
from pipedni.config import Config, load_config
from pipedni.errors import USER_ERRORS, ConfigError
from pipedni.schedules import registry

QUICK = {"steps": 20, "warmup": 4, "repeats": 3, "microbatches": "4", "budget": 8.0, "budget_repeats": 1}
EVALS_PER_BUDGET = 12
PROFILE_START_SEC = 8.0  # start-up time given to the per-stage profile processes before they time together
PROFILE_TOGETHER_SEC = 2.0


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="python -m pipedni.bench", description=__doc__.splitlines()[0],
                                epilog="Other --section.key=value arguments override the config for every job.")
    p.add_argument("config", help="YAML config: model, data, batch, optimizer, dni settings")
    p.add_argument("--stages", type=int, default=2, help="pipeline stages (processes), default 2")
    p.add_argument("--modes", default=",".join(DEFAULT_MODES), help="comma-separated, default: all but mixed and unlock")
    p.add_argument("--out", help="output directory (default: bench/<config name>)")
    p.add_argument("--quick", action="store_true", help="about 12 minutes on 2 CPU cores (job start-up "
                   "dominates): " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    p.add_argument("--boundaries", default="", help="the mixed mode's boundary modes, one per boundary, "
                   "e.g. locked,dni,locked for 4 stages (mixed runs only when given in --modes)")
    p.add_argument("--microbatches", default="1,2,4,8", help="microbatch counts swept, default 1,2,4,8")
    p.add_argument("--repeats", type=int, default=5, help="interleaved repeats, default 5")
    p.add_argument("--steps", type=int, default=60, help="steps per throughput run, default 60")
    p.add_argument("--warmup", type=int, default=10, help="untimed first steps of each run, default 10")
    p.add_argument("--budget", type=float, default=60.0, help="training seconds per mode for time to "
                   "accuracy, default 60 (0: skip)")
    p.add_argument("--budget-repeats", type=int, default=3, help="interleaved runs of each time-to-accuracy job, "
                   "default 3 (medians are reported)")
    p.add_argument("--target", type=float, help="target test accuracy (default: the lowest any locked pipeline "
                   "reached within the budget)")
    p.add_argument("--docs", help="also regenerate this docs page's section for the config (e.g. docs/benchmark_tables.md)")
    p.add_argument("--job-timeout", type=float, default=900.0, help="seconds before a job counts as hung")
    p.add_argument("--rotate", type=int, default=0, help="start the interleaved order rotated by this many jobs, "
                   "default 0 (python -m pipedni.bench.grid --interleave gives each round's index)")
    args, overrides = p.parse_known_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if p.get_default(key) == getattr(args, key):
                setattr(args, key, value)
    return args, overrides


def check(args: argparse.Namespace, overrides: list[str]) -> tuple[Config, list[str], list[int]]:
    """Everything a job could fail on at once, before any job starts."""
    cfg = load_config(args.config, overrides)
    modes = parse_modes(args.modes)
    args.boundaries = parse_boundaries(args.boundaries, modes, args.stages)
    counts = parse_counts(args.microbatches, "--microbatches")
    for name, low in (("stages", 2), ("repeats", 1), ("budget_repeats", 1), ("steps", 3), ("warmup", 1), ("rotate", 0)):
        if getattr(args, name) < low:
            raise ConfigError(f"--{name} = {getattr(args, name)}; must be >= {low}")
    if args.warmup + 2 > args.steps:
        raise ConfigError(f"--warmup = {args.warmup} leaves under 2 timed steps of --steps = {args.steps}; lower it")
    if cfg.data.batch_size < args.stages:
        raise ConfigError(f"data.batch_size = {cfg.data.batch_size} is smaller than --stages = {args.stages}")
    return cfg, modes, counts


def machine() -> dict:
    import torch

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "commit": commit or None, "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M")}


def _profile_command(args: argparse.Namespace, overrides: list[str], *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipedni.bench.profile", args.config, f"--stages={args.stages}",
            *overrides, "--run.threads=1", *extra]


def _profile_output(proc: subprocess.CompletedProcess | subprocess.Popen, stdout: str, stderr: str) -> dict:
    if proc.returncode != 0:
        last = (stderr.strip().splitlines() or ["(no output)"])[-1].removeprefix("error: ")
        raise JobFailed(f"per-stage profile failed: {last}", proc.returncode)
    return json.loads(stdout.strip().splitlines()[-1])


def profile(args: argparse.Namespace, overrides: list[str]) -> dict:
    """Each stage alone in one process, then all stages at once, one process each (see profile.py)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    counts = f"--microbatches=1,{args.microbatches}"  # forward and backward apart, as each job splits a batch
    proc = subprocess.run(_profile_command(args, overrides, counts), env=env, capture_output=True, text=True,
                          timeout=args.job_timeout)
    alone = _profile_output(proc, proc.stdout, proc.stderr)
    start_at = time.time() + PROFILE_START_SEC
    procs = [subprocess.Popen(_profile_command(args, overrides, f"--only={i}", f"--start-at={start_at}",
                                               f"--seconds={PROFILE_TOGETHER_SEC}"),
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(args.stages)]
    together = [_profile_output(p, *p.communicate(timeout=args.job_timeout)) for p in procs]
    for stage, other in zip(alone["stages"], together):
        stage["fwd_bwd_together_sec"] = other["stages"][0]["fwd_bwd_sec"]
    return alone


def throughput_phase(args, overrides, jobs: list[Job], out: Path, batch_size: int) -> tuple[dict, dict]:
    # dni.warmup_steps=0: the throughput of decoupled steps (warm-up steps run locked 1F1B)
    extra = [*overrides, f"--train.steps={args.steps}", "--train.eval_every=0", "--train.time_limit_sec=0",
             "--dni.warmup_steps=0",
             "--checkpoint.enabled=false", "--run.activation_memory=true", f"--run.log_every={args.steps}",
             f"--data.test_limit={batch_size}"]
    runs: dict[str, list[dict]] = {job.label: [] for job in jobs}
    profiles = []
    for r in range(args.repeats):
        profiles.append(profile(args, overrides))
        for job in rotated(jobs, r + args.rotate):
            run_dir = run_job(job, args.config, out / "runs" / slug(job.label) / f"r{r}", extra, args.job_timeout)
            result = measure(run_dir, job.nproc, batch_size, args.warmup)
            runs[job.label].append(result)
            print(f"[repeat {r + 1}/{args.repeats}] {job.label:<18} {result['samples_per_sec']:9.1f} samples/s",
                  flush=True)
    return runs, combine_profiles(profiles, batch_size)


def combine_profiles(profiles: list[dict], batch_size: int) -> dict:
    """Median over repeats of each stage's times, and the limits they give (with min-max)."""
    keys = ("fwd_bwd_sec", "optimizer_sec", "predictor_sec", "fwd_bwd_together_sec")
    stages = [{**stage, **{key: spread([p["stages"][i][key] for p in profiles])["median"] for key in keys}}
              for i, stage in enumerate(profiles[0]["stages"])]
    for i, stage in enumerate(stages):
        stage["microbatched"] = {m: {part: spread([p["stages"][i]["microbatched"][m][part] for p in profiles])["median"]
                                     for part in times} for m, times in stage.get("microbatched", {}).items()}
    per_repeat = [limits(p["stages"], batch_size) for p in profiles]
    together = [limits([{"fwd_bwd_sec": s["fwd_bwd_together_sec"]} for s in p["stages"]], batch_size) for p in profiles]
    return {"threads": profiles[0]["threads"], "stages": stages,
            "ideal_samples_per_sec": spread([x["ideal_samples_per_sec"] for x in per_repeat]),
            "serial_samples_per_sec": spread([x["serial_samples_per_sec"] for x in per_repeat]),
            "ideal_together_samples_per_sec": spread([x["ideal_samples_per_sec"] for x in together])}


def rotated(jobs: list[Job], r: int) -> list[Job]:
    """Repeat r's order: rotated by r, so no job always runs first."""
    return jobs[r % len(jobs):] + jobs[: r % len(jobs)]


def accuracy_phase(args, overrides, jobs: list[Job], rows: list[dict], out: Path, batch_size: int) -> list[dict]:
    """Each mode's fastest job trains for ``--budget`` seconds, ``--budget-repeats`` times
    (interleaved); returns one entry per job holding every run's curve."""
    best: dict[str, Job] = {}
    speed = {row["label"]: row["samples_per_sec"]["median"] for row in rows}
    for job in jobs:
        if job.mode not in best or speed[job.label] > speed[best[job.mode].label]:
            best[job.mode] = job
    chosen = [job for job in jobs if job.mode == registry.REFERENCE or best[job.mode] is job]  # both baselines
    entries = {}
    for job in chosen:
        every = max(1, round(speed[job.label] * args.budget / EVALS_PER_BUDGET / batch_size))
        entries[job.label] = {"label": job.label, "mode": job.mode, "eval_every": every, "curves": []}
    for r in range(args.budget_repeats):
        for job in rotated(chosen, r + args.rotate):
            entry = entries[job.label]
            extra = [*overrides, "--train.steps=100000000", f"--train.eval_every={entry['eval_every']}",
                     f"--train.time_limit_sec={args.budget}", "--checkpoint.enabled=false", "--run.log_every=100000"]
            run_dir = run_job(job, args.config, out / "runs" / slug(job.label) / f"budget{r}", extra,
                              args.job_timeout + 3 * args.budget)
            entry["curves"].append(read_curve(run_dir, job.nproc))
            print(f"[budget {args.budget:.0f}s, repeat {r + 1}/{args.budget_repeats}] {job.label:<18} "
                  f"final accuracy {entry['curves'][-1][-1]['accuracy']:.4f}", flush=True)
    return list(entries.values())


def slug(label: str) -> str:
    return label.replace(" ", "_").replace("=", "")


def summarize_runs(jobs: list[Job], runs: dict[str, list[dict]], ideal: float, ideal_together: float) -> list[dict]:
    rows = []
    for job in jobs:
        results = runs[job.label]
        speed = spread([r["samples_per_sec"] for r in results])
        stages = []
        for i in range(len(results[0]["stages"])):
            per_repeat = [r["stages"][i] for r in results]
            stage = {key: spread([s[key] for s in per_repeat])["median"] for key in
                     ("busy_fraction", "wait_input_sec_per_step", "wait_grad_sec_per_step", "bytes_sent_per_step")}
            for key in ("peak_activation_bytes", "peak_memory_bytes"):
                stage[key] = max((s[key] or 0) for s in per_repeat) or None
            stages.append(stage)
        # the profile's limits are one pipeline's on the whole batch: D replicas could reach D times them
        rows.append({**asdict(job), "samples_per_sec": speed, "ratio_to_ideal": speed["median"] / ideal / job.replicas,
                     "ratio_to_ideal_together": speed["median"] / ideal_together / job.replicas, "stages": stages})
    return rows


def run_benchmark(args: argparse.Namespace, overrides: list[str], out: Path) -> dict:
    cfg, modes, counts = check(args, overrides)
    jobs = plan_jobs(modes, args.stages, counts, cfg.data.batch_size, tuple(args.boundaries), cfg.dist.data_parallel)
    print(f"{len(jobs)} jobs x {args.repeats} repeats, {args.steps} steps each ({args.warmup} untimed)", flush=True)
    runs, profiled = throughput_phase(args, overrides, jobs, out, cfg.data.batch_size)
    rows = summarize_runs(jobs, runs, profiled["ideal_samples_per_sec"]["median"],
                          profiled["ideal_together_samples_per_sec"]["median"])
    curves = accuracy_phase(args, overrides, jobs, rows, out, cfg.data.batch_size) if args.budget > 0 else []
    results = {"config": args.config, "workload": Path(args.config).stem, "stages": args.stages,
               "data_parallel": cfg.dist.data_parallel, "batch_size": cfg.data.batch_size, "command": "python -m pipedni.bench " + shlex.join(sys.argv[1:]),
               "machine": machine(),
               "settings": {k: getattr(args, k) for k in ("steps", "warmup", "repeats", "budget", "budget_repeats")},
               "overrides": overrides, "profile": profiled, "throughput": rows, "accuracy": curves}
    set_target(results, args.target)
    return results


def main(argv: Optional[list[str]] = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out or Path("bench") / Path(args.config).stem)
    try:
        results = run_benchmark(args, overrides, out)
    except JobFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 2 if err.exit_code == 2 else 1
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report.write(results, out)
    if args.docs:
        report.update_docs(Path(args.docs), [results])
    return 0


if __name__ == "__main__":
    sys.exit(main())
