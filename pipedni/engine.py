"""Assembling this rank's stage from a config, and the training loop that drives it."""

from __future__ import annotations

import math
import time
import uuid
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from pipedni import data as datasets
from pipedni.checkpoint import Checkpointer
from pipedni.config import Config, save_config
from pipedni.console import make_console
from pipedni.decoupled import DNIWorker
from pipedni.errors import LaunchError, same_on_every_rank
from pipedni.memory import make_meter
from pipedni.metrics import MetricsWriter, StageTotals, build_summary, peak_memory_bytes, write_json_atomic
from pipedni.models import build_model
from pipedni.partition import describe, partition
from pipedni.peer import SCHEDULES as PEER_SCHEDULES, PeerWorker
from pipedni.runtime import Runtime
from pipedni.stage import Stage
from pipedni.telemetry import make_telemetry
from pipedni.transport import TensorSpec, Transport
from pipedni.worker import StageWorker


def total_steps(cfg: Config, num_train_samples: int) -> int:
    if cfg.train.steps > 0:
        return cfg.train.steps
    per_epoch = datasets.steps_per_epoch(num_train_samples, cfg.data.batch_size)
    return max(1, math.ceil(cfg.train.epochs * per_epoch))


def check_layout(cfg: Config, runtime: Runtime) -> None:
    """One process per stage: the schedule and the balance must fit the world size."""
    n = runtime.num_stages
    if cfg.train.schedule == "single" and n > 1:
        raise LaunchError(
            f"train.schedule = 'single' runs the whole model in one process but {n} were started; "
            "use --nproc_per_node=1, plain python, or a pipelined schedule (naive, gpipe, 1f1b, dni)"
        )
    schedule, m = cfg.train.schedule, cfg.train.microbatches
    if schedule in ("dni", *PEER_SCHEDULES) and n < 2:
        raise LaunchError(f"train.schedule = {schedule!r} needs at least 2 stages (processes); start more with torchrun")
    if schedule in PEER_SCHEDULES and cfg.data.batch_size % m:
        raise LaunchError(
            f"train.schedule = {schedule!r} gives torch equal microbatches but data.batch_size = "
            f"{cfg.data.batch_size} does not divide into train.microbatches = {m}; make it a multiple of {m}"
        )
    if schedule == "torch_1f1b" and m < n:
        raise LaunchError(
            f"train.schedule = 'torch_1f1b' needs train.microbatches >= stages, got {m} < {n}; "
            f"use --train.microbatches={n} or more"
        )
    balance = cfg.partition.balance
    if balance is not None and n > 1 and len(balance) != n:
        raise LaunchError(
            f"partition.balance = {balance} describes {len(balance)} stages but {n} processes were started; "
            f"use torchrun --nproc_per_node={len(balance)} or give {n} entries"
        )


def build_worker(cfg: Config, runtime: Runtime, stages: list[nn.Sequential],
                 steps: int) -> StageWorker | DNIWorker | PeerWorker:
    """This rank's stage of the partitioned model with its optimizer, transport and schedule."""
    n = runtime.num_stages
    stage = Stage(stages[runtime.stage_index], runtime.stage_index, n, runtime.device, cfg.optim, steps,
                  # global clipping all-reduces over every stage at each step: that would re-lock DNI
                  clip_across_stages=runtime.distributed and cfg.train.schedule != "dni")
    transport = None
    if n > 1:
        wire = torch.device("cpu") if runtime.backend == "gloo" else runtime.device  # gloo: host staging
        transport = Transport(runtime.stage_index, n, runtime.device, wire, cfg.dist.queue_size, cfg.dist.timeout_sec)
    if n > 1 and cfg.train.schedule == "dni":
        return DNIWorker(stage, transport, cfg)
    if n > 1 and cfg.train.schedule in PEER_SCHEDULES:
        return PeerWorker(stage, transport, cfg.train.schedule, cfg.train.microbatches, cfg.data.batch_size)
    schedule = "single" if n == 1 else cfg.train.schedule
    return StageWorker(stage, transport, schedule, cfg.train.microbatches)


def run_token(runtime: Runtime) -> str:
    """An id of this launch, the same on every rank: checkpoints of one run carry the same one."""
    token = [uuid.uuid4().hex]
    if runtime.distributed:
        dist.broadcast_object_list(token, src=0)
    return token[0]


class Trainer:
    """Runs training, evaluation, checkpointing and the summary for one rank."""

    def __init__(self, cfg: Config, runtime: Runtime, model: Optional[nn.Sequential] = None):
        self.cfg, self.runtime = cfg, runtime
        self.run_dir = cfg.run_dir
        with same_on_every_rank():
            check_layout(cfg, runtime)
            self.train_set, self.test_set = datasets.load_datasets(cfg.data, cfg.run.seed)
            self.steps = total_steps(cfg, len(self.train_set))
            sample_shape = tuple(self.train_set.inputs.shape[1:])
            if model is None:
                model = build_model(cfg.model, sample_shape, self.train_set.num_classes, cfg.run.seed)
            balance = cfg.partition.balance if runtime.num_stages > 1 else None
            stages = partition(model, runtime.num_stages, balance, cfg.partition.method)
        self.console = make_console(runtime.is_last, cfg.run.log_every)
        self.worker = build_worker(cfg, runtime, stages, self.steps)
        self.worker.connect(TensorSpec((1, *sample_shape), self.train_set.inputs.dtype), self.train_set.num_classes)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if runtime.is_first:
            save_config(cfg, self.run_dir / "config.yaml")
            print(describe(stages), flush=True)
        self.metrics = MetricsWriter(self.run_dir, runtime.stage_index)
        self.totals = StageTotals(runtime.stage_index, num_params=self.worker.stage.num_params)
        self.checkpointer = Checkpointer(self.run_dir, cfg.checkpoint.enabled, run_token(runtime))
        self.telemetry = make_telemetry(runtime.device)
        self.meter = make_meter(cfg.run.activation_memory, self.worker.stage.module.parameters())
        self.last_eval: Optional[dict] = None
        self.start = time.perf_counter()
        self.eval_sec = 0.0  # time spent evaluating: not training time (see train_sec)

    def train_sec(self) -> float:
        """Seconds of training so far: wall time since fit began, evaluations excluded."""
        return time.perf_counter() - self.start - self.eval_sec

    def evaluate(self, step: int) -> bool:
        """Test-set pass after ``step`` steps; True when ``train.time_limit_sec`` has run out.

        Every rank takes part and leaves together: the all-reduce of training seconds (their
        maximum, so all ranks decide alike) doubles as a barrier. Without it upstream stages
        would wait for the next step's gradients while later stages evaluate, and count that as
        training wait time.
        """
        eval_start = time.perf_counter()
        train_sec = self.train_sec()
        result = self.worker.evaluate(datasets.eval_batches(self.test_set, self.cfg.data.eval_batch_size))
        if self.runtime.distributed:
            clock = torch.tensor([train_sec], dtype=torch.float64, device=self.runtime.device)
            dist.all_reduce(clock, op=dist.ReduceOp.MAX)
            train_sec = float(clock)
        self.eval_sec += time.perf_counter() - eval_start
        if result is not None:
            self.last_eval = {"step": step, "accuracy": result.accuracy, "loss": result.loss}
            self.metrics.log({"eval_step": step, "test_accuracy": result.accuracy, "test_loss": result.loss,
                              "train_sec": train_sec, "samples": step * self.cfg.data.batch_size})
            self.console.evaluated(step, result.accuracy, result.loss)
        limit = self.cfg.train.time_limit_sec
        return 0 < limit <= train_sec

    def fit(self) -> Optional[dict]:
        """Train for ``self.steps`` steps (or until the time limit); returns summary.json's
        content on the last stage."""
        cfg, self.start, self.eval_sec = self.cfg, time.perf_counter(), 0.0
        self.console.start(self.steps)
        batches = datasets.train_batches(self.train_set, cfg.data.batch_size, cfg.run.seed, self.steps)
        done, evaluated_at = 0, -1
        for step, inputs, targets in batches:
            lr = self.worker.stage.scheduler.get_last_lr()[0]  # the rate this step trains with
            with self.meter:
                stats = self.worker.train_step(step, inputs, targets)
            self.meter.hold(self.worker.held_bytes())
            done = step + 1
            self.metrics.step(stats, cfg.data.batch_size, lr, time.perf_counter() - self.start)
            if step > 0 or self.steps == 1:  # the first step pays one-off costs
                self.totals.add(stats)
            self.console.update(step, stats.loss, cfg.data.batch_size / max(stats.step_sec, 1e-9))
            if step % cfg.run.log_every == 0:
                self.telemetry.sample()
            if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done < self.steps:
                evaluated_at = done
                if self.evaluate(done):
                    break
        self.worker.finish()  # the stage weights no longer change: an evaluation at `done` stands
        if evaluated_at != done:
            self.evaluate(done)
        wall = time.perf_counter() - self.start
        self.checkpointer.save(self.worker.stage, done, self.runtime.num_stages, cfg.to_dict(),
                               self.worker.extra_state())
        return self._summarize(wall, done)

    def _summarize(self, wall: float, steps: int) -> Optional[dict]:
        self.totals.peak_memory_bytes = peak_memory_bytes(self.runtime.device)
        self.totals.peak_activation_bytes = self.meter.peak_bytes
        if self.worker.transport is not None:
            self.totals.peak_queued_messages = self.worker.transport.peak_queued
        stages = [{**self.totals.summary(), **self.telemetry.summary()}]
        if self.runtime.distributed:
            gathered: list = [None] * self.runtime.world_size
            dist.all_gather_object(gathered, stages[0])
            stages = gathered
        self.metrics.close()
        if not self.runtime.is_last:
            return None
        t = self.totals
        summary = build_summary(self.cfg.train.schedule if self.runtime.num_stages > 1 else "single",
                                self.runtime.num_stages, steps, self.cfg.data.batch_size, wall,
                                t.step_sec, t.steps, self.last_eval, stages)
        write_json_atomic(self.run_dir / "summary.json", summary)
        self.console.finish(summary)
        return summary

    def close(self) -> None:
        if self.worker.transport is not None:
            self.worker.transport.close()
