"""``python -m pipedni.sim``: simulate a schedule's throughput from stage costs, without processes.

    python -m pipedni.sim --schedule 1f1b --stages 8 --microbatches 8 --steps 50 \\
        [--profile results.json | --forward-ms 10 --backward-ms 20 ...] \\
        [--latency-ms 10 --bandwidth-mbps 1000] [--batch-size 256] [--timeline out.png]
    python -m pipedni.sim --sweep --schedules 1f1b,dni,async --forward-ms 10 --backward-ms 20
    python -m pipedni.sim --schedule 1f1b --stages 4 --data-parallel 2 --grad-mb 100 --allreduce-gbps 100

Costs are per batch and per stage (``--profile``: measured by ``python -m pipedni.bench.profile``
or a bench ``results.json``); a sweep predicts identical stages, 4 to 64 of them by default.
``--data-parallel D`` predicts one of D replicas, each on 1/D of the batch, whose updates wait
for a ring all-reduce of their gradients (``sim.costs.replicated``); samples/s is the job's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import NoReturn, Optional

from pipedni.errors import USER_ERRORS, ConfigError
from pipedni.metrics.timeline import chrome_trace, draw
from pipedni.schedules.actions import DeadlockError
from pipedni.schedules.streams import DEFAULT_DELAY, DEFAULT_MAX_STALENESS, effective_microbatches, simulated_modes
from pipedni.sim.costs import PipelineCost, allreduce_sec, from_profile, profile_stages, replicated, uniform
from pipedni.sim.pipeline import SimResult, simulate
from pipedni.transport.link import LinkSpec

DEFAULT_BATCH_SIZE = 256


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line and exit code 2, as every pipedni command reports a user mistake."""
        print(f"error: {message} (see python -m pipedni.sim --help)", file=sys.stderr)
        sys.exit(2)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = _Parser(prog="python -m pipedni.sim", description=__doc__.splitlines()[0])
    p.add_argument("--schedule", default="1f1b", help=f"one of {', '.join(simulated_modes())} (default 1f1b)")
    p.add_argument("--stages", type=int, help="pipeline stages (default: the profile's, else 4)")
    p.add_argument("--microbatches", type=int, default=1, help="microbatches per batch (async runs 1)")
    p.add_argument("--steps", type=int, default=50, help="training steps simulated, default 50")
    p.add_argument("--warmup", type=int, default=1, help="untimed first steps, default 1 (as the engine)")
    p.add_argument("--batch-size", type=int, help=f"samples per batch (default: the profile's, else {DEFAULT_BATCH_SIZE})")
    p.add_argument("--profile", help="JSON of python -m pipedni.bench.profile, or a bench results.json")
    p.add_argument("--together", action="store_true", help="use the profile's times with every stage running at once")
    p.add_argument("--forward-ms", type=float, default=10.0, help="per stage, per batch (no --profile), default 10")
    p.add_argument("--backward-ms", type=float, default=20.0, help="per stage, per batch (no --profile), default 20")
    p.add_argument("--optimizer-ms", type=float, default=0.0, help="per stage, per update (no --profile)")
    p.add_argument("--predictor-ms", type=float, default=0.0, help="dni predict + fit, per batch (no --profile)")
    p.add_argument("--activation-bytes", type=float, help="payload at each boundary per batch (gradients the same)")
    p.add_argument("--message-ms", type=float, default=0.0, help="sender's CPU time per message, default 0")
    p.add_argument("--receive-ms", type=float, default=0.0, help="the receiving side's CPU time per message, "
                   "shared with its stage's compute, default 0")
    p.add_argument("--latency-ms", type=float, default=0.0, help="one way, per link, default 0")
    p.add_argument("--bandwidth-mbps", type=float, default=0.0, help="per link direction (0: unlimited)")
    p.add_argument("--cores", type=int, default=0, help="processors the stages share, as stage processes on one "
                   "machine do (default 0: one per stage, as on one device each)")
    p.add_argument("--boundaries", default="", help="mixed: one mode per boundary, e.g. locked,dni,async")
    p.add_argument("--delay", type=int, default=DEFAULT_DELAY, help="async: steps of delay per boundary")
    p.add_argument("--max-staleness", type=int, default=DEFAULT_MAX_STALENESS, help="dni: back-pressure bound")
    p.add_argument("--reduce-norm", action="store_true", help="locked: all-reduce the gradient norm each step")
    p.add_argument("--untrusted", action="store_true", help="dni: every predictor untrusted, so each dni stage "
                   "trains on the true gradient a step late (dni.fallback: delayed), as until its cosine passes")
    p.add_argument("--data-parallel", type=int, default=1, help="replicas of the pipeline (dist.data_parallel), "
                   "each on 1/D of the batch, default 1")
    p.add_argument("--grad-mb", type=float, help="with --data-parallel: each stage's gradients per update, MB "
                   "(default: the profile's num_params x 4 bytes, else 0)")
    p.add_argument("--allreduce-gbps", type=float, default=0.0, help="with --data-parallel: the replicas' "
                   "all-reduce bandwidth, Gbit/s per replica (default 0: unlimited)")
    p.add_argument("--allreduce-latency-ms", type=float, default=0.0, help="per all-reduce hop, default 0")
    p.add_argument("--timeline", help="write the timeline: .json (Chrome/Perfetto trace) or a picture (.png)")
    p.add_argument("--timeline-steps", type=int, default=3, help="steps drawn, after the untimed ones; default 3")
    p.add_argument("--sweep", action="store_true", help="a table over --sweep-stages for --schedules")
    p.add_argument("--sweep-stages", default="4,8,16,32,64", help="stage counts of the sweep")
    p.add_argument("--schedules", default="naive,gpipe,1f1b,dni,async", help="schedules of the sweep")
    return p.parse_args(argv)


def _numbers(args: argparse.Namespace) -> None:
    """No negative figure gets as far as a cost."""
    for name in ("forward_ms", "backward_ms", "optimizer_ms", "predictor_ms", "activation_bytes", "message_ms",
                 "receive_ms", "latency_ms", "bandwidth_mbps", "grad_mb", "allreduce_gbps", "allreduce_latency_ms"):
        value = getattr(args, name)
        if value is not None and not value >= 0:
            raise ConfigError(f"--{name.replace('_', '-')} = {value}; must be >= 0")
    if args.stages is not None and args.stages < 1:
        raise ConfigError(f"--stages = {args.stages}; must be >= 1")
    if args.data_parallel < 1:
        raise ConfigError(f"--data-parallel = {args.data_parallel}; must be >= 1 (1: one pipeline)")
    if args.cores < 0:
        raise ConfigError(f"--cores = {args.cores}; give 0 (a processor per stage) or more")
    if args.timeline_steps < 1:
        raise ConfigError(f"--timeline-steps = {args.timeline_steps}; must be >= 1")


def _read_profile(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"--profile {path}: cannot read it as JSON ({err})") from None


def costs_of(args: argparse.Namespace, num_stages: Optional[int]) -> PipelineCost:
    """The stages' costs: the profile's, or ``num_stages`` identical ones from the ``--*-ms`` flags."""
    message_sec = args.message_ms / 1e3
    if args.profile:
        m = effective_microbatches(args.schedule, args.microbatches)  # the profile may have timed this split
        costs = from_profile(_read_profile(args.profile), message_sec, args.together, args.activation_bytes, m)
        if num_stages is not None and num_stages != costs.num_stages:
            raise ConfigError(f"--stages = {num_stages} but the profile has {costs.num_stages} stages; drop --stages")
    else:
        costs = uniform(num_stages or 4, args.forward_ms / 1e3, args.backward_ms / 1e3, args.optimizer_ms / 1e3,
                        args.predictor_ms / 1e3, args.activation_bytes or 0.0, message_sec=message_sec)
    costs = dataclasses.replace(costs, receive_sec=args.receive_ms / 1e3)
    return costs if args.data_parallel == 1 else replicated(costs, args.data_parallel, _sync_sec(args, costs))


def _sync_sec(args: argparse.Namespace, costs: PipelineCost) -> list[float]:
    """Each stage's all-reduce of its gradients over the replicas, per update."""
    if args.grad_mb is not None:
        grad_bytes = [args.grad_mb * 1e6] * costs.num_stages
    elif args.profile:
        grad_bytes = [4.0 * entry.get("num_params", 0) for entry in profile_stages(_read_profile(args.profile))]
    else:
        grad_bytes = [0.0] * costs.num_stages
    return [allreduce_sec(b, args.data_parallel, args.allreduce_gbps, args.allreduce_latency_ms / 1e3)
            for b in grad_bytes]


def _batch_size(args: argparse.Namespace) -> int:
    if args.batch_size is not None:
        return args.batch_size
    if args.profile:
        return int(_read_profile(args.profile).get("batch_size", DEFAULT_BATCH_SIZE))
    return DEFAULT_BATCH_SIZE


def run_one(args: argparse.Namespace, costs: PipelineCost, schedule: str, record: bool) -> SimResult:
    link = LinkSpec.from_config(args.latency_ms, args.bandwidth_mbps)
    boundaries = [b.strip() for b in args.boundaries.split(",") if b.strip()]
    return simulate(schedule, costs, args.microbatches, args.steps, link, _batch_size(args), args.warmup,
                    boundaries, args.delay, args.max_staleness, args.reduce_norm, record, not args.untrusted,
                    args.cores)


def _write_timeline(result: SimResult, args: argparse.Namespace, num_stages: int) -> None:
    events = result.window(args.warmup, args.timeline_steps)
    path = Path(args.timeline)
    if path.suffix == ".json":
        path.write_text(json.dumps(chrome_trace(events)))
    else:
        draw(events, path, f"simulated {result.schedule}, N={num_stages}, M={result.num_microbatches}")
    print(f"timeline: {path}")


def single(args: argparse.Namespace) -> None:
    costs = costs_of(args, args.stages)
    result = run_one(args, costs, args.schedule, record=args.timeline is not None)
    link = LinkSpec.from_config(args.latency_ms, args.bandwidth_mbps)
    copies = f" x {args.data_parallel} replicas" if args.data_parallel > 1 else ""
    print(f"simulated {costs.num_stages} stages{copies}, {args.steps} steps ({args.warmup} untimed), batch "
          f"{_batch_size(args)}, links {link.describe()}" + (f", on {args.cores} shared cores" if args.cores else ""))
    print(result.describe())
    if args.timeline:
        _write_timeline(result, args, costs.num_stages)


def _counts(text: str) -> list[int]:
    try:
        counts = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise ConfigError(f"--sweep-stages {text!r}: give positive whole numbers separated by commas, e.g. 4,8,16")
    return counts


def sweep(args: argparse.Namespace) -> None:
    """samples/s (and mean busy fraction) per schedule and stage count, identical stages."""
    if args.profile:
        raise ConfigError("--sweep predicts identical stages from --forward-ms/--backward-ms...; drop --profile")
    counts, schedules = _counts(args.sweep_stages), [s.strip() for s in args.schedules.split(",") if s.strip()]
    print(f"samples/s (mean busy) for identical stages of {args.forward_ms:g} + {args.backward_ms:g} ms per batch, "
          f"M={args.microbatches}, batch {_batch_size(args)}")
    print("schedule".ljust(10) + "".join(f"N={n}".rjust(16) for n in counts))
    for schedule in schedules:
        cells = []
        for n in counts:
            r = run_one(args, costs_of(args, n), schedule, record=False)
            cells.append(f"{r.samples_per_sec:.1f} ({sum(r.busy_fraction) / n:.0%})".rjust(16))
        print(schedule.ljust(10) + "".join(cells))


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        _numbers(args)
        if args.sweep:
            sweep(args)
        else:
            single(args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except DeadlockError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
