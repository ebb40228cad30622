"""``python -m pipedni.bench.grid CONFIG --latencies 0,10,100 --bandwidths 0,100 --out DIR``:
the benchmark over a grid of emulated links (see [Note: emulated links] in pipedni/transport/link.py).

Each cell is one ``python -m pipedni.bench`` run with ``--dist.link_latency_ms`` and
``--dist.link_bandwidth_mbps`` set, into ``DIR/lat<L>_bw<B>``; every other argument (modes,
microbatches, repeats, steps, budget, ``--section.key=value``) is passed on to each cell, so
the locked pipelines are re-tuned over the microbatch counts in every cell and every ratio is
taken side by side within one cell. A cell whose results.json exists is not run again (a grid
stopped half way goes on). Then ``grid.json``, ``grid.md`` (the fastest locked pipeline
against each decoupled mode, per cell) and ``grid.png`` in DIR; ``--docs PAGE`` also replaces
the grid's marked section of a docs page. ``--report`` only rebuilds them from the cells.

[Note: interleaved cells]
Cells run one after another each take several minutes, and a shared machine's speed drifts
over that time: a grid's cell once ran every job 16-55% slower than the cell before it. Ratios
within a cell are safe from it (its jobs are interleaved); anything that compares cells is not,
such as the simulator calibrated on one cell and checked on the others. ``--interleave``
(throughput only, ``--budget 0``) runs the grid in ``--repeats`` rounds instead: each round is
one repeat of every cell, ``DIR/lat<L>_bw<B>/round<r>`` (cells and jobs in an order rotated by
the round), and each cell's results.json is then made from its rounds exactly as one bench run
makes it from its repeats (``merge_rounds``). A drift then falls on every cell alike.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Optional

from pipedni.bench import report
from pipedni.bench.__main__ import combine_profiles, summarize_runs
from pipedni.bench.__main__ import parse_args as bench_args
from pipedni.bench.plan import LOCKED_PIPELINES, Job
from pipedni.bench.report import md_table, replace_section
from pipedni.metrics.writer import write_json_atomic
from pipedni.schedules import registry


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="python -m pipedni.bench.grid", description=__doc__.splitlines()[0],
                                epilog="Other arguments are passed to python -m pipedni.bench for every cell.")
    p.add_argument("config")
    p.add_argument("--latencies", default="0,1,10,30,100", help="one-way latencies in ms, default 0,1,10,30,100")
    p.add_argument("--bandwidths", default="0,1000,100", help="Mbit/s per direction (0: unlimited), default 0,1000,100")
    p.add_argument("--out", required=True, help="output directory: one sub-directory per cell")
    p.add_argument("--report", action="store_true", help="only rebuild the table and plot from the cells run")
    p.add_argument("--docs", help="also replace this docs page's grid section for the config")
    p.add_argument("--name", help="the docs section's name (default: the config's; another keeps a second grid of "
                                  "the same workload beside the first)")
    p.add_argument("--interleave", action="store_true", help="throughput only (with --budget 0): --repeats rounds, "
                   "each one repeat of every cell, so the machine's drift falls on every cell alike")
    args, passed = p.parse_known_args(argv)
    try:
        args.latencies = [float(v) for v in args.latencies.split(",")]
        args.bandwidths = [float(v) for v in args.bandwidths.split(",")]
    except ValueError:
        p.exit(2, f"error: --latencies {args.latencies!r} / --bandwidths {args.bandwidths!r}: comma-separated "
                  "numbers, e.g. --latencies 0,10,100 --bandwidths 0,1000\n")
    if any(v < 0 for v in args.latencies + args.bandwidths):
        p.exit(2, "error: latencies and bandwidths must be >= 0 (bandwidth 0: unlimited)\n")
    if args.interleave and not args.report and bench_args([args.config, *passed])[0].budget != 0:
        p.exit(2, "error: --interleave measures throughput only; add --budget 0 (time to accuracy needs cells of "
                  "their own)\n")
    return args, passed


def cell_dir(out: Path, latency: float, bandwidth: float) -> Path:
    return out / f"lat{latency:g}_bw{bandwidth:g}"


def _cells(args: argparse.Namespace) -> list[tuple[float, float]]:
    return [(latency, bandwidth) for bandwidth in args.bandwidths for latency in args.latencies]


def run_cell(args: argparse.Namespace, passed: list[str], latency: float, bandwidth: float, where: Path,
             label: str = "") -> None:
    print(f"== cell{label}: {latency:g} ms one way, {bandwidth:g} Mbit/s (0: unlimited) -> {where}", flush=True)
    cmd = [sys.executable, "-m", "pipedni.bench", args.config, "--out", str(where), *passed,
           f"--dist.link_latency_ms={latency:g}", f"--dist.link_bandwidth_mbps={bandwidth:g}"]
    if subprocess.run(cmd).returncode != 0:
        raise SystemExit(f"error: the cell {latency:g} ms / {bandwidth:g} Mbit/s failed: {' '.join(cmd)}")


def run_cells(args: argparse.Namespace, passed: list[str]) -> None:
    for latency, bandwidth in _cells(args):
        where = cell_dir(Path(args.out), latency, bandwidth)
        if not (where / "results.json").is_file():
            run_cell(args, passed, latency, bandwidth, where)


def run_rounds(args: argparse.Namespace, passed: list[str]) -> None:
    """The grid in rounds, each one repeat of every cell (see [Note: interleaved cells])."""
    rounds = bench_args([args.config, *passed])[0].repeats
    cells = [c for c in _cells(args) if not (cell_dir(Path(args.out), *c) / "results.json").is_file()]
    for r in range(rounds if cells else 0):
        for latency, bandwidth in cells[r % len(cells):] + cells[: r % len(cells)]:
            where = cell_dir(Path(args.out), latency, bandwidth) / f"round{r}"
            if not (where / "results.json").is_file():
                run_cell(args, [*passed, "--repeats=1", f"--rotate={r}"], latency, bandwidth, where,
                         f", round {r + 1}/{rounds}")
    for latency, bandwidth in cells:
        where = cell_dir(Path(args.out), latency, bandwidth)
        merged = merge_rounds([json.loads((where / f"round{r}" / "results.json").read_text()) for r in range(rounds)])
        report.write(dict(merged, command=args.command), where)


def merge_rounds(rounds: list[dict]) -> dict:
    """One cell's results from its rounds (each a bench run of one repeat), as one bench run
    makes them from its repeats: the same ``summarize_runs`` over each round's measurement and
    ``combine_profiles`` over each round's profile."""
    first, batch_size = rounds[0], rounds[0]["batch_size"]
    profiled = combine_profiles([r["profile"] for r in rounds], batch_size)
    fields = Job.__dataclass_fields__
    jobs = [Job(**{**{k: row[k] for k in fields}, "overrides": tuple(row["overrides"])}) for row in first["throughput"]]
    runs = {job.label: [] for job in jobs}
    for r in rounds:
        for row in r["throughput"]:  # a round's row holds its one run: each median is that run's figure
            runs[row["label"]].append({"samples_per_sec": row["samples_per_sec"]["median"], "stages": row["stages"]})
    rows = summarize_runs(jobs, runs, profiled["ideal_samples_per_sec"]["median"],
                          profiled["ideal_together_samples_per_sec"]["median"])
    return {**first, "settings": {**first["settings"], "repeats": len(rounds), "interleaved_rounds": len(rounds)},
            "profile": profiled, "throughput": rows}


def summarize_cell(results: dict, latency: float, bandwidth: float) -> dict:
    """The fastest locked pipeline (its mode and microbatch count) and each decoupled mode's
    fastest job, in samples/s (median, min, max), with time to target where measured."""
    rows = [r for r in results["throughput"] if r["mode"] != registry.REFERENCE]
    locked = max((r for r in rows if r["mode"] in LOCKED_PIPELINES), key=lambda r: r["samples_per_sec"]["median"])
    best: dict[str, dict] = {}
    for r in rows:
        if r["mode"] not in LOCKED_PIPELINES and (r["mode"] not in best or r["samples_per_sec"]["median"]
                                                  > best[r["mode"]]["samples_per_sec"]["median"]):
            best[r["mode"]] = r
    reached = {e["label"]: e.get("time_to_target_sec") for e in results.get("accuracy", [])}
    # time to target: the locked job that got there first, not only the one of most samples/s
    trained = [r for r in rows if r["mode"] in LOCKED_PIPELINES and reached.get(r["label"]) is not None]
    soonest = min(trained, key=lambda r: reached[r["label"]], default=locked)

    def entry(r: dict) -> dict:
        return {"label": r["label"], "samples_per_sec": r["samples_per_sec"],
                "time_to_target_sec": reached.get(r["label"])}

    return {"latency_ms": latency, "bandwidth_mbps": bandwidth, "locked": entry(locked), "locked_soonest": entry(soonest),
            "decoupled": {mode: entry(r) for mode, r in best.items()}, "target_accuracy": results.get("target_accuracy"),
            "commit": results["machine"].get("commit"), "date": results["machine"].get("date")}


def collect(args: argparse.Namespace) -> dict:
    cells = []
    for bandwidth in args.bandwidths:
        for latency in args.latencies:
            path = cell_dir(Path(args.out), latency, bandwidth) / "results.json"
            if path.is_file():
                cells.append(summarize_cell(json.loads(path.read_text()), latency, bandwidth))
    if not cells:
        raise SystemExit(f"error: no cell of the grid has results in {args.out}; run it without --report first")
    first = json.loads((cell_dir(Path(args.out), cells[0]["latency_ms"], cells[0]["bandwidth_mbps"])
                        / "results.json").read_text())
    return {"config": args.config, "workload": args.name or Path(args.config).stem, "machine": first["machine"],
            "settings": first["settings"], "command": args.command,
            "cells": cells}


def _bandwidth(mbps: float) -> str:
    return "unlimited" if mbps == 0 else f"{mbps / 1000:g} Gbit/s" if mbps >= 1000 else f"{mbps:g} Mbit/s"


def markdown(grid: dict) -> str:
    modes = sorted({m for c in grid["cells"] for m in c["decoupled"]})
    # cells run at different times (a grid resumed, or extended later) name their own commit
    mixed = len({c["commit"] for c in grid["cells"]}) > 1
    header = ["one-way latency", "bandwidth", "fastest locked", "samples/s", *[f"{m}: x locked, samples/s" for m in modes]]
    rows = []
    for c in grid["cells"]:
        base = c["locked"]["samples_per_sec"]["median"]
        row = [f"{c['latency_ms']:g} ms", _bandwidth(c["bandwidth_mbps"]), c["locked"]["label"], _rate(c["locked"])]
        for m in modes:
            d = c["decoupled"].get(m)
            row.append("-" if d is None else f"**{d['samples_per_sec']['median'] / base:.2f}x**: {_rate(d)}, {d['label']}")
        rows.append(row + [f"{c['commit']}, {c['date']}"] * mixed)
    header += ["commit, date"] * mixed
    m, s = grid["machine"], grid["settings"]
    when = "cells run at the commits and dates given" if mixed else f"commit {m.get('commit')}, {m['date']}"
    text = (f"`{grid['command']}`  \n{m['cpu']}, {m['cores']} cores, torch {m['torch']}; {when}. "
            f"Per cell: {s['repeats']} interleaved repeats of {s['steps']} steps ({s['warmup']} untimed)"
            f"{', each in a round of its own that ran every cell (--interleave)' if s.get('interleaved_rounds') else ''}; "
            "samples/s median (min-max); the locked pipelines re-tuned over the microbatch counts in every cell.\n\n"
            + md_table(header, rows))
    timed = [c for c in grid["cells"] if c["target_accuracy"] is not None]
    if timed:
        header = ["one-way latency", "bandwidth", "target", "soonest locked", *modes]
        rows = [[f"{c['latency_ms']:g} ms", _bandwidth(c["bandwidth_mbps"]), f"{c['target_accuracy']}",
                 _seconds(c["locked_soonest"], named=True), *[_seconds(c["decoupled"].get(m)) for m in modes]] for c in timed]
        text += (f"\n\nTime to the target accuracy (median of {s['budget_repeats']} runs of {s['budget']:g} s; "
                 "the target is the cell's own, the lowest any locked pipeline reached; soonest locked: the "
                 "locked job trained for the budget that reached it first):\n\n" + md_table(header, rows))
    return text


def _seconds(entry: Optional[dict], named: bool = False) -> str:
    if entry is None or entry["time_to_target_sec"] is None:
        return "-" if entry is None else "not reached"
    return f"{entry['time_to_target_sec']:.1f} s" + (f" ({entry['label']})" if named else "")


def _rate(entry: dict) -> str:
    s = entry["samples_per_sec"]
    return f"{s['median']:.0f} ({s['min']:.0f}-{s['max']:.0f})"


def plot(grid: dict, path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("grid.png skipped: pip install 'pipedni[plot]' (matplotlib) to draw it", file=sys.stderr)
        return None
    bandwidths = sorted({c["bandwidth_mbps"] for c in grid["cells"]}, key=lambda b: (b != 0, -b))
    modes = sorted({m for c in grid["cells"] for m in c["decoupled"]})
    fig, axes = plt.subplots(1, len(bandwidths), figsize=(4.2 * len(bandwidths), 3.6), sharey=True, squeeze=False)
    for ax, bandwidth in zip(axes[0], bandwidths):
        cells = sorted((c for c in grid["cells"] if c["bandwidth_mbps"] == bandwidth), key=lambda c: c["latency_ms"])
        xs = [max(c["latency_ms"], 0.3) for c in cells]  # 0 ms drawn at the left edge of the log axis
        series = [("fastest locked", [c["locked"] for c in cells])]
        series += [(m, [c["decoupled"].get(m) for c in cells]) for m in modes]
        for name, entries in series:
            points = [(x, e["samples_per_sec"]["median"]) for x, e in zip(xs, entries) if e is not None]
            ax.plot(*zip(*points), marker="o", lw=2 if name == "fastest locked" else 1.2, label=name)
        ax.set_xscale("log")
        ax.set_xlabel("one-way latency, ms (0 drawn at 0.3)")
        ax.set_title(_bandwidth(bandwidth))
    axes[0][0].set_ylabel("samples/s (median)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"{grid['workload']}: emulated links, 2 stages")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def update_docs(page: Path, grid: dict) -> None:
    page.write_text(replace_section(page.read_text(), f"grid:{grid['workload']}", markdown(grid)))
    print(f"updated {page}")


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, passed = parse_args(argv)
    args.command = "python -m pipedni.bench.grid " + " ".join(argv)
    if not args.report:
        (run_rounds if args.interleave else run_cells)(args, passed)
    grid = collect(args)
    out = Path(args.out)
    write_json_atomic(out / "grid.json", grid)
    (out / "grid.md").write_text(markdown(grid) + "\n")
    print(markdown(grid))
    if plot(grid, out / "grid.png"):
        print(f"wrote {out / 'grid.png'}")
    if args.docs:
        update_docs(Path(args.docs), grid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
