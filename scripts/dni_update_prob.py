"""Reproduce the DNI paper's update-probability experiment (arXiv 1608.05343, section 3.3): a
4-layer FCN where every layer, with its synthetic-gradient model, updates at each step only with
probability p, independently of the others (a stand-in for layers that run at their own pace).

One process, plain torch plus pipedni's data, model and predictor (``SyntheticGradientTrainer``,
the engine's): each step runs every layer forward on its true input; an active layer updates
from its synthetic gradient (DNI, cDNI: linear, label-conditioned for cDNI) or, for the backprop
reference, from the true gradient; a layer's predictor fits the gradient backpropagated through
the next layer (bootstrapped from that layer's own predictor, as in the engine) when the layer
is active. The paper reports DNI near 2% MNIST error at p = 0.2 and cDNI at full performance
down to p = 0.05. Results append to OUT/update_prob.jsonl (a rerun skips what is done).

    python scripts/dni_update_prob.py --out results/unlock                         # Fashion-MNIST
    python scripts/dni_update_prob.py --out results/unlock --data mnist_5k --steps 1000 --batch-size 100
    python scripts/dni_update_prob.py --out results/unlock --data mnist_5k --steps 1000 --batch-size 100 \
        --probs 0.5 0.2 --equal-updates --tag=-equal                               # as many updates as at p = 1
    python scripts/dni_update_prob.py --out results/unlock --report [--data mnist_5k]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dni_table1 import _cell, _read
from pipedni.config import load_config
from pipedni.data import eval_batches, load_datasets, train_batches
from pipedni.dni.predictors import SyntheticGradientTrainer
from pipedni.models import build_model
from pipedni.schedules import registry
from pipedni.stage import num_correct

METHODS = ("backprop", "dni", "cdni")


def run_one(job: tuple[dict, str, float, int]) -> dict:
    """One training run; returns its row."""
    a, method, p, seed = job
    torch.set_num_threads(1)
    cfg = load_config(None, [f"--data.name={a['data']}", f"--data.root={a['data_root']}", f"--run.seed={seed}",
                             "--model.name=mlp", "--model.depth=3", "--model.width=256", "--model.batchnorm=true",
                             "--dni.kind=linear", f"--dni.lr={a['sg_lr']}", "--dni.min_cosine=0",
                             *registry.mode(method)[1].overrides])
    train, test = load_datasets(cfg.data, seed)
    layers = list(build_model(cfg.model, tuple(train.inputs.shape[1:]), train.num_classes, seed))
    optims = [torch.optim.Adam(layer.parameters(), lr=a["lr"]) for layer in layers]
    sgs = [SyntheticGradientTrainer((256,), train.num_classes, cfg.dni, torch.device("cpu"), a["batch_size"])
           for _ in layers[:-1]]
    coin = random.Random(seed)
    start = time.perf_counter()
    steps = round(a["steps"] / p) if a["equal_updates"] else a["steps"]
    for _, x, y in train_batches(train, a["batch_size"], seed, steps):
        active = [coin.random() < p for _ in layers]
        step_fn = _backprop_step if method == "backprop" else _dni_step
        step_fn(layers, sgs, x, y, active, cfg.dni.condition_on_labels)
        for layer_optim, on in zip(optims, active):
            if on:
                layer_optim.step()
            layer_optim.zero_grad(set_to_none=True)
    wall = time.perf_counter() - start
    model = torch.nn.Sequential(*layers).eval()
    with torch.no_grad():
        correct = sum(num_correct(model(xb), yb) for xb, yb in eval_batches(test, 1000))
    return {"data": a["data"], "method": method + a["tag"], "p": p, "seed": seed, "steps": steps,
            "test_error_pct": 100 * (1 - correct / len(test)), "wall_time_sec": wall}


def _backprop_step(layers, sgs, x, y, active, conditioned) -> None:
    """The true gradient of every layer; only the active ones apply it (the caller steps them)."""
    F.cross_entropy(torch.nn.Sequential(*layers)(x), y).backward()


def _dni_step(layers, sgs, x, y, active, conditioned) -> None:
    """Every layer forward on its true input; each gets its predictor's gradient (the last, the
    loss's); an active layer's predictor fits the gradient that came back through the next layer."""
    h = x
    for i, layer in enumerate(layers):
        x_in = h.detach().requires_grad_(i > 0)
        out = layer(x_in)
        labels = y if conditioned else None
        if i == len(layers) - 1:
            F.cross_entropy(out, y).backward()
        else:
            out.backward(sgs[i].predict(out.detach(), labels))
        if i > 0 and active[i - 1]:  # the gradient of layer i-1's output: its predictor's target
            sgs[i - 1].fit(h, labels, x_in.grad)
        h = out.detach()


def sweep(args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "update_prob.jsonl"
    done = {(r["data"], r["method"], r["p"], r["seed"]) for r in _read(log)}
    settings = {"data": args.data, "data_root": args.data_root, "steps": args.steps, "batch_size": args.batch_size,
                "lr": args.lr, "sg_lr": args.sg_lr, "equal_updates": args.equal_updates, "tag": args.tag}
    jobs = [(settings, m, p, s) for s in args.seeds for p in args.probs for m in args.methods
            if (args.data, m + args.tag, p, s) not in done]
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:  # one thread each
        for row in pool.imap_unordered(run_one, jobs):
            with log.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{row['data']} {row['method']:8s} p={row['p']:<5} seed {row['seed']}: "
                  f"test error {row['test_error_pct']:.2f}% ({row['wall_time_sec']:.0f}s)", flush=True)


def report(args: argparse.Namespace) -> str:
    rows = [r for r in _read(args.out / "update_prob.jsonl") if r["data"] == args.data]
    probs = sorted({r["p"] for r in rows}, reverse=True)
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"Test error (%) on {args.data}, 4-layer FCN, each layer updating with probability p; mean ± "
             f"standard deviation over seeds {seeds} (-equal: steps / p steps, as many updates per layer as "
             "at p = 1):", "",
             "| method | " + " | ".join(f"p = {p}" for p in probs) + " |", "| --- |" + " --- |" * len(probs)]
    for method in sorted({r["method"] for r in rows}, key=lambda m: (m.split("-")[0] != "backprop", m)):
        cells = [_cell([r for r in rows if r["method"] == method and r["p"] == p], "test_error_pct", ".2f")
                 for p in probs]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", default="fashion_mnist")
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--probs", type=float, nargs="+", default=[1.0, 0.5, 0.2, 0.1, 0.05])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--sg-lr", type=float, default=3e-4)
    parser.add_argument("--equal-updates", action="store_true",
                        help="train steps / p steps, so each layer makes as many updates as at p = 1")
    parser.add_argument("--tag", default="", help="suffix naming the methods in results, e.g. -equal")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    parser.add_argument("--report", action="store_true", help="print the markdown table of OUT and exit")
    args = parser.parse_args()
    if args.report:
        sys.stdout.write(report(args))
    else:
        sweep(args)


if __name__ == "__main__":
    main()
