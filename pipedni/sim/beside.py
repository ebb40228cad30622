"""``python -m pipedni.sim.beside RUN_DIR``: a run's measured timeline drawn above the simulator's.

The run must have written ``timeline.json`` (``run.timeline_steps``). The simulator replays the
run's schedule, microbatch count and link (from its ``config.yaml``) with each stage's costs
taken from the recorded steps themselves (its forward, backward, optimizer and predictor time
per step, and its mean time per send), and the bytes from its metrics; the picture puts the
two timelines on one time scale, so a difference is the simulator missing something the run
did (a wait, an overhead) rather than a difference in costs. Writes ``timeline_beside.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Optional

from pipedni.config import Config, load_config
from pipedni.errors import USER_ERRORS, ConfigError
from pipedni.metrics.timeline import Event, draw
from pipedni.schedules import registry
from pipedni.sim.costs import PipelineCost, StageCost, activations_from_sent
from pipedni.sim.pipeline import SimResult, simulate
from pipedni.transport.link import LinkSpec

PARTS = {"forward": "forward_sec", "backward": "backward_sec", "optimizer": "optimizer_sec", "predictor": "predictor_sec"}


def read_trace(run_dir: Path) -> list[list[Event]]:
    """The per-stage events of ``timeline.json``, in seconds."""
    path = run_dir / "timeline.json"
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; rerun with --run.timeline_steps=3 (or more)")
    rows: dict[int, list[Event]] = defaultdict(list)
    for e in json.loads(path.read_text())["traceEvents"]:
        if e["ph"] == "X":
            rows[e["tid"]].append(Event(e["name"], e["cat"], e["ts"] / 1e6, e["dur"] / 1e6, e["args"]["step"]))
    return [rows[i] for i in range(max(rows) + 1)] if rows else []


def costs_from(measured: list[list[Event]], bytes_per_step: list[float]) -> PipelineCost:
    """Each stage's compute per step from its recorded calls; the send time per message."""
    steps = len({e.step for events in measured for e in events})
    activation = activations_from_sent(bytes_per_step)
    stages, sends = [], []
    for i, events in enumerate(measured):
        spent = defaultdict(float)
        for e in events:
            spent[e.category] += e.duration / steps
        sends += [e.duration for e in events if e.category == "send"]
        stages.append(StageCost(**{key: spent[part] for part, key in PARTS.items()},
                                activation_bytes=activation[i], gradient_bytes=activation[i - 1] if i else 0.0))
    return PipelineCost(tuple(stages), statistics.mean(sends) if sends else 0.0)


def bytes_sent(run_dir: Path, num_stages: int) -> list[float]:
    """Each stage's mean bytes sent per training step, from its metrics."""
    out = []
    for i in range(num_stages):
        lines = (run_dir / "metrics" / f"stage{i}.jsonl").read_text().splitlines()
        records = [r for r in map(json.loads, lines) if "step" in r and "bytes_sent" in r]
        out.append(statistics.mean(r["bytes_sent"] for r in records[1:] or records))
    return out


def trusted_run(metrics_dir: Path, from_step: int = 0) -> bool:
    """Whether a run's dni predictors were trusted on most of its steps from ``from_step``
    (``sg_untrusted`` in its metrics; trusted when there are none to read)."""
    flags = []
    for path in metrics_dir.glob("stage*.jsonl"):
        records = [json.loads(line) for line in path.read_text().splitlines()]
        flags += [r["sg_untrusted"] for r in records if "sg_untrusted" in r and r.get("step", -1) >= from_step]
    return not flags or sum(flags) < len(flags) / 2


def replay_run(cfg: Config, measured: list[list[Event]], costs: PipelineCost,
               trusted: bool = True) -> tuple[SimResult, int, int]:
    """The run's schedule simulated over its recorded steps (``trusted``: its dni predictors);
    returns it with (first step, count)."""
    recorded = sorted({e.step for events in measured for e in events})
    first, count = recorded[0], len(recorded)
    schedule = cfg.train.schedule
    m = registry.get(schedule).microbatches(cfg)
    link = LinkSpec.from_config(cfg.dist.link_latency_ms, cfg.dist.link_bandwidth_mbps)
    result = simulate(schedule, costs, m, first + count + 1, link, cfg.data.batch_size, max(first, 1),
                      cfg.train.boundaries, cfg.delayed.delay, cfg.dni.max_staleness,
                      reduce_norm=cfg.optim.grad_clip > 0, trusted=trusted,
                      recompute=not cfg.delayed.weight_stashing)
    return result, first, count


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipedni.sim.beside", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, help="picture to write (default RUN_DIR/timeline_beside.png)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.run_dir / "config.yaml", [])
        measured = read_trace(args.run_dir)
        costs = costs_from(measured, bytes_sent(args.run_dir, len(measured)))
        result, first, count = replay_run(cfg, measured, costs, trusted_run(args.run_dir / "metrics"))
    except (*USER_ERRORS, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    span = [max(e.start + e.duration for e in ev) - min(e.start for e in ev) for ev in measured if ev]
    simulated = result.window(first, count)
    sim_span = [max(e.start + e.duration for e in ev) - min(e.start for e in ev) for ev in simulated if ev]
    print(f"steps {first}-{first + count - 1}: measured {max(span) * 1e3:.1f} ms, simulated {max(sim_span) * 1e3:.1f} ms "
          f"({max(sim_span) / max(span) - 1:+.1%})")
    out = args.out or args.run_dir / "timeline_beside.png"
    title = f"{cfg.train.schedule}, {len(measured)} stages"
    if draw(measured, out, f"measured: {title}", simulated, "simulated from the same steps' costs"):
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
