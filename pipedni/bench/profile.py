"""Each stage timed alone: forward+backward of one batch, which sets the ideal pipeline limit.

N perfectly overlapped stages finish one batch per ``max_i t_i`` seconds, where ``t_i`` is stage
i's forward+backward time for a whole batch on its own (no communication, no waiting): the
ideal pipeline limit is ``batch_size / max_i t_i`` samples/s. The benchmark runs this in its own
process with the stages' thread count, once per repeat, interleaved with the jobs.

``python -m pipedni.bench.profile CONFIG --stages N [--section.key=value ...]`` prints JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from pipedni import data as datasets
from pipedni.config import Config, load_config
from pipedni.errors import USER_ERRORS
from pipedni.models import build_model
from pipedni.optim import build_optimizer
from pipedni.partition import num_params, partition
from pipedni.stage import loss_fn

WARMUP_ITERS = 2


def _time(fn, iters: int) -> float:
    """Median seconds of ``fn()`` over ``iters`` calls, after warm-up calls."""
    for _ in range(WARMUP_ITERS):
        fn()
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def profile_stages(cfg: Config, num_stages: int, iters: int = 5) -> dict:
    """Per stage: median forward+backward and optimizer-step seconds for one batch."""
    train_set, _ = datasets.load_datasets(cfg.data, cfg.run.seed)
    _, inputs, targets = next(datasets.train_batches(train_set, cfg.data.batch_size, cfg.run.seed, 1))
    model = build_model(cfg.model, tuple(train_set.inputs.shape[1:]), train_set.num_classes, cfg.run.seed)
    stages = partition(model, num_stages, cfg.partition.balance if num_stages > 1 else None, cfg.partition.method)
    results, x = [], inputs
    for index, module in enumerate(stages):
        is_last = index == num_stages - 1
        with torch.no_grad():
            out = module(x)
        grad = None if is_last else torch.randn_like(out) / out.shape[0]
        x_in = x

        def fwd_bwd():
            module.zero_grad(set_to_none=True)
            given = x_in if index == 0 else x_in.detach().requires_grad_(True)
            result = module(given)
            if is_last:
                loss_fn(result, targets).backward()
            else:
                result.backward(grad)

        optimizer = build_optimizer(module.parameters(), cfg.optim)
        fwd_bwd_sec = _time(fwd_bwd, iters)
        step_sec = _time(optimizer.step, iters) if num_params(module) else 0.0
        results.append({"stage_index": index, "num_params": num_params(module),
                        "fwd_bwd_sec": fwd_bwd_sec, "optimizer_sec": step_sec})
        x = out
    slowest = max(r["fwd_bwd_sec"] for r in results)
    return {"threads": torch.get_num_threads(), "batch_size": cfg.data.batch_size, "stages": results,
            "ideal_samples_per_sec": cfg.data.batch_size / slowest,
            "serial_samples_per_sec": cfg.data.batch_size / sum(r["fwd_bwd_sec"] for r in results)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipedni.bench.profile", description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--stages", type=int, required=True)
    parser.add_argument("--iters", type=int, default=5)
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, overrides)
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        print(json.dumps(profile_stages(cfg, args.stages, args.iters)))
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
