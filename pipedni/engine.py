"""Assembling this rank's stage from a config, and the training loop that drives it."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

from pipedni import checkpoint
from pipedni import data as datasets
from pipedni import recompute
from pipedni.checkpoint import Checkpointer
from pipedni.compiling import compile_stage, microbatch_rows
from pipedni.config import Config, save_config
from pipedni.crossing import input_spec, input_split
from pipedni.errors import ConfigError, DivergenceError, LaunchError, among_stages, same_on_every_rank
from pipedni.importing import import_function
from pipedni.metrics import MetricsWriter, StageTotals, build_summary, peak_memory_bytes, write_json_atomic
from pipedni.metrics import timeline
from pipedni.metrics.console import make_console
from pipedni.metrics.memory import make_meter
from pipedni.metrics.telemetry import make_telemetry
from pipedni.metrics.timeline import make_timeline
from pipedni.models import build_model
from pipedni.precision import Precision
from pipedni.replicas import make_replicas
from pipedni.runtime import Runtime, restart_attempt
from pipedni.schedules import registry
from pipedni.schedules.passes import probe_shapes
from pipedni.schedules.spec import ScheduleSpec, WorkerContext
from pipedni.schedules.worker import Worker
from pipedni.split.cut import Cut, cut_model
from pipedni.stage import Loss, NonFinite, Stage, loss_fn
from pipedni.transport import NullTransport, Transport
from pipedni.transport.link import LinkSpec


def total_steps(cfg: Config, num_train_samples: int) -> int:
    if cfg.train.steps > 0:
        return cfg.train.steps
    per_epoch = datasets.steps_per_epoch(num_train_samples, cfg.data.batch_size)
    return max(1, math.ceil(cfg.train.epochs * per_epoch))


def check_layout(cfg: Config, runtime: Runtime) -> ScheduleSpec:
    """One process per stage: the schedule and the balance must fit the world size. Returns the
    schedule that runs (see ``registry.resolve``)."""
    n = runtime.num_stages
    spec = registry.check_layout(cfg, n)
    if n == 1 and (cfg.dist.link_latency_ms > 0 or cfg.dist.link_bandwidth_mbps > 0):
        raise LaunchError(
            f"dist.link_latency_ms = {cfg.dist.link_latency_ms:g} and dist.link_bandwidth_mbps = "
            f"{cfg.dist.link_bandwidth_mbps:g} emulate links between stages, but one process has none; "
            "start 2 or more stages with torchrun, or leave both at 0"
        )
    balance = cfg.partition.balance
    if balance is not None and n > 1 and len(balance) != n:
        raise LaunchError(
            f"partition.balance = {balance} describes {len(balance)} stages but {n} processes were started; "
            f"use torchrun --nproc_per_node={len(balance)} or give {n} entries"
        )
    return spec


def build_transport(cfg: Config, runtime: Runtime, tied: list[list[tuple[int, str]]],
                    direct_receive: bool = False) -> Transport | NullTransport:
    timeline = make_timeline(runtime.stage_index, cfg.run.timeline_steps)
    if runtime.num_stages == 1:
        return NullTransport(timeline)
    wire = torch.device("cpu") if runtime.backend == "gloo" else runtime.device  # gloo: host staging
    link = LinkSpec.from_config(cfg.dist.link_latency_ms, cfg.dist.link_bandwidth_mbps)
    wire_dtype = precision_of(cfg, runtime).wire_dtype(cfg.dist.wire_dtype)
    return Transport(runtime.stage_index, runtime.num_stages, runtime.device, wire, cfg.dist.queue_size,
                     cfg.dist.timeout_sec, link, wire_dtype, timeline, [[s for s, _ in group] for group in tied],
                     direct_receive, runtime.replica, runtime.num_replicas)


def replica_group(runtime: Runtime):
    """This stage's group over its replicas, from the ("dp", "pp") mesh (see [Note: ranks of a
    replicated pipeline] in runtime.py); None with one replica. Every rank builds it, in order."""
    if runtime.num_replicas == 1:
        return None
    mesh = init_device_mesh(runtime.device.type, (runtime.num_replicas, runtime.num_stages),
                            mesh_dim_names=("dp", "pp"))
    return mesh["dp"].get_group()


def precision_of(cfg: Config, runtime: Runtime) -> Precision:
    return Precision(cfg.train.precision, runtime.device.type)


def resolve_loss(cfg: Config) -> Loss:
    """``train.loss``: the built-in cross-entropy, or the user's function."""
    return loss_fn if cfg.train.loss == "cross_entropy" else import_function("train.loss", cfg.train.loss)


def one_input_shape(cfg: Config, train_set: datasets.Dataset) -> tuple[int, ...]:
    """The shape of a sample's one input, which a built-in model is built for."""
    if isinstance(train_set.inputs, tuple) and not cfg.model.factory:
        raise ConfigError(f"the data gives {len(train_set.inputs)} inputs per sample, {train_set.describe_inputs()}, but "
                          f"model.name = {cfg.model.name!r} takes one tensor; build a model that takes them with "
                          "model.factory")
    return tuple(train_set.inputs.shape[1:]) if isinstance(train_set.inputs, torch.Tensor) else ()


def build_worker(cfg: Config, runtime: Runtime, spec: ScheduleSpec, cut: Cut, steps: int,
                 train_set: datasets.Dataset, loss: Loss) -> Worker:
    """This rank's stage with its optimizer and transport, its shapes probed end to end, and the
    schedule's worker built around them."""
    i = runtime.stage_index
    module = recompute.apply(cut.stages[i], cfg.train.activation_checkpointing, i)
    stage = Stage(module, i, runtime.num_stages, runtime.device, cfg.optim, steps, cfg.train.on_nonfinite,
                  cut.tied_weights(i), loss, precision_of(cfg, runtime))
    stage.replicas = make_replicas(stage.module, replica_group(runtime), runtime.device)
    transport = build_transport(cfg, runtime, cut.tied, direct_receive=spec.locked)  # see [Note: who receives]
    sample_spec = input_spec(train_set.inputs, train_set.input_names)
    shapes = cut.shapes_named(i, probe_shapes(stage, transport, sample_spec, train_set.num_classes))
    ctx = WorkerContext(stage, transport, shapes, cfg, train_set.num_classes, tuple(train_set.targets.shape[1:]),
                        sample_spec)
    return spec.build(ctx)


def run_token(runtime: Runtime) -> str:
    """An id of this launch, the same on every rank: checkpoints of one run carry the same one."""
    token = [uuid.uuid4().hex]
    if runtime.distributed:
        with among_stages(runtime.who, "the start-up broadcast of the run's id"):
            dist.broadcast_object_list(token, src=0)
    return token[0]


def make_run_dir(cfg: Config) -> None:
    try:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        probe = cfg.run_dir / f".writable{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"run.dir = {str(cfg.run_dir)!r} cannot be written ({err.strerror or err}); "
                          "choose a writable directory with --run.dir=PATH") from None


def resume_from(cfg: Config, runtime: Runtime) -> str:
    """What to resume: after a torchrun restart (``--max-restarts``) the latest checkpoint in
    run.dir if there is one (whatever the first attempt resumed from), else
    ``checkpoint.resume``. A fresh start moves an earlier run's checkpoints in run.dir aside
    (``checkpoints.previous``) so that they are neither mixed with this run's nor lost."""
    which = cfg.checkpoint.resume.strip()
    root = cfg.run_dir / "checkpoints"
    if restart_attempt() > 0 and checkpoint.has_checkpoint(root):
        return "latest"
    if which:
        return which
    if runtime.rank == 0 and root.is_dir() and any(root.iterdir()):
        aside = root.with_name("checkpoints.previous")
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(root, aside)
        print(f"{root} held an earlier run's checkpoints: moved to {aside} (pass --resume to continue a run)",
              flush=True)
    return ""


def with_saved_balance(cfg: Config, folder: Optional[Path], num_stages: int) -> Config:
    """``cfg`` cutting the model as the checkpoint being resumed was cut (its balance, or a split
    model's split points), where the stage count is the same and no cut is given: a timed split
    would otherwise measure anew and may cut elsewhere, and the predictors only carry over to
    the same split."""
    meta = checkpoint.read_meta(folder) if folder is not None else {}
    if num_stages == 1 or meta.get("num_stages") != num_stages:
        return cfg
    balance, points = meta.get("balance"), meta.get("split_points")
    if points and not cfg.model.split_points and cfg.partition.balance is None:
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, split_points=list(points)))
    if cfg.partition.balance is not None or not balance:
        return cfg
    return dataclasses.replace(cfg, partition=dataclasses.replace(cfg.partition, balance=list(balance)))


class Trainer:
    """Runs training, evaluation, checkpointing and the summary for one rank."""

    def __init__(self, cfg: Config, runtime: Runtime, model: Optional[nn.Module] = None,
                 data: Optional[tuple[datasets.Dataset, datasets.Dataset]] = None, loss: Optional[Loss] = None):
        """``model``, ``data`` (train, test) and ``loss``: the caller's, instead of those the
        config names (``pipedni.fit``)."""
        self.cfg, self.runtime = cfg, runtime
        self.run_dir = cfg.run_dir
        with same_on_every_rank():
            self.spec = check_layout(cfg, runtime)
            self.train_set, self.test_set = data if data is not None else datasets.load_datasets(cfg.data, cfg.run.seed)
            loss = loss if loss is not None else resolve_loss(cfg)
            self.steps = total_steps(cfg, len(self.train_set))
            if model is None:
                model = build_model(cfg.model, one_input_shape(cfg, self.train_set), self.train_set.num_classes,
                                    cfg.run.seed)
            make_run_dir(cfg)
            resume = resume_from(cfg, runtime)
            folder = checkpoint.find(self.run_dir / "checkpoints", resume) if resume else None
            cfg = with_saved_balance(cfg, folder, runtime.num_stages)
            cut = cut_model(cfg, self.spec, runtime, model, self.train_set)
            for i, stage_module in enumerate(cut.stages):  # one error, not one per rank
                recompute.check(stage_module, cfg.train.activation_checkpointing, i)
        self.cfg = cfg = cut.cfg
        self.train_set, self.test_set = (d.in_order(cut.input_names) for d in (self.train_set, self.test_set))
        self.console = make_console(runtime.is_last and runtime.leads, cfg.run.log_every, self.spec.metrics,
                                    self.spec.wait_grad_header)
        self.worker = build_worker(cfg, runtime, self.spec, cut, self.steps, self.train_set, loss)
        self.compiled = self._compile() if cfg.train.compile else (None, None)  # (seconds, whether it compiled)
        self.checkpointer = Checkpointer(self.run_dir, cfg.checkpoint, runtime.rank, runtime.distributed,
                                         run_token(runtime), writes=runtime.leads)
        self.start_step = self._resume(folder) if folder is not None else 0
        if runtime.rank == 0:
            save_config(cfg, self.run_dir / "config.yaml")
            print(cut.description, flush=True)
        metrics_dir = self.run_dir if runtime.leads else self.run_dir / "replicas" / str(runtime.replica)
        self.metrics = MetricsWriter(metrics_dir, runtime.stage_index, self.start_step if folder else None,
                                     cfg.run.tensorboard and runtime.leads)
        self.totals = StageTotals(runtime.stage_index, num_params=self.worker.stage.num_params,
                                  metrics=self.spec.metrics)
        self.telemetry = make_telemetry(runtime.device)
        self.meter = make_meter(cfg.run.activation_memory, self.worker.stage.module.parameters())
        self.last_eval: Optional[dict] = None
        self.start = time.perf_counter()
        self.paused_sec = 0.0  # time spent evaluating and checkpointing: not training time (see train_sec)

    def _compile(self) -> tuple[float, bool]:
        """train.compile: this stage compiled for the microbatch sizes its schedule runs (see
        [Note: compiling a stage]); returns the seconds it took and whether it compiled."""
        worker, cfg = self.worker, self.cfg
        rows = microbatch_rows(cfg.data.batch_size, self.spec.microbatches(cfg))
        return compile_stage(worker.stage, worker.shapes, rows, tuple(self.train_set.targets.shape[1:]))

    def _resume(self, folder: Path) -> int:
        """Load checkpoint ``folder`` into this rank's stage; returns its step."""
        stage = self.worker.stage
        with same_on_every_rank():
            step, own = checkpoint.restore(stage, folder, self.runtime.num_stages)
        if stage.before is not None:  # weight prediction: the update before is the checkpoint's, or none
            stage.track_updates()
        if own is not None:
            self.worker.load_extra_state(own)
        if self.runtime.rank == 0:
            how = "" if own is not None else " (written under another split: predictors and RNG start afresh)"
            print(f"resuming from {folder} at step {step}{how}", flush=True)
        self.checkpointer.last_step = step
        return step

    def train_sec(self) -> float:
        """Seconds of training so far: wall time since fit began, evaluations and checkpoints excluded."""
        return time.perf_counter() - self.start - self.paused_sec

    def evaluate(self, step: int) -> float:
        """Test-set pass after ``step`` steps; returns the training seconds so far, the same on
        every rank.

        Every rank takes part and leaves together: the all-reduce of training seconds (their
        maximum, so all ranks decide alike on the time limit and time-based checkpoints) doubles
        as a barrier. Without it upstream stages would wait for the next step's gradients while
        later stages evaluate, and count that as training wait time.
        """
        eval_start = time.perf_counter()
        train_sec = self.train_sec()
        batches = datasets.eval_batches(self.test_set, self.cfg.data.eval_batch_size) if self.runtime.leads else ()
        result = self.worker.evaluate(batches)  # one replica evaluates: they all hold the same weights
        if self.runtime.distributed:
            clock = torch.tensor([train_sec], dtype=torch.float64, device=self.runtime.device)
            with among_stages(self.runtime.who, "the all-reduce that ends an evaluation"):
                dist.all_reduce(clock, op=dist.ReduceOp.MAX)
            train_sec = float(clock)
        self.paused_sec += time.perf_counter() - eval_start
        if result is not None:
            self.last_eval = {"step": step, "accuracy": result.accuracy, "loss": result.loss}
            self.metrics.log({"eval_step": step, "test_accuracy": result.accuracy, "test_loss": result.loss,
                              "train_sec": train_sec, "samples": step * self.cfg.data.batch_size})
            self.console.evaluated(step, result.accuracy, result.loss)
        return train_sec

    def save_checkpoint(self, done: int, train_sec: float = 0.0) -> None:
        """Drain what the schedule owes, then write every stage's part of checkpoint ``done``."""
        start = time.perf_counter()
        self.worker.finish()
        self.checkpointer.save(self.worker.stage, done, self.runtime.num_stages, self.cfg.to_dict(),
                               self.worker.extra_state(), train_sec)
        self.paused_sec += time.perf_counter() - start

    def fit(self) -> Optional[dict]:
        """Train for ``self.steps`` steps (or until the time limit); returns summary.json's
        content on the last stage."""
        cfg, self.start, self.paused_sec = self.cfg, time.perf_counter(), 0.0
        self.console.start(self.steps)
        batches = datasets.train_batches(self.train_set, cfg.data.batch_size, cfg.run.seed, self.steps,
                                         self.start_step)
        done, evaluated_at, limit = self.start_step, -1, cfg.train.time_limit_sec
        with self._divergence(lambda: done):
            for step, inputs, targets in batches:
                lr = self.worker.stage.scheduler.get_last_lr()[0]  # the rate this step trains with
                skipped = self.worker.stage.skipped_updates
                self.worker.transport.timeline.begin_step(step)
                inputs, targets = self._share(inputs, targets)
                with self.meter:
                    stats = self.worker.train_step(step, inputs, targets)
                self.worker.transport.timeline.end_step()
                if self.worker.stage.skipped_updates > skipped == 0:
                    print(f"stage {self.runtime.stage_index}: step {step}: a non-finite update was skipped "
                          "(train.on_nonfinite: skip); skipped_updates in summary.json counts them", flush=True)
                self.meter.hold(self.worker.held_bytes())
                done = step + 1
                self.metrics.step(stats, cfg.data.batch_size, lr, time.perf_counter() - self.start)
                if step > self.start_step or self.steps == 1:  # the first step pays one-off costs
                    self.totals.add(stats)
                self.console.update(step, stats.loss, cfg.data.batch_size / max(stats.step_sec, 1e-9))
                if step % cfg.run.log_every == 0:
                    self.telemetry.sample()
                if done == self.steps:
                    break
                if cfg.train.eval_every and done % cfg.train.eval_every == 0:
                    evaluated_at, train_sec = done, self.evaluate(done)
                    if 0 < limit <= train_sec:
                        break
                    if self.checkpointer.due_by_time(train_sec):
                        self.save_checkpoint(done, train_sec)
                if self.checkpointer.due(done):
                    self.save_checkpoint(done, self.checkpointer.last_train_sec)
            self.worker.finish()  # the stage weights no longer change: an evaluation at `done` stands
        if evaluated_at != done:
            self.evaluate(done)
        wall = time.perf_counter() - self.start
        self.save_checkpoint(done)
        return self._summarize(wall, done)

    def _share(self, inputs, targets):
        """This replica's share of the global batch (all of it with one replica)."""
        replicas, replica = self.runtime.num_replicas, self.runtime.replica
        if replicas == 1:
            return inputs, targets
        share = None if inputs is None else input_split(inputs, replicas)[replica]
        return share, torch.tensor_split(targets, replicas)[replica]

    @contextlib.contextmanager
    def _divergence(self, step: Callable[[], int]):
        """A non-finite loss or gradient becomes one line naming this stage and the step."""
        try:
            yield
        except NonFinite as err:
            last = self.checkpointer.last_step
            kept = f"checkpoint of step {last} kept" if last is not None else "no checkpoint was written"
            raise DivergenceError(
                f"stage {self.runtime.stage_index}/{self.runtime.num_stages}: training diverged: non-finite {err} "
                f"at step {step()} ({kept}); lower optim.lr, set optim.grad_clip, or skip such updates with "
                "--train.on_nonfinite=skip") from None

    def _summarize(self, wall: float, steps: int) -> Optional[dict]:
        self.totals.peak_memory_bytes = peak_memory_bytes(self.runtime.device)
        self.totals.peak_activation_bytes = self.meter.peak_bytes
        self.totals.peak_queued_messages = self.worker.transport.peak_queued
        self.totals.skipped_updates = self.worker.stage.skipped_updates
        self.totals.compile_sec, self.totals.compiled = self.compiled
        mine = ({**self.totals.summary(), **self.telemetry.summary()}, self.worker.transport.timeline.events)
        gathered: list = [mine]
        if self.runtime.distributed:
            gathered = [None] * self.runtime.world_size
            with among_stages(self.runtime.who, "the gathering of every stage's summary"):
                dist.all_gather_object(gathered, mine)
        n, d = self.runtime.num_stages, self.runtime.num_replicas  # rank r * n + s: see runtime.py
        copies = [[gathered[r * n + s][0] for r in range(d)] for s in range(n)]
        stages = [dict(each[0], replicas=each) if d > 1 else each[0] for each in copies]  # replica 0's, and every one
        self.metrics.close()
        if not (self.runtime.is_last and self.runtime.leads):
            return None
        timeline.write([events for _, events in gathered[:self.runtime.num_stages]], self.run_dir,
                       f"{self.spec.name}, {self.runtime.num_stages} stages: {self.cfg.run.timeline_steps} steps")
        t = self.totals
        summary = build_summary(self.spec.name, self.runtime.num_stages, steps, self.cfg.data.batch_size, wall,
                                t.step_sec, t.steps, self.last_eval, stages, self.cfg.train.precision,
                                self.runtime.num_replicas)
        write_json_atomic(self.run_dir / "summary.json", summary)
        self.console.finish(summary)
        return summary

    def close(self) -> None:
        self.worker.transport.close()
