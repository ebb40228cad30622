"""Benchmark results out: ``results.json``, CSV files, rich tables, PNG plots and a docs section.

``python -m pipedni.bench.report DIR [DIR ...] [--docs docs/benchmark_tables.md]`` redoes all of it
from saved ``results.json`` files. Each workload owns one marked section of the docs page, so
regenerating one keeps the others and every hand-written paragraph outside the markers.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.table import Table

from pipedni.bench.plan import BASELINE, LOCKED_PIPELINES
from pipedni.bench.runner import curves_of, set_target
from pipedni.metrics import write_json_atomic

MIB = 1024 * 1024
# Per-stage columns read "stage 0 / stage 1 / ...".
THROUGHPUT_HEADER = ["job", "samples/s", "min-max", "x ideal", "x ideal together", "x single", "busy",
                     "MiB sent/step", "peak act. MiB"]
ACCURACY_HEADER = ["job", "time to target (s)", "min-max", "reached", "x fastest locked pipeline",
                   "accuracy at budget", "steps", "evaluations"]


def _per_stage(stages: list[dict], key: str, fmt) -> str:
    values = [s.get(key) for s in stages]
    return " / ".join("-" if v is None else fmt(v) for v in values)


def throughput_rows(results: dict) -> list[list[str]]:
    rows = results["throughput"]
    single = next((r["samples_per_sec"]["median"] for r in rows if r["label"] == BASELINE), None)
    out = []
    for r in rows:
        speed = r["samples_per_sec"]
        out.append([
            r["label"], f"{speed['median']:.0f}", f"{speed['min']:.0f}-{speed['max']:.0f}",
            f"{r['ratio_to_ideal']:.2f}", f"{r['ratio_to_ideal_together']:.2f}", "-" if single is None else f"{speed['median'] / single:.2f}",
            _per_stage(r["stages"], "busy_fraction", lambda v: f"{v:.0%}"),
            _per_stage(r["stages"], "bytes_sent_per_step", lambda v: f"{v / MIB:.2f}"),
            _per_stage(r["stages"], "peak_activation_bytes", lambda v: f"{v / MIB:.1f}"),
        ])
    return out


def accuracy_rows(results: dict) -> list[list[str]]:
    """Per job: medians over its runs (time to target, final accuracy, steps, evaluations), the
    spread of the times of the runs that reached the target, and how many did."""
    times = [e["time_to_target_sec"] for e in results["accuracy"]
             if e["mode"] in LOCKED_PIPELINES and e.get("time_to_target_sec") is not None]
    fastest = min(times, default=None)
    out = []
    for entry in results["accuracy"]:
        curves, reached = curves_of(entry), entry.get("time_to_target_sec")
        hits = [t for t in entry.get("time_to_target_runs", []) if t is not None]
        out.append([entry["label"], "not reached" if reached is None else f"{reached:.1f}",
                    f"{min(hits):.1f}-{max(hits):.1f}" if hits else "-", f"{len(hits)}/{len(curves)}",
                    "-" if reached is None or fastest is None else f"{reached / fastest:.2f}",
                    _median(curves, lambda c: c[-1]["accuracy"], "{:.4f}"),
                    _median(curves, lambda c: c[-1]["samples"] // results["batch_size"], "{:.0f}"),
                    _median(curves, len, "{:.0f}")])
    return out


def _median(curves: list[list[dict]], value, fmt: str) -> str:
    return fmt.format(statistics.median(value(c) for c in curves)) if curves else "-"


def profile_rows(results: dict) -> list[list[str]]:
    return [[str(s["stage_index"]), f"{s['num_params']:,}", f"{s['fwd_bwd_sec'] * 1e3:.1f}",
             f"{s['fwd_bwd_together_sec'] * 1e3:.1f}", f"{s['optimizer_sec'] * 1e3:.1f}",
             f"{s['predictor_sec'] * 1e3:.1f}" if s["predictor_sec"] else "-"] for s in results["profile"]["stages"]]


PROFILE_HEADER = ["stage", "params", "fwd+bwd ms alone", "fwd+bwd ms together", "optimizer ms", "predictor ms"]


def _title(results: dict) -> str:
    replicas = results.get("data_parallel", 1)
    copies = f" x {replicas} replicas" if replicas > 1 else ""
    return f"{results['workload']}: {results['stages']} stages{copies}, batch {results['batch_size']}"


def print_tables(results: dict, console: Optional[Console] = None) -> None:
    console = console or Console()
    ideal = results["profile"]["ideal_samples_per_sec"]["median"]
    for title, header, rows in (
        (f"{_title(results)}: each stage alone (ideal limit {ideal:.0f} samples/s)", PROFILE_HEADER, profile_rows(results)),
        (f"{_title(results)}: throughput", THROUGHPUT_HEADER, throughput_rows(results)),
        (f"{_title(results)}: {results['settings']['budget']:.0f} s of training each, target accuracy "
         f"{results['target_accuracy']}", ACCURACY_HEADER, accuracy_rows(results)),
    ):
        if not rows:
            continue
        table = Table(title=title)
        for name in header:
            table.add_column(name, justify="left" if name == "job" else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def plot(results: dict, out: Path) -> list[Path]:
    """throughput.png and accuracy.png; nothing (with a hint) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: pip install 'pipedni[plot]' (matplotlib) to get them", file=sys.stderr)
        return []
    rows = results["throughput"]
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(rows)), 4))
    medians = [r["samples_per_sec"]["median"] for r in rows]
    errors = [[m - r["samples_per_sec"]["min"] for m, r in zip(medians, rows)],
              [r["samples_per_sec"]["max"] - m for m, r in zip(medians, rows)]]
    ax.bar([r["label"] for r in rows], medians, yerr=errors, capsize=3, color="tab:blue")
    ax.axhline(results["profile"]["ideal_samples_per_sec"]["median"], color="tab:red", ls="--", label="ideal pipeline limit")
    ax.set_ylabel("samples/s (median, min-max)")
    ax.set_title(_title(results))
    ax.legend()
    plt.setp(ax.get_xticklabels(), rotation=45, ha="right")
    paths = [out / "throughput.png"]
    fig.tight_layout()
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)
    if results["accuracy"]:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for n, entry in enumerate(results["accuracy"]):
            for r, curve in enumerate(curves_of(entry)):  # every run, one colour per job
                ax.plot([p["train_sec"] for p in curve], [p["accuracy"] for p in curve], marker=".", lw=1,
                        color=f"C{n % 10}", label=entry["label"] if r == 0 else None)
        if results["target_accuracy"] is not None:
            ax.axhline(results["target_accuracy"], color="grey", ls=":", label="target")
        ax.set_xlabel("training seconds (evaluation excluded)")
        ax.set_ylabel("test accuracy")
        ax.set_title(_title(results))
        ax.legend(fontsize=8)
        paths.append(out / "accuracy.png")
        fig.tight_layout()
        fig.savefig(paths[1], dpi=120)
        plt.close(fig)
    return paths


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "results.json", results)
    write_csv(out / "throughput.csv", THROUGHPUT_HEADER, throughput_rows(results))
    write_csv(out / "accuracy.csv", ["job", "repeat", "train_sec", "samples", "accuracy"],
              [[e["label"], r, p["train_sec"], p["samples"], p["accuracy"]] for e in results["accuracy"]
               for r, curve in enumerate(curves_of(e)) for p in curve])
    print_tables(results)
    for path in plot(results, out):
        print(f"wrote {path}")
    print(f"wrote {out / 'results.json'}, {out / 'throughput.csv'}, {out / 'accuracy.csv'}")


# --------------------------------------------------------------------------- docs


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def markdown(results: dict) -> str:
    m, prof = results["machine"], results["profile"]
    ideal, serial = prof["ideal_samples_per_sec"], prof["serial_samples_per_sec"]
    together = prof["ideal_together_samples_per_sec"]
    parts = [
        f"### {_title(results)}",
        f"`{results['command']}`  \n{m['cpu']}, {m['cores']} cores, torch {m['torch']}, Python {m['python']}"
        f"{', GPU ' + m['gpu'] if m.get('gpu') else ''}; commit {m.get('commit')}, {m['date']}. "
        f"{results['settings']['repeats']} interleaved repeats of {results['settings']['steps']} steps, "
        f"the first {results['settings']['warmup']} untimed; 1 thread per stage process.",
        "Each stage timed alone, and with every stage timing at once (one process each), median over "
        f"repeats. Ideal pipeline limit: **{ideal['median']:.0f} samples/s** ({ideal['min']:.0f}-"
        f"{ideal['max']:.0f}); from the stages timed together: {together['median']:.0f} samples/s "
        f"({together['min']:.0f}-{together['max']:.0f}); all stages in series: {serial['median']:.0f} samples/s. "
        "Optimizer and predictor (predict + fit, DNI only): per batch, alone.",
        md_table(PROFILE_HEADER, profile_rows(results)),
        "Throughput: samples/s at the last stage; x ideal: against the ideal pipeline limit (stages alone; "
        "x ideal together: stages timed at once); x single: against "
        "one process with 1 thread; per-stage columns read stage 0 / stage 1 / ...; peak act.: bytes saved "
        "for backward at once, plus what a DNI stage keeps in its store.",
        md_table(THROUGHPUT_HEADER, throughput_rows(results)),
    ]
    if results["accuracy"]:
        runs = results["settings"].get("budget_repeats", 1)
        parts += [f"Time to {results['target_accuracy']} test accuracy, each job given "
                  f"{results['settings']['budget']:.0f} s of training (evaluation excluded), {runs} interleaved "
                  f"run(s) each: medians (a run that did not get there counts as the slowest), the min-max of the "
                  "runs that got there, and how many did; x fastest locked pipeline: against the quickest median "
                  "of naive, gpipe, 1f1b and torch_*:",
                  md_table(ACCURACY_HEADER, accuracy_rows(results))]
    return "\n\n".join(parts)


def replace_section(text: str, marker: str, body: str) -> str:
    """``text`` with the section between ``<!-- marker:begin -->`` and ``<!-- marker:end -->``
    replaced by ``body`` (appended at the end when there is none yet)."""
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    section = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        return text[: text.index(begin)] + section + text[text.index(end) + len(end):]
    return text.rstrip("\n") + "\n\n" + section + "\n"


def update_docs(path: Path, results_list: list[dict]) -> None:
    """Replace (or append) each workload's marked section of ``path``."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    for results in results_list:
        text = replace_section(text, f"bench:{results['workload']}", markdown(results))
    path.write_text(text)
    print(f"updated {path}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipedni.bench.report", description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", help="benchmark output directories (holding results.json)")
    parser.add_argument("--docs", help="docs page to update, e.g. docs/benchmark_tables.md")
    parser.add_argument("--target", type=float, help="target test accuracy (default: the lowest any locked "
                        "pipeline reached within the budget)")
    args = parser.parse_args(argv)
    results_list = []
    for directory in args.dirs:
        path = Path(directory) / "results.json"
        if not path.is_file():
            print(f"error: {path} does not exist; run python -m pipedni.bench CONFIG --out {directory} first",
                  file=sys.stderr)
            return 2
        results_list.append(json.loads(path.read_text()))
        set_target(results_list[-1], args.target)  # the default target is recomputed from the curves
        write(results_list[-1], Path(directory))
    if args.docs:
        update_docs(Path(args.docs), results_list)
    return 0


if __name__ == "__main__":
    sys.exit(main())
