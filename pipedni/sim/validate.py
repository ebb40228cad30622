"""``python -m pipedni.sim.validate DIR...``: the simulator against measured benchmark runs.

Each DIR holds a ``python -m pipedni.bench`` results.json (a cell of ``pipedni.bench.grid``,
or any bench run). For every pipelined job measured there (pipedni's own schedules; torch's
and the one-process baselines are not simulated) the simulator replays the same schedule,
microbatch count, steps and warm-up on the costs that run profiled (each stage timed with
every stage running at once, the contention a real run has), the link its overrides set
(``--dist.link_latency_ms``, ``--dist.link_bandwidth_mbps``) and the bytes each stage sent per
step. The table gives measured and simulated samples/s and the error; ``--json`` writes it.

[Note: calibrating on real runs]
A stage's compute inside the engine costs more than the profile's bare forward and backward:
the step's bookkeeping, the loss per microbatch, the saved-tensor hooks the benchmark's memory
count adds, a receiver thread beside it on a shared core. On 2 cores that is 13-40% at 1-8
microbatches. ``--calibrate CELL`` takes each stage's compute per step from the same job in
another measured run (busy fraction x step time: the stage's own timers), usually the grid's
cell without link emulation, and scales the profile's forward, backward, optimizer and
predictor to it. What is then validated is what the simulator adds: the schedule's order and
dependencies, the bubble, and the links' latency and bandwidth, in cells it was not
calibrated on.

A shared machine's speed drifts between cells run minutes apart (one cell's own profile timed
its stages 25-30% slower than the calibration cell's, and its jobs computed that much more).
``--speed cell`` carries over from the calibration only each stage's overhead, its measured
compute over its profiled compute there, and takes the machine's speed in each cell from that
cell's own profile. The profile is short (5 timed batches per repeat) and about as noisy as
the drift, so on the LM's cells of 2026-12-02 that did no better overall (29 of 40 within 10%
against 31; better at 10 ms, worse at 1, 30 and 100 ms), and the default, ``--speed
calibration``, takes the calibration's measured compute as it is. ``cell`` tells whether a
miss is the machine's drift. On the calibration cell itself the two are the same.

More stages than cores (3 or 4 stages on this 2-core machine) are replayed on that many shared
cores ([Note: shared cores] in shared.py; ``--cores``, by default the measured machine's), and
so are messages whose receipt costs processor time (``--receive-ms``: [Note: receiving costs a
processor]). A stage's measured compute then includes the time it lost to the others, so one
scaling is not enough: the calibration job is replayed on the shared cores and each stage's
cost scaled by measured over simulated busy time, ``CALIBRATION_ROUNDS`` times, until the
replay spends per step what the job's stages measured. The cells validated differ in when the stages compute at
once (a link's latency spreads them out), which is what the sharing model is tested on.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Callable, Optional

from pipedni.bench.__main__ import slug
from pipedni.bench.report import md_table
from pipedni.config import load_config
from pipedni.schedules import registry
from pipedni.schedules.streams import effective_microbatches, simulated_modes
from pipedni.sim.beside import trusted_run
from pipedni.sim.costs import PipelineCost, StageCost, activations_from_sent, from_profile
from pipedni.sim.pipeline import SimResult, simulate
from pipedni.sim.replay import shares_processors
from pipedni.transport.link import LinkSpec

CALIBRATION_ROUNDS = 8  # replays of the calibration job on shared cores (see the module's note)


def link_of(overrides: list[str]) -> LinkSpec:
    """The emulated link a bench run's ``--dist.link_*`` overrides set (the last one wins)."""
    values = {"link_latency_ms": 0.0, "link_bandwidth_mbps": 0.0}
    for item in overrides:
        key, _, value = item.removeprefix("--dist.").partition("=")
        if key in values:
            values[key] = float(value)
    return LinkSpec.from_config(values["link_latency_ms"], values["link_bandwidth_mbps"])


def costs_for(results: dict, row: dict, message_sec: float, receive_sec: float = 0.0) -> PipelineCost:
    """The profiled costs with the bytes this job's stages sent per batch (see
    ``activations_from_sent``) and each message's cost to its sender and its receiver."""
    m = effective_microbatches(row["mode"], row["microbatches"])
    base = from_profile(results["profile"], message_sec=message_sec, together=True, microbatches=m)
    sent = [s["bytes_sent_per_step"] for s in row["stages"]]
    activation = activations_from_sent(sent)
    predicts = registry.mode(row["mode"])[0].synthetic_gradients  # only they run a predictor (its profiled cost)
    stages = [StageCost(s.forward_sec, s.backward_sec, s.optimizer_sec, s.predictor_sec if predicts else 0.0,
                        activation[i], activation[i - 1] if i > 0 else 0.0) for i, s in enumerate(base.stages)]
    return PipelineCost(tuple(stages), message_sec, receive_sec)


def _scaled(costs: PipelineCost, scales: list[float]) -> PipelineCost:
    stages = [StageCost(s.forward_sec * k, s.backward_sec * k, s.optimizer_sec * k, s.predictor_sec * k,
                        s.activation_bytes, s.gradient_bytes) for s, k in zip(costs.stages, scales)]
    return dataclasses.replace(costs, stages=tuple(stages))


def busy_per_step(row: dict, batch_size: int) -> list[float]:
    """Each stage's measured compute seconds per step in the bench job ``row``."""
    step_sec = batch_size / row["samples_per_sec"]["median"]
    return [stage["busy_fraction"] * step_sec for stage in row["stages"]]


def calibrated(costs: PipelineCost, row: dict, batch_size: int,
               replay_job: Optional[Callable[[PipelineCost], SimResult]] = None) -> PipelineCost:
    """``costs`` with each stage's compute scaled to what the measured job ``row`` spent per step
    (see [Note: calibrating on real runs]); ``replay_job`` (that job on shared cores) refines the
    scales until its replay spends the same per step."""
    measured = busy_per_step(row, batch_size)
    costs = _scaled(costs, [b / s.step_sec if s.step_sec > 0 else 1.0 for b, s in zip(measured, costs.stages)])
    for _ in range(CALIBRATION_ROUNDS if replay_job is not None else 0):
        sim = replay_job(costs)
        spent = [fraction * sim.step_sec for fraction in sim.busy_fraction]
        costs = _scaled(costs, [b / x if x > 0 else 1.0 for b, x in zip(measured, spent)])
    return costs


def _first_run(bench_dir: Path, label: str) -> Path:
    """The run directory of a bench job's first repeat (in a cell of an interleaved grid, its
    first round's: [Note: interleaved cells] in pipedni/bench/grid.py)."""
    path = bench_dir / "runs" / slug(label) / "r0"
    return path if path.exists() else bench_dir / "round0" / "runs" / slug(label) / "r0"


# Both read files of a finished run: cached, as --message-ms fit replays every job a dozen times.
@functools.lru_cache(maxsize=None)
def trusted(bench_dir: Optional[Path], label: str, warmup: int) -> bool:
    """Whether a dni job's predictors were trusted on most of its timed steps (``sg_untrusted``
    in its first run's metrics; trusted when there are none to read)."""
    return bench_dir is None or trusted_run(_first_run(bench_dir, label) / "metrics", warmup)


@functools.lru_cache(maxsize=None)
def clips(bench_dir: Optional[Path], label: str) -> bool:
    """Whether a job clipped its gradients (its run's ``optim.grad_clip``): a locked plan then
    all-reduces the whole model's norm every step (``ALL_REDUCE``), a barrier the replay keeps."""
    path = None if bench_dir is None else _first_run(bench_dir, label) / "config.yaml"
    return path is not None and path.is_file() and load_config(path, []).optim.grad_clip > 0


def calibration_job(calibration: dict, row: dict, calibration_dir: Optional[Path], cores: int,
                    receive_sec: float = 0.0) -> Optional[Callable[[PipelineCost], SimResult]]:
    """The calibration job ``row`` replayed on ``cores`` shared cores, as a function of its costs;
    None when every stage has a core of its own and nothing else runs on it (then one scaling
    is exact)."""
    if not shares_processors(len(row["stages"]), cores, receive_sec):
        return None
    settings = calibration["settings"]
    link = link_of(calibration.get("overrides", []))
    trust = trusted(calibration_dir, row["label"], settings["warmup"])
    reduce_norm = clips(calibration_dir, row["label"])
    return lambda costs: simulate(row["mode"], costs, row["microbatches"], settings["steps"], link,
                                  calibration["batch_size"], settings["warmup"], reduce_norm=reduce_norm,
                                  record=False, trusted=trust, cores=cores)


def overheads(profiled: PipelineCost, row: dict, batch_size: int,
              replay_job: Optional[Callable[[PipelineCost], SimResult]]) -> list[float]:
    """Each stage's compute inside the engine over its ``profiled`` compute, in the measured
    calibration job ``row`` (see [Note: calibrating on real runs])."""
    fitted = calibrated(profiled, row, batch_size, replay_job)
    return [f.step_sec / p.step_sec if p.step_sec > 0 else 1.0 for f, p in zip(fitted.stages, profiled.stages)]


def machine_cores(results: dict) -> int:
    """The cores of the machine a bench run was measured on (0, a processor per stage, if unrecorded)."""
    return int(results.get("machine", {}).get("cores") or 0)


def compare(results: dict, message_sec: float = 0.0, calibration: Optional[dict] = None,
            bench_dir: Optional[Path] = None, cores: Optional[int] = None,
            calibration_dir: Optional[Path] = None, receive_sec: float = 0.0, speed: str = "calibration") -> list[dict]:
    """One entry per simulated job: measured and simulated samples/s (medians); with
    ``calibration`` (another run's results, from ``calibration_dir``), compute calibrated on its
    same job (``speed``: 'calibration', the compute measured there; 'cell', this cell's
    profile times the engine's overhead there); dni jobs whose predictors were mostly
    untrusted (read from ``bench_dir``'s runs) replay the fallback; ``cores`` shared by the
    stages (default: the measured machine's);
    ``message_sec`` and ``receive_sec``: what each message costs its sender and its receiver."""
    link = link_of(results.get("overrides", []))
    settings = results["settings"]
    cores = machine_cores(results) if cores is None else cores
    reference = {row["label"]: row for row in (calibration or {}).get("throughput", [])}
    out = []
    for row in results["throughput"]:
        if row["mode"] not in simulated_modes() or (calibration is not None and row["label"] not in reference):
            continue
        costs = costs_for(results, row, message_sec, receive_sec)
        if calibration is not None:  # see [Note: calibrating on real runs]
            ref, batch_size = reference[row["label"]], calibration["batch_size"]
            replay_job = calibration_job(calibration, ref, calibration_dir, cores, receive_sec)
            if speed == "cell":
                profiled = costs_for(calibration, ref, message_sec, receive_sec)
                costs = _scaled(costs, overheads(profiled, ref, batch_size, replay_job))
            else:
                costs = calibrated(costs, ref, batch_size, replay_job)
        trust = trusted(bench_dir, row["label"], settings["warmup"])
        sim = simulate(row["mode"], costs, row["microbatches"], settings["steps"], link, results["batch_size"],
                       settings["warmup"], reduce_norm=clips(bench_dir, row["label"]), record=False, trusted=trust,
                       cores=cores)
        measured = row["samples_per_sec"]["median"]
        out.append({"label": row["label"], "mode": row["mode"], "latency_ms": link.latency_sec * 1e3,
                    "bandwidth_mbps": link.bytes_per_sec * 8 / 1e6, "measured": measured,
                    "measured_min": row["samples_per_sec"]["min"], "measured_max": row["samples_per_sec"]["max"],
                    "simulated": sim.samples_per_sec, "error": sim.samples_per_sec / measured - 1,
                    "trusted": trust})
    return out


WITHIN = 0.10  # the target: a job's simulated samples/s within 10% of its measured


def within(error: float) -> bool:
    """Whether a job's error (simulated over measured samples/s, minus 1) meets the target."""
    return abs(error) <= WITHIN


def inside_rounds(entry: dict) -> bool:
    """Whether the simulated samples/s lies between the least and the most the job's own repeats
    (an interleaved grid's rounds) measured: a value a rerun of the job could have measured."""
    return entry["measured_min"] <= entry["simulated"] <= entry["measured_max"]


def by_mode(entries: list[dict]) -> str:
    """Each mode's jobs within 10% and its median error (signed: a mode the replay gets fast or
    slow throughout shows here, where one noisy job does not)."""
    errors: dict[str, list[float]] = {}
    for e in entries:
        errors.setdefault(e["mode"], []).append(e["error"])
    return "; ".join(f"{mode} {sum(map(within, errs))}/{len(errs)}, median {statistics.median(errs):+.1%}"
                     for mode, errs in errors.items())


def table(entries: list[dict]) -> str:
    """The entries as a markdown table, with a summary: how many are within 10%, how many of the
    others the job's own repeats bracket (a miss no larger than the measurement's own spread),
    and each mode's count and median error."""
    rows = [[f"{e['latency_ms']:g} ms", "unlimited" if e["bandwidth_mbps"] == 0 else f"{e['bandwidth_mbps']:g} Mbit/s",
             e["label"] + ("" if e.get("trusted", True) else " (untrusted)"),
             f"{e['measured']:.0f} ({e['measured_min']:.0f}-{e['measured_max']:.0f})",
             f"{e['measured_max'] / e['measured_min'] - 1:.0%}" if e["measured_min"] > 0 else "-",
             f"{e['simulated']:.0f}", f"{e['error']:+.1%}"]
            for e in entries]
    errors = [abs(e["error"]) for e in entries]
    misses = [e for e in entries if not within(e["error"])]
    summary = (f"\n\n{len(entries)} jobs: median |error| {statistics.median(errors):.1%}, largest {max(errors):.1%}; "
               f"{len(entries) - len(misses)} within {WITHIN:.0%}; of the other {len(misses)}, "
               f"{sum(map(inside_rounds, misses))} inside the range their own repeats measured.\n"
               f"By mode (within {WITHIN:.0%}, median error): {by_mode(entries)}.") if entries else ""
    return md_table(["one-way latency", "bandwidth", "job", "measured samples/s (min-max)", "repeats differ",
                     "simulated", "error"], rows) + summary


MESSAGE_MS_CANDIDATES = [0.25 * k for k in range(1, 13)]  # what ``--message-ms fit`` tries: 0.25 to 3 ms
RECEIVE_MS_CANDIDATES = [0.0, 0.25, 0.5, 1.0, 1.5, 2.0]  # what ``--receive-ms fit`` tries


def fit_message_costs(calibration: dict, calibration_dir: Optional[Path], cores: Optional[int],
                      message_sec: float = math.nan, receive_sec: float = 0.0) -> tuple[float, float, float]:
    """The sender's and the receiver's cost per message (each the value given, or where it is
    NaN the candidate of ``MESSAGE_MS_CANDIDATES`` or ``RECEIVE_MS_CANDIDATES``) whose replay of
    the calibration cell, calibrated on itself, has the smallest median error there; and that
    error. The compute is fitted to each job's busy time, so what is left of a job's step is
    the messages' cost: on a locked stage's path, and in the processor a busy stage shares."""
    senders = [ms / 1e3 for ms in MESSAGE_MS_CANDIDATES] if math.isnan(message_sec) else [message_sec]
    receivers = [ms / 1e3 for ms in RECEIVE_MS_CANDIDATES] if math.isnan(receive_sec) else [receive_sec]
    best = (math.inf, 0.0, 0.0)
    for send in senders:
        for receive in receivers:
            entries = compare(calibration, send, calibration, calibration_dir, cores, calibration_dir, receive)
            best = min(best, (statistics.median(abs(e["error"]) for e in entries), send, receive))
    return best[1], best[2], best[0]


def _milliseconds(text: str) -> Optional[float]:
    """``--message-ms`` or ``--receive-ms``: 'fit' (NaN), or milliseconds >= 0 (None if it is neither)."""
    if text == "fit":
        return math.nan
    try:
        value = float(text)
    except ValueError:
        return None
    return value / 1e3 if value >= 0 else None


def _read(directory: str) -> Optional[dict]:
    path = Path(directory) / "results.json"
    if not path.is_file():
        print(f"error: {path} does not exist; give directories a bench run wrote", file=sys.stderr)
        return None
    return json.loads(path.read_text())


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipedni.sim.validate", description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="+", help="directories holding a bench results.json (e.g. bench/grid/lat10_bw0)")
    p.add_argument("--message-ms", default="0", help="the sender's CPU time per message, default 0; 'fit': the "
                   "value that replays the --calibrate cell best")
    p.add_argument("--receive-ms", default="0", help="the receiving side's CPU time per message, which it "
                   "shares with its stage's compute, default 0; 'fit' as --message-ms (both: fitted together)")
    p.add_argument("--calibrate", help="a bench directory whose jobs' measured compute sets the costs (see "
                   "[Note: calibrating on real runs]), e.g. the grid's cell without emulation")
    p.add_argument("--speed", choices=("calibration", "cell"), default="calibration",
                   help="with --calibrate: the machine's speed in every cell as in the calibration cell (default), "
                   "or from each cell's own profile (see [Note: calibrating on real runs])")
    p.add_argument("--cores", type=int, help="cores the stages share (default: the measured machine's, from "
                   "results.json; 0: a processor per stage)")
    p.add_argument("--json", help="also write the entries to this file")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.cores is not None and args.cores < 0:
        print(f"error: --cores = {args.cores}; give 0 (a processor per stage) or more", file=sys.stderr)
        return 2
    message_sec, receive_sec = _milliseconds(args.message_ms), _milliseconds(args.receive_ms)
    for flag, text, value in (("--message-ms", args.message_ms, message_sec),
                              ("--receive-ms", args.receive_ms, receive_sec)):
        if value is None or (math.isnan(value) and not args.calibrate):
            print(f"error: {flag} = {text!r}; give milliseconds >= 0, or 'fit' with --calibrate", file=sys.stderr)
            return 2
    calibration = _read(args.calibrate) if args.calibrate else None
    calibration_dir = Path(args.calibrate) if args.calibrate else None
    if args.calibrate and calibration is None:
        return 2
    if math.isnan(message_sec) or math.isnan(receive_sec):
        message_sec, receive_sec, error = fit_message_costs(calibration, calibration_dir, args.cores,
                                                            message_sec, receive_sec)
        print(f"message cost fitted on {args.calibrate}: {message_sec * 1e3:g} ms to send, {receive_sec * 1e3:g} ms "
              f"to receive (median |error| {error:.1%} there)")
    entries = []
    for directory in args.dirs:
        results = _read(directory)
        if results is None:
            return 2
        entries += compare(results, message_sec, calibration, Path(directory), args.cores, calibration_dir,
                           receive_sec, args.speed)
    print(table(entries))
    if args.json:
        Path(args.json).write_text(json.dumps(entries, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
