"""Where each mode wins past what this machine can run: the simulator at 2-64 stages.

Every stage costs what one stage of the benchmark MLP costs (the model grows with the stage
count: one device's worth of layers per stage), measured on this CPU by a bench run's profile
(``--profile``) and on an H200 (docs/benchmarks.md, GPU: forward+backward 0.9 ms, optimizer
0.55 ms, predictor 1.9 ms per batch of 256, the mean of its two stages). Each boundary carries
the MLP's 256 x 1024 float32 activation (1 MiB) forward and its gradient back. Links: none, a
datacentre link between nodes, a link between sites. The locked pipeline is GPipe or 1F1B at its best
microbatch count among 1, N and 2N (at most the batch); costs scale linearly with the
microbatch size, which flatters small microbatches (on both devices they cost more per sample):
the locked figures are an upper bound.

    python scripts/sim_predict.py --profile bench/grid_mlp/lat0_bw0/results.json --out docs/img
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from pipedni.schedules import registry
from pipedni.schedules.streams import DEFAULT_MAX_STALENESS
from pipedni.sim.costs import from_profile, uniform
from pipedni.sim.pipeline import simulate
from pipedni.transport.link import LinkSpec

STAGES = (2, 4, 8, 16, 32, 64)
LINKS = (("no link cost", 0.0, 0.0), ("1 ms, 10 Gbit/s", 1.0, 10_000.0), ("10 ms, 1 Gbit/s", 10.0, 1000.0),
         ("100 ms, 100 Mbit/s", 100.0, 100.0))
BATCH, ACTIVATION_BYTES = 256, 256 * 1024 * 4
H200 = {"forward_sec": 0.0003, "backward_sec": 0.0006, "optimizer_sec": 0.00055, "predictor_sec": 0.0019}
# The sender's time per message: on this CPU calibrated against the grid (--message-ms, 1 ms for a
# 1 MiB gloo message); on GPUs assumed 50 us (an NCCL send between GPUs of one node), not measured.
H200_MESSAGE_SEC = 50e-6
MODES = ("locked (best)", "dni", "async", "dni, max_staleness 8")  # the last: a tuned variant beside the default


def cpu_costs(profile_path: Path) -> dict:
    """The mean stage of a bench profile (M=1 split when timed, else 1:2), stages timed at once."""
    stages = from_profile(json.loads(profile_path.read_text()), together=True, microbatches=1).stages
    predictor = [s.predictor_sec for s in stages if s.predictor_sec > 0]
    return {"forward_sec": statistics.mean(s.forward_sec for s in stages),
            "backward_sec": statistics.mean(s.backward_sec for s in stages),
            "optimizer_sec": statistics.mean(s.optimizer_sec for s in stages),
            "predictor_sec": statistics.mean(predictor) if predictor else 0.0}


def best_locked(n: int, stage: dict, link: LinkSpec, message_sec: float, steps: int) -> tuple[float, str]:
    """The fastest of GPipe and 1F1B over the microbatch counts tried, and which it was."""
    costs = uniform(n, stage["forward_sec"], stage["backward_sec"], stage["optimizer_sec"], 0.0, ACTIVATION_BYTES,
                    message_sec=message_sec)
    results = [(simulate(schedule, costs, m, steps, link, BATCH, record=False).samples_per_sec, f"{schedule} M={m}")
               for schedule in ("gpipe", "1f1b") for m in sorted({1, n, 2 * n}) if m <= BATCH]
    return max(results)


def decoupled(schedule: str, n: int, stage: dict, link: LinkSpec, message_sec: float, steps: int,
              max_staleness: int = DEFAULT_MAX_STALENESS) -> float:
    predictor_sec = stage["predictor_sec"] if registry.get(schedule).synthetic_gradients else 0.0
    costs = uniform(n, stage["forward_sec"], stage["backward_sec"], stage["optimizer_sec"], predictor_sec,
                    ACTIVATION_BYTES, message_sec=message_sec)
    return simulate(schedule, costs, 1, steps, link, BATCH, warmup_steps=4, max_staleness=max_staleness,
                    record=False).samples_per_sec


def predict(stage: dict, message_sec: float, steps: int) -> list[dict]:
    rows = []
    for name, latency_ms, mbps in LINKS:
        link = LinkSpec.from_config(latency_ms, mbps)
        for n in STAGES:
            locked, m = best_locked(n, stage, link, message_sec, steps)
            rows.append({"link": name, "stages": n, "locked (best)": locked, "best": m,
                         "dni": decoupled("dni", n, stage, link, message_sec, steps),
                         "async": decoupled("async", n, stage, link, message_sec, steps),
                         "dni, max_staleness 8": decoupled("dni", n, stage, link, message_sec, steps, 8)})
    return rows


def markdown(device: str, stage: dict, rows: list[dict]) -> str:
    ms = {k: v * 1e3 for k, v in stage.items()}
    lines = [f"**{device}** (per stage and batch: forward {ms['forward_sec']:.2f} ms, backward "
             f"{ms['backward_sec']:.2f} ms, optimizer {ms['optimizer_sec']:.2f} ms, predictor "
             f"{ms['predictor_sec']:.2f} ms): samples/s, and each decoupled mode against the locked pipeline",
             "", "| link | stages | locked (best) | " + " | ".join(MODES[1:]) + " |", "|---" * (len(MODES) + 2) + "|"]
    for r in rows:
        base = r["locked (best)"]
        cells = " | ".join(f"{r[mode]:,.0f} ({r[mode] / base:.2f}x)" for mode in MODES[1:])
        lines.append(f"| {r['link']} | {r['stages']} | {base:,.0f} ({r['best']}) | {cells} |")
    return "\n".join(lines)


def plot(predictions: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(predictions), len(LINKS), figsize=(3.6 * len(LINKS), 3.2 * len(predictions)),
                             squeeze=False)
    for row, (device, rows) in zip(axes, predictions.items()):
        for ax, (name, _, _) in zip(row, LINKS):
            cells = [r for r in rows if r["link"] == name]
            for mode in MODES:
                ax.plot([r["stages"] for r in cells], [r[mode] for r in cells], marker="o", label=mode)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{device}: {name}", fontsize=9)
            ax.set_xlabel("stages")
        row[0].set_ylabel("samples/s (simulated)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", type=Path, required=True, help="a bench results.json measured on this machine")
    p.add_argument("--message-ms", type=float, default=1.0, help="the sender's CPU time per message on this "
                   "machine (default 1: calibrated against the link grid)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--out", type=Path, required=True, help="directory for sim_predict.png")
    args = p.parse_args()
    predictions = {"CPU (this machine)": predict(cpu_costs(args.profile), args.message_ms / 1e3, args.steps),
                   "H200": predict(H200, H200_MESSAGE_SEC, args.steps)}
    for device, rows in predictions.items():
        print(markdown(device, cpu_costs(args.profile) if device.startswith("CPU") else H200, rows) + "\n")
    args.out.mkdir(parents=True, exist_ok=True)
    plot(predictions, args.out / "sim_predict.png")
    print(f"wrote {args.out / 'sim_predict.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
