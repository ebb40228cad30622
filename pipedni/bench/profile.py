"""Each stage timed on its own: forward+backward of one batch sets the ideal pipeline limit.

N perfectly overlapped stages finish one batch per ``max_i t_i`` seconds, where ``t_i`` is stage
i's forward+backward time for a whole batch with no communication and no waiting: the ideal
pipeline limit is ``batch_size / max_i t_i`` samples/s. Stages are timed through ``Stage``, the
code every schedule runs, on real batches; the optimizer step and, for a non-last stage, the
DNI predictor's predict+fit are timed apart (work a schedule adds per batch).

Two ways to run it (the benchmark does both, once per repeat):
- alone: one process times every stage in turn, the only busy core;
- ``--only i --start-at T``: one process per stage, all timing at once from wall time T, so
  each stage is timed while the others load the machine too (shared caches, memory bandwidth,
  clock boost), as in a real pipeline.

``python -m pipedni.bench.profile CONFIG --stages N [--only i --start-at T] [--section.key=value ...]``
prints JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Optional

import torch

from pipedni import data as datasets
from pipedni.bench.plan import parse_counts
from pipedni.config import Config, load_config
from pipedni.crossing import StageShapes, TensorSpec
from pipedni.dni.predictors import SyntheticGradientTrainer, labels_per_sample
from pipedni.dni.sizing import choose, median_sec
from pipedni.engine import one_input_shape
from pipedni.errors import USER_ERRORS
from pipedni.models import build_model
from pipedni.runtime import choose_device
from pipedni.schedules.worker import grad_norm
from pipedni.split.partition import partition
from pipedni.stage import Stage

NUM_BATCHES = 4  # distinct batches cycled through, so caches hold no more than in training


def _sync() -> None:
    """On a GPU, a timer reads after the kernels it times have finished."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


class _Timed:
    """One stage with its batches, the gradients arriving at its output, and its predictor."""

    def __init__(self, cfg: Config, module, index: int, num_stages: int, xs: list, ys: list, num_classes: int,
                 device: torch.device):
        self.stage = Stage(module, index, num_stages, device, cfg.optim, 1000)
        self.xs, self.ys = [x.to(device) for x in xs], [y.to(device) for y in ys]
        with torch.no_grad():
            self.outs = [module(x) for x in self.xs]
        self.grads = [torch.randn_like(out) / out.shape[0] for out in self.outs]
        self.sg: Optional[SyntheticGradientTrainer] = None
        if not self.stage.is_last:  # the predictor a dni run would build here (see dni/sizing.py)
            shape, dni = tuple(self.outs[0].shape[1:]), cfg.dni.for_boundary(index)
            if dni.kind == "auto":
                shapes = StageShapes(TensorSpec(tuple(self.xs[0].shape), self.xs[0].dtype),
                                     TensorSpec(tuple(self.outs[0].shape), self.outs[0].dtype))
                self.sg, _ = choose(self.stage, shapes, shapes.output, dni, num_classes, cfg.data.batch_size,
                                    cfg.dni.microbatches, tuple(self.ys[0].shape[1:]))
            else:
                self.sg = SyntheticGradientTrainer(shape, num_classes, dni, self.stage.device,
                                                   cfg.data.batch_size, labels_per_sample(shape))

    def _forward_backward(self, i: int) -> None:
        k, stage = i % len(self.xs), self.stage
        stage.forward(0, self.xs[k], self.ys[k] if stage.is_last else None, 1.0)
        stage.backward(0, None if stage.is_last else self.grads[k])

    def fwd_bwd(self, i: int) -> None:
        self._forward_backward(i)
        self.stage.module.zero_grad(set_to_none=True)  # as Stage.step would

    def optimizer_sec(self, iters: int) -> float:
        """Median seconds of one update alone, its gradients made (untimed) just before. (The
        difference of two medians, a step's and a forward+backward's, was off by up to 10 ms.)"""
        samples = []
        for i in range(iters + 2):  # the first two are warm-up
            self._forward_backward(i)
            _sync()
            start = time.perf_counter()
            self.stage.step(grad_norm(self.stage))
            _sync()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples[2:])

    def split_sec(self, m: int, iters: int) -> dict[str, float]:
        """Median forward and backward seconds of one batch run as ``m`` microbatches, one after
        the other (what a microbatched schedule computes per batch; small microbatches cost more
        per sample on a CPU)."""
        forwards, backwards = [], []
        for i in range(iters + 2):  # the first two are warm-up
            k, stage = i % len(self.xs), self.stage
            pieces = zip(*(torch.tensor_split(t, m) for t in (self.xs[k], self.ys[k], self.grads[k])))
            forward = backward = 0.0
            for mb, (x, y, g) in enumerate(pieces):
                _sync()
                start = time.perf_counter()
                stage.forward(mb, x, y if stage.is_last else None, 1.0 / m)
                _sync()
                middle = time.perf_counter()
                stage.backward(mb, None if stage.is_last else g)
                _sync()
                forward, backward = forward + middle - start, backward + time.perf_counter() - middle
            stage.module.zero_grad(set_to_none=True)
            if i >= 2:
                forwards.append(forward)
                backwards.append(backward)
        return {"forward_sec": statistics.median(forwards), "backward_sec": statistics.median(backwards)}

    def predictor(self, i: int) -> None:
        k = i % len(self.xs)
        labels = self.ys[k] if self.sg.cfg.condition_on_labels else None
        self.sg.predict(self.outs[k], labels)
        self.sg.fit(self.outs[k], labels, self.grads[k])


def _batches(cfg: Config) -> tuple[list, list, int, tuple]:
    train_set, _ = datasets.load_datasets(cfg.data, cfg.run.seed)
    batches = list(datasets.train_batches(train_set, cfg.data.batch_size, cfg.run.seed, NUM_BATCHES))
    return [b[1] for b in batches], [b[2] for b in batches], train_set.num_classes, one_input_shape(cfg, train_set)


def profile_stages(cfg: Config, num_stages: int, iters: int = 5, only: Optional[int] = None,
                   start_at: float = 0.0, seconds: float = 0.0, microbatches: tuple[int, ...] = ()) -> dict:
    """Per stage: median forward+backward, optimizer-step and predictor seconds for one batch,
    and forward and backward apart for the batch run as each of ``microbatches`` microbatches
    (``microbatched``; what ``pipedni.sim`` replays)."""
    xs, ys, num_classes, sample_shape = _batches(cfg)
    device = choose_device(cfg, local_rank=0, local_world_size=1)[0]  # dist.device, as rank 0 would
    model = build_model(cfg.model, sample_shape, num_classes, cfg.run.seed)
    modules = partition(model, num_stages, cfg.partition.balance if num_stages > 1 else None, cfg.partition.method)
    results = []
    for index, module in enumerate(modules):
        timed = _Timed(cfg, module, index, num_stages, xs, ys, num_classes, device)
        xs = timed.outs
        if only is not None and index != only:
            continue
        time.sleep(max(0.0, start_at - time.time()))
        fwd_bwd = median_sec(timed.fwd_bwd, iters, warmup=2, seconds=seconds)
        result = {"stage_index": index, "num_params": timed.stage.num_params, "fwd_bwd_sec": fwd_bwd}
        if only is None:
            result["optimizer_sec"] = timed.optimizer_sec(iters)
            result["predictor_sec"] = median_sec(timed.predictor, iters, warmup=2) if timed.sg else 0.0
            result["predictor"] = timed.sg.cfg.kind if timed.sg else None
            result["microbatched"] = {str(m): timed.split_sec(m, iters) for m in microbatches}
        results.append(result)
    return {"device": str(device), "threads": torch.get_num_threads(), "batch_size": cfg.data.batch_size,
            "stages": results}


def limits(stages: list[dict], batch_size: int) -> dict:
    """The ideal pipeline limit (slowest stage) and all stages in series, in samples/s."""
    times = [s["fwd_bwd_sec"] for s in stages]
    return {"ideal_samples_per_sec": batch_size / max(times), "serial_samples_per_sec": batch_size / sum(times)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipedni.bench.profile", description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--stages", type=int, required=True)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--only", type=int, help="time only this stage (one process per stage, at once)")
    parser.add_argument("--start-at", type=float, default=0.0, help="wall time (time.time()) to start timing")
    parser.add_argument("--seconds", type=float, default=0.0, help="keep timing at least this long")
    parser.add_argument("--microbatches", default="1", help="also time forward and backward apart with the "
                        "batch in each of these microbatch counts, default 1")
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, overrides)
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        counts = tuple(parse_counts(args.microbatches, "--microbatches"))
        print(json.dumps(profile_stages(cfg, args.stages, args.iters, args.only, args.start_at, args.seconds,
                                        counts)))
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
