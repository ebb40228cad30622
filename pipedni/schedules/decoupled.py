"""Pipelines whose boundaries learn differently: ``async`` (every boundary delayed) and ``mixed``
(each boundary locked, dni or async, from ``train.boundaries``).

How stage i learns from stage i+1 is the boundary's mode:

    locked  the true gradient of the same step; stage i waits for it        d_i = d_{i+1}
    async   the true gradient of an earlier step (delayed gradients: DDG,    d_i = d_{i+1} + delayed.delay
            arXiv 1804.10574; PipeDream, SOSP 2019; 2BW, arXiv 2006.09503)
    dni     at once, from its synthetic gradient; the predictor fits the     d_i = 0
            true gradient when it arrives (dni.* settings, see synthetic_gradients.py)

d_i is stage i's delay (the last stage is exact: d_{N-1} = 0). At step t stage i runs, for each
of ``train.microbatches`` microbatches (``async``: the whole batch), the forward of step t (and
across a dni boundary its synthetic backward at once); then the true backward of step
s = t - d_i (each microbatch's gradient from stage i+1, backpropagated, its input gradient sent
to stage i-1 tagged s); then one update: the actions of steps.decoupled_step, which the worker
executes one by one and the simulator replays. Stage i+1 answers for step s at its own step
s + d_{i+1}, so stage i waits only for what stage i+1 can already have done (no deadlock: by
induction from the last stage) and runs at most d_i - d_{i+1} steps ahead of it. The delays are
fixed, not "whatever has arrived", so a run is deterministic and equals one process applying
the same delays (tests/test_delayed.py, tests/test_mixed.py). ``finish`` makes the d_i updates
still owed: every stage makes one update per batch, and every message sent is received.

A dni boundary stores each step's outputs until their gradients arrive, stage i+1 returning
them d_{i+1} steps late: ``dni.max_staleness`` must be at least that (checked at start-up). Its
warm-up (``dni.warmup_steps``, per boundary through ``dni.boundaries``) trains it locked, the
predictor fitting each true gradient before the backward uses it; that needs d_{i+1} = 0, or
stage i's delay, and so every delay upstream of it, would change when the warm-up ends.

With ``dni.synthetic_inputs`` on a dni boundary, stage i+1 may also train on its input predicted
from the network input instead of waiting for stage i's activation; the worker asks its
``SyntheticInputEnd`` at each wait (synthetic_inputs.py, [Note: catching up on a true input]).

[Note: the untrusted fallback]
A dni stage whose predictor is not trusted (``dni.min_cosine``, see dni/predictors.py) has no
gradient it may use at once. With ``dni.fallback: delayed`` (default) it runs that step as an
async stage would: the forward on a weight stash (predicted, under ``delayed.*``), the graph
kept, and the true gradient backpropagated and applied when it is due, 1 + d_{i+1} steps later
(the predictor also fits it then); its input gradient goes upstream at that time too. So an
untrusted stage trains like ``async`` instead of standing still, and one whose predictor never
learns (plain DNI on the char LM) still trains. A step trusted after an untrusted one makes
two updates (its own, then the one due); every batch still makes exactly one. The delay is
possible only where nobody waits for stage i's input gradient of the same step: stage i first,
or boundary i-1 dni (whose store waits up to ``dni.max_staleness`` steps, checked at start-up);
after a locked or async boundary the stage is frozen while untrusted instead, and says so.
Which steps used the predictor is ``sg_untrusted`` in the metrics.

[Note: weight stashing]
What a delayed backward (d_i > 0) of step s needs is kept one of two ways
(``delayed.weight_stashing``):
- true (default): the autograd graph of step s, built on a copy of the weights its forward used
  (``Stage.stash``, one copy per step shared by its microbatches), so the gradient is exactly
  that of the forward that ran (PipeDream's weight stashing). Memory: d_i + 1 graphs and weight
  copies in flight; no extra compute.
- false: only the inputs of step s; the forward is recomputed with the current weights just
  before the backward (features replay, arXiv 1807.04511). Memory: d_i + 1 inputs; one more
  forward a step.
Keeping the graph without a copy is not an option: the optimizer updates the weights in place,
and autograd refuses a backward through tensors modified since they were saved. A locked
boundary with d_i = 0 keeps its graph on the live weights: nothing changes them before its
backward.

[Note: weight prediction]
The gradient of step s is applied d_i updates after its forward ran, to weights that have moved
on. With ``delayed.weight_prediction`` (default) the forward of a delayed step runs on the
weights it will update, predicted by extrapolating the last update: w + d_i (w - w_before)
(``Stage.stash(ahead=d_i)``). SpecTrain (arXiv 1809.02839), PipeMare (arXiv 1910.05124) and
PipeOptim (arXiv 2312.00839) predict weights along the optimizer's update the same way. Under
Adam or momentum the last update is a smoothed direction, so the prediction is close and the
gradient is taken nearly where it lands. On configs/bench_mlp_fashion.yaml (2 stages, 3 seeds,
scripts/delay_sim.py) a one-step delay cost 1.0-2.1 points of test accuracy at 400 steps and
prediction gave back all but 0.2-0.5 of them; docs/results.md has the engine's figures. Cost:
one more weight copy per stage (the weights before the update) and, under features replay, a
predicted copy for the forward.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch

from pipedni.config import Config
from pipedni.crossing import gradient_spec, value_bytes
from pipedni.metrics.records import StepStats
from pipedni.schedules.actions import ActionKind, action_name
from pipedni.schedules.modes import (BoundaryMode, check_decoupled, check_mixed, delays, every_boundary,
                                     fallback_delay, listed_modes)
from pipedni.schedules.passes import EvalResult
from pipedni.schedules.spec import ScheduleSpec, WorkerContext
from pipedni.schedules.steps import Due, SimAction, decoupled_finish, decoupled_step
from pipedni.schedules.synthetic_gradients import METRICS, SyntheticGradientEnd
from pipedni.schedules.synthetic_inputs import METRICS as SI_METRICS
from pipedni.schedules.synthetic_inputs import SyntheticInputEnd
from pipedni.schedules.worker import TiedSync, Timers, Worker, grad_norm, split_batch
from pipedni.transport import Kind

@dataclass
class _Kept:
    """What the true backward of one microbatch needs besides its graph."""

    replay: Optional[torch.Tensor] = None  # its input, when the forward is recomputed
    fit: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]] = None  # output and labels (dni warm-up, fallback)


class BoundaryWorker(Worker):
    """One stage of a pipeline whose boundaries are each locked, dni or async."""

    def __init__(self, ctx: WorkerContext, boundaries: Sequence[str], microbatches: int):
        super().__init__(ctx)
        stage, cfg, i = self.stage, ctx.cfg, ctx.stage.stage_index
        check_decoupled(ctx, boundaries)
        self.mode = None if stage.is_last else boundaries[i]
        d = delays(boundaries, cfg.delayed.delay)
        self.delay = d[i]
        self.num_microbatches = microbatches
        self.running = 0  # the step train_step runs: actions of an earlier one are named so
        dni = cfg.dni.for_boundary(i)
        self.gradients = SyntheticGradientEnd(ctx, dni, microbatches) if self.mode == "dni" else None
        self.warmup_steps = dni.warmup_steps if self.mode == "dni" else 0
        self.fallback = fallback_delay(boundaries, i, d, dni.fallback) if self.mode == "dni" else 0
        if self.mode == "dni" and dni.fallback == "delayed" and not self.fallback:
            print(f"stage {i}: dni.fallback delayed needs stage {i - 1}'s boundary to be dni too (it is "
                  f"{boundaries[i - 1]}: stage {i - 1} waits for this stage's input gradient); frozen while "
                  "the predictor is untrusted", flush=True)
        self.tied = TiedSync(stage, ctx.transport, cfg.train.tied_sync_every)
        self.stashing = cfg.delayed.weight_stashing
        self.predicting = cfg.delayed.weight_prediction
        if self.predicting and (self.delay or self.fallback):
            stage.track_updates()
        self.pending: OrderedDict[int, tuple[int, list[_Kept]]] = OrderedDict()  # step -> (due step, needs)
        before = cfg.dni.for_boundary(i - 1) if i > 0 and boundaries[i - 1] == "dni" else None
        self.inputs = None  # forward unlocking: see [Note: catching up on a true input]
        if before is not None and before.synthetic_inputs:
            self.inputs = SyntheticInputEnd(ctx, before, self.gradients, self._send_input_grad, self._update)
        self.predict_from = before.warmup_steps if self.inputs is not None else 0  # the boundary's warm-up is locked

    def _key(self, step: int, mb: int) -> int:
        return step * self.num_microbatches + mb

    def _name(self, kind: str, step: int, mb: int = -1) -> str:
        """The timeline's name of an action on ``step``'s batch, as the simulator's streams name it."""
        return action_name(kind, mb, step, self.running)

    def train_step(self, step: int, inputs: Optional[torch.Tensor], targets: torch.Tensor) -> StepStats:
        """One step as ``steps.decoupled_step`` gives it for this stage's state (the simulator's
        streams replay the same function): its work, then the fits of what has arrived, then
        the back-pressure waits."""
        stage, timers = self.stage, Timers(self.transport)
        self.running = step
        synthetic = self.gradients is not None and step >= self.warmup_steps
        if self.gradients is not None:
            self.gradients.begin(step)
        # see [Note: trusting the predictor]; replicas agree (see [Note: averaging over replicas] in pipedni/replicas.py)
        trusted = synthetic and stage.replicas.agree(self.gradients.trusted)
        at_once = stage.is_last or trusted or (synthetic and not self.fallback)  # backpropagated in the forward
        late = 0 if at_once else self.fallback if synthetic else self.delay  # steps until its true backward
        self.params = None
        if late and (self.stashing or self.predicting):
            self.params = timers.run("compute", stage.stash, late if self.predicting else 0)
        may_predict = self.inputs is not None and at_once and step >= self.predict_from
        if self.inputs is not None:
            self.inputs.begin(step, may_predict, timers)
        self.pieces = split_batch(stage, inputs, targets, self.num_microbatches, keep_inputs=self.inputs is not None)
        self.kept = [_Kept() for _ in self.pieces]
        self.replay_now = late > 0 and not self.stashing  # features replay: only the input is kept
        if not at_once:
            self.pending[step] = (step + late, self.kept)
        work, waits = decoupled_step(stage.stage_index, stage.num_stages, step, self.num_microbatches, at_once,
                                     self.gradients is not None, self._due(step),
                                     self._waits_for(step, synthetic))
        self.norm, self.drop = None, synthetic and not trusted  # untrusted at once: the update is dropped
        self._run(work, timers)
        if synthetic:
            if at_once and not stage.is_last:
                self.gradients.keep(step, {mb: k.fit for mb, k in enumerate(self.kept)})
            timers.run("compute", self.gradients.fit_ready, next(iter(self.pending), None))
            if waits:
                self.gradients.back_pressure(timers)  # waits as long as the oldest stored step is that old
        if self.inputs is not None:
            self.inputs.end(timers)
        stats = timers.stats(step, stage, self.norm)
        if self.inputs is not None:
            self.inputs.write(stats)
        if self.gradients is not None:
            self.gradients.write(stats)
            if synthetic:
                stats.extra["sg_untrusted"] = int(not trusted)
        elif not stage.is_last:
            stats.extra.update(staleness=self.delay, store_size=len(self.pending))
        self.tied.after(step)
        return stats

    def _waits_for(self, step: int, synthetic: bool) -> Optional[int]:
        """The step a dni stage's back-pressure waits on: ``dni.max_staleness`` steps back."""
        back = step - self.gradients.cfg.max_staleness if synthetic else -1
        return None if back < 0 else back

    def _due(self, until: Optional[int] = None) -> list[Due]:
        """The kept steps whose true backward is due by ``until`` (None: all), oldest first (one
        not yet due holds back the ones after it), each with whether its forward is replayed (a
        step due the step it ran has no delay, so nothing to replay)."""
        due = []
        for kept_step, (due_step, kept) in self.pending.items():
            if until is not None and due_step > until:
                break
            due.append(Due(kept_step, any(k.replay is not None for k in kept)))
        return due

    def _run(self, actions: Sequence[SimAction], timers: Timers) -> None:
        """Execute actions in order; from a true backward's RECV_B on, they work on that step."""
        self.backward_of, self.predicted, self.timers = None, set(), timers
        self.received, self.outputs, self.grads = {}, {}, {}  # by microbatch, within the step
        for action in actions:
            if action.kind == ActionKind.RECV_B:
                self.backward_of = action.step
            getattr(self, f"_do_{action.kind.lower()}")(action.step, action.microbatch)

    def _do_recv_f(self, step: int, mb: int) -> None:
        piece, timers, key = self.pieces[mb], self.timers, self._key(step, mb)
        if self.inputs is not None and self.inputs.predicts(step, mb):
            self.inputs.train_predicted(step, mb, key, piece, timers)
            self.predicted.add(mb)  # its synthetic-gradient fit is kept when its true input comes
            return
        if self.inputs is not None:
            self.inputs.before_true_input(step, mb, piece, timers)
        self.received[mb] = timers.run_as(self._name(ActionKind.RECV_F, step, mb), "wait_input", self.transport.recv,
                                          "prev", Kind.ACTIVATION, step, mb, self.shapes.input)
        if self.inputs is not None:
            self.inputs.took_true_input(piece, self.received[mb], timers)

    def _do_f(self, step: int, mb: int) -> None:
        stage, key, name = self.stage, self._key(step, mb), self._name(ActionKind.F, step, mb)
        if self.backward_of is not None:  # features replay: the forward again, on the current weights
            self.timers.run_as(name, "compute", stage.forward, key, self.pending[step][1][mb].replay)
            return
        if mb in self.predicted:
            return
        piece = self.pieces[mb]
        x = piece.inputs if stage.is_first else self.received.pop(mb)
        if stage.is_last:  # exact: the loss's gradient at once
            self.timers.run_as(name, "compute", stage.forward, key, x, piece.targets, piece.weight)
            return
        if self.replay_now:
            with torch.no_grad():
                h = self.timers.run_as(name, "compute", stage.run, x, self.params)
        else:
            h = self.timers.run_as(name, "compute", stage.forward, key, x, None, 1.0, self.params)
        self.outputs[mb] = h
        fit = None if self.gradients is None else (h, self.gradients.labels(piece.targets))
        self.kept[mb] = _Kept(replay=x if self.replay_now else None, fit=fit)

    def _do_send_f(self, step: int, mb: int) -> None:
        if mb not in self.predicted:
            self.transport.send("next", Kind.ACTIVATION, step, mb, self.outputs.pop(mb))

    def _do_sg(self, step: int, mb: int) -> None:
        name = self._name(ActionKind.SG, step, mb)
        if self.backward_of is None:  # at once: the synthetic gradient the backward uses
            if mb not in self.predicted:
                h, labels = self.kept[mb].fit
                self.grads[mb] = self.timers.run_as(name, "compute", self.gradients.predict, h, labels)
            return
        kept = self.pending[step][1][mb]  # the true gradient arrived: the predictor learns from it
        self.timers.run_as(name, "compute", self.gradients.fit, *kept.fit, self.grads[mb], self.gradients.step - step)

    def _do_b(self, step: int, mb: int) -> None:
        if self.backward_of is None and mb in self.predicted:
            return
        gradient = () if self.backward_of is None and self.stage.is_last else (self.grads.pop(mb),)
        self.grads[mb] = self.timers.run_as(self._name(ActionKind.B, step, mb), "compute", self.stage.backward,
                                            self._key(step, mb), *gradient)

    def _do_send_b(self, step: int, mb: int) -> None:
        if self.backward_of is not None or mb not in self.predicted:
            self._send_input_grad(step, mb, self.grads.pop(mb))

    def _do_recv_b(self, step: int, mb: int) -> None:
        """A true backward's gradient (back-pressure waits are the dni end's: see train_step)."""
        self.grads[mb] = self.timers.run_as(self._name(ActionKind.RECV_B, step, mb), "wait_grad", self.transport.recv,
                                            "next", Kind.GRADIENT, step, mb, gradient_spec(self.shapes.output))

    def _do_step(self, step: int, mb: int) -> None:
        if self.backward_of is None:  # the loss's gradient, or the predictor's (dropped while it is untrusted)
            source = "gradient" if self.stage.is_last else f"synthetic gradient of boundary {self.stage.stage_index}"
            self.norm = self._update(self.timers, step, drop=self.drop, source=source)
            return
        del self.pending[step]
        self.norm = self._update(self.timers, step)
        self.backward_of = None

    def _send_input_grad(self, step: int, mb: int, grad_in: Optional[torch.Tensor]) -> None:
        if not self.stage.is_first:
            self.transport.send("prev", Kind.GRADIENT, step, mb, grad_in)

    def _update(self, timers: Timers, step: Optional[int] = None, drop: bool = False, source: str = "gradient",
                count: bool = True) -> Optional[float]:
        """One optimizer step, on ``step``'s gradients (None: the running step's); with ``drop``, on no
        gradients (the optimizer skips every parameter); ``count``: a batch's (an idle update is not,
        see ``Stage.step``)."""
        name = self._name(ActionKind.STEP, self.running if step is None else step)
        if drop:  # nothing to measure or check: the optimizer skips every parameter
            self.stage.optimizer.zero_grad(set_to_none=True)
            norm = None
        else:  # averaged over the replicas, then this stage's own norm: no barrier across stages
            timers.run_as(name, "compute", self.stage.replicas.average)
            norm = timers.run_as(name, "compute", grad_norm, self.stage)
        timers.run_as(name, "compute", self.stage.step, norm, source, count)
        return norm

    def finish(self) -> None:
        """The updates still owed, in step order, then the fits still owed."""
        timers = Timers(self.transport)
        if self.inputs is not None:
            self.inputs.settle(timers)
        owed = self._due()
        self.pieces, self.kept, self.replay_now, self.drop = [], [], False, False
        predicts = self.gradients is not None
        self._run(decoupled_finish(self.stage.stage_index, self.num_microbatches, owed, predicts), timers)
        if self.gradients is not None:
            self.gradients.drain()
        self.tied.sync()  # a checkpoint or the end: every copy the same

    def evaluate(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Optional[EvalResult]:
        """Catch up on every true input first: a stage upstream may be waiting, within the step
        before this evaluation, for a gradient that only a catch-up sends."""
        if self.inputs is not None:
            self.inputs.settle(Timers(self.transport))
        return super().evaluate(batches)

    def held_bytes(self) -> int:
        """Inputs kept for recomputation, outputs and labels kept for a dni fit, and the dni store
        (graphs are metered by autograd)."""
        held = [t for _, kept in self.pending.values() for k in kept for t in (k.replay, *(k.fit or ()))]
        ends = [end.held_bytes() for end in (self.gradients, self.inputs) if end is not None]
        return sum(map(value_bytes, held)) + sum(ends)

    def extra_state(self) -> dict:
        """The predictor (with its optimizer and agreement), and the weights before the last
        update that weight prediction extrapolates from."""
        state = {} if self.gradients is None else {"synthetic_gradient": self.gradients.state_dict()}
        if self.inputs is not None:
            state["synthetic_input"] = self.inputs.state_dict()
        if self.stage.before is not None:
            state["weights_before_update"] = self.stage.before
        return state

    def load_extra_state(self, state: dict) -> None:
        if self.gradients is not None and "synthetic_gradient" in state:
            self.gradients.load_state_dict(state["synthetic_gradient"])
        if self.inputs is not None and "synthetic_input" in state:
            self.inputs.load_state_dict(state["synthetic_input"])
        if self.stage.before is not None and "weights_before_update" in state:
            with torch.no_grad():
                for name, tensor in self.stage.before.items():
                    tensor.copy_(state["weights_before_update"][name])


def build_decoupled(ctx: WorkerContext, spec: ScheduleSpec) -> BoundaryWorker:
    """The worker of a schedule given by its boundary modes (``ScheduleSpec.boundary_modes``)."""
    modes = spec.boundary_modes(ctx.stage.num_stages, ctx.cfg.train.boundaries)
    return BoundaryWorker(ctx, list(modes), spec.microbatches(ctx.cfg))


def _dni_boundaries(cfg: Config, num_stages: int) -> tuple[int, ...]:
    return tuple(i for i, mode in enumerate(cfg.train.boundaries) if mode == "dni")


def _async_copies(cfg: Config) -> int:
    """Weight copies a delayed stage makes a step: the stash (or the predicted weights a replayed
    forward runs on), and under weight prediction the weights before the update."""
    d = cfg.delayed
    return int(d.weight_stashing or d.weight_prediction) + int(d.weight_prediction)


def dni_copies(cfg: Config) -> int:
    """A dni stage's weight copies a step: an async stage's while its predictor is untrusted
    (the fallback, charged in full: it is what plain DNI pays when its predictor never learns)."""
    return _async_copies(cfg) if cfg.dni.fallback == "delayed" else 0


def _mixed_copies(cfg: Config) -> int:
    if "async" in cfg.train.boundaries:
        return _async_copies(cfg)
    return dni_copies(cfg) if "dni" in cfg.train.boundaries else 0


DNI_METRICS = METRICS + SI_METRICS  # a schedule with dni boundaries, which may have synthetic inputs
ASYNC = ScheduleSpec("async", "delayed true gradients: stage i updates from the gradient of step t - d_i "
                     "(delayed.* settings)", build=lambda ctx: build_decoupled(ctx, ASYNC), min_stages=2, locked=False,
                     metrics=METRICS, wait_grad_header="backpressure s", copies_weights=_async_copies,
                     microbatch_key=None, sweeps_microbatches=False, boundary_modes=every_boundary(BoundaryMode.ASYNC))
MIXED = ScheduleSpec("mixed", "each boundary locked, dni or async (train.boundaries; dni.*, delayed.* settings)",
                     build=lambda ctx: build_decoupled(ctx, MIXED), min_stages=2, locked=False, check=check_mixed,
                     metrics=DNI_METRICS, wait_grad_header="wait grad s", predictor_boundaries=_dni_boundaries,
                     copies_weights=_mixed_copies, boundary_modes=listed_modes, reads_boundaries=True,
                     synthetic_gradients=True)
SPECS = (ASYNC, MIXED)
