"""One stage's computation: forward, backward, gradient norm, optimizer step. It never touches the network."""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipedni.config import OptimConfig
from pipedni.crossing import PROBE_ROWS, Spec, Value, example, spec_of
from pipedni.errors import PartitionError
from pipedni.optim import build_optimizer, build_scheduler
from pipedni.precision import FP32, LossScale, Precision, fp32
from pipedni.replicas import OneReplica


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def loss_fn(scores: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of class scores ``[*, C]`` against labels ``[*]``: one label per sample for a
    classifier, one per position for a language model (the mean runs over every label)."""
    return F.cross_entropy(scores.reshape(-1, scores.shape[-1]), targets.reshape(-1), reduction=reduction)


Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (scores, labels) -> their mean loss


def _leaves(tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Each tensor cut from its graph, still needing a gradient if it did."""
    return tuple(t.detach().requires_grad_(t.requires_grad) for t in tensors)


@dataclass(frozen=True)
class TiedWeight:
    """A parameter this stage shares with other stages (an embedding and the head that reuses
    it, cut apart by pipedni.split): its name here, the index of its group of holders, and
    whether this stage counts it in the whole model's gradient norm (the first holder does)."""

    name: str
    group: int
    counted: bool
    holders: int = 2  # how many stages hold it


class NonFinite(Exception):
    """``Stage.step`` found a non-finite loss or gradient; the trainer names the step (see
    ``train.on_nonfinite``)."""


# train.on_nonfinite: skip gives up on a stage whose last this-many updates were all skipped.
MAX_SKIPPED_IN_A_ROW = 10
# fp16: skipped steps in a row (each halving the loss scale) after which the gradients are
# not overflowing but diverged: 2^16 down to 2^-24.
MAX_SCALED_SKIPS_IN_A_ROW = 40


@contextlib.contextmanager
def kept_norm_stats(module: nn.Module):
    """Batch-norm running statistics as they were before the block."""
    saved = [(b, b.clone()) for m in module.modules() if isinstance(m, nn.modules.batchnorm._NormBase)
             for b in m.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def num_correct(scores: torch.Tensor, targets: torch.Tensor) -> int:
    return int((scores.argmax(dim=-1) == targets).sum())


class Stage:
    """A slice of the model with its optimizer, holding the autograd state of microbatches in flight.

    ``forward``/``backward`` are called once per microbatch in schedule order (a key: the
    microbatch, or the step for a backward that comes steps later); the last stage also computes
    the loss, weighted by the microbatch's share of the batch so that accumulated gradients
    equal those of one full-batch step. A forward may run on stashed parameters (``stash``): its
    backward then uses the weights the forward used, whatever updates came in between. After
    ``track_updates`` a stash may also be extrapolated along the last update (weight prediction).
    Forwards run under ``precision``'s autocast; see [Note: mixed precision] in pipedni/precision.py.
    """

    def __init__(self, module: nn.Module, stage_index: int, num_stages: int, device: torch.device,
                 optim: OptimConfig, total_steps: int, on_nonfinite: str = "stop", tied: Sequence[TiedWeight] = (),
                 loss: Loss = loss_fn, precision: Precision = FP32):
        """``loss``: the last stage's, of (scores, labels), their mean (``train.loss``), taken in fp32.
        ``tied``: the parameters other stages hold too. Locked schedules sum their gradients
        over the holders before each update (``REDUCE_TIED``), so every copy stays the same;
        decoupled ones sum the copies' updates every few steps (``worker.TiedSync``)."""
        self.module = module.to(device)
        self.tied, self.loss = tuple(tied), loss
        self.stage_index, self.num_stages, self.device = stage_index, num_stages, device
        self.is_first, self.is_last = stage_index == 0, stage_index == num_stages - 1
        self.optim_cfg = optim
        self.on_nonfinite = on_nonfinite  # train.on_nonfinite
        self.optimizer = build_optimizer(self.module.parameters(), optim)
        self.scheduler = build_scheduler(self.optimizer, optim, total_steps)
        self.inputs: dict[int, torch.Tensor] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.stashes: dict[int, dict[str, torch.Tensor]] = {}  # key -> the parameters its forward ran on
        self.before: Optional[dict[str, torch.Tensor]] = None  # the weights before the last update
        self.batch_loss = 0.0  # weighted sum of microbatch losses (last stage)
        self.skipped_updates, self._skipped_in_a_row = 0, 0  # train.on_nonfinite: skip
        self.precision = precision
        self.loss_scale = LossScale() if precision.scaled else None
        self.replicas = OneReplica()  # dist.data_parallel: see pipedni/replicas.py

    @property
    def num_params(self) -> int:
        return num_params(self.module)

    @property
    def in_flight(self) -> int:
        """Forwards still awaiting their backward."""
        return len(self.outputs)

    def track_updates(self) -> None:
        """Keep the weights as they were before each update (one more copy), for ``stash(ahead)``."""
        self.before = {n: p.detach().clone() for n, p in self.module.named_parameters()}

    @torch.no_grad()
    def stash(self, ahead: int = 0) -> dict[str, torch.Tensor]:
        """A copy of the parameters for a forward whose backward comes after later updates; with
        ``ahead`` (after ``track_updates``), w + ahead x (the last update): the weights that many
        updates on, were each like the last (weight prediction, see pipedni/schedules/decoupled.py)."""
        def copy(name: str, p: torch.Tensor) -> torch.Tensor:
            if ahead and self.before is not None:
                return torch.lerp(self.before[name], p, 1.0 + ahead)
            return p.clone()
        return {n: copy(n, p).requires_grad_(p.requires_grad) for n, p in self.module.named_parameters()}

    def run(self, x: Value, params: Optional[dict[str, torch.Tensor]] = None) -> Value:
        """The module on ``x`` (a tuple is its arguments), on its own weights or on ``params``
        (from ``stash``); keeps nothing."""
        args = x if isinstance(x, tuple) else (x,)
        with self.precision.autocast():
            return self.module(*args) if params is None else torch.func.functional_call(self.module, params, args)

    def forward(self, mb: int, x: Value, target: Optional[torch.Tensor] = None,
                weight: float = 1.0, params: Optional[dict[str, torch.Tensor]] = None) -> Value:
        """Run microbatch ``mb`` (on ``params``, from ``stash``, when given); returns the detached
        output (non-last) or the loss value (last). In a tuple, the tensors that need a gradient
        say so, received and returned (see [Note: what crosses a boundary] in split/stages.py)."""
        if not self.is_first:
            x = _leaves(x) if isinstance(x, tuple) else x.detach().requires_grad_(True)
        self.inputs[mb] = x
        out = self.run(x, params)
        if params is not None:
            self.stashes[mb] = params
        if self.is_last:
            out = self.loss(fp32(out), target) * weight
            self.batch_loss += float(out.detach())
        self.outputs[mb] = out
        return _leaves(out) if isinstance(out, tuple) else out.detach()

    def backward(self, mb: int, grad: Optional[Value] = None, last: bool = False) -> Optional[Value]:
        """Backpropagate microbatch ``mb`` (from its loss, or from ``grad`` of its output: in a
        tuple, one per output that needs it); returns the gradient of its input (in a tuple, one
        per input that needs it; None on the first stage). ``last``: the step's last backward,
        which averages the step's gradients over the stage's replicas (``dist.data_parallel``)."""
        out, x = self.outputs.pop(mb), self.inputs.pop(mb)
        if last:
            self.replicas.before_last_backward(out)
        if isinstance(out, tuple):
            needing = [o for o in out if o.requires_grad]
            if needing:  # else nothing this stage computed reaches the next one's loss
                torch.autograd.backward(needing, list(grad))
        else:
            if self.is_last and self.loss_scale is not None:
                grad = torch.full_like(out, self.loss_scale.value)  # the gradient of the scaled loss
            out.backward(grad)
        stash = self.stashes.pop(mb, None)
        if stash is not None:  # the gradients landed on the stashed copy: accumulate them on the weights
            for name, p in self.module.named_parameters():
                g, stash[name].grad = stash[name].grad, None  # one copy may serve several microbatches
                if g is not None:
                    p.grad = g if p.grad is None else p.grad + g
        if self.is_first:
            return None
        if isinstance(x, tuple):  # an input this stage did not differentiate into still owes a gradient
            return tuple(t.grad if t.grad is not None else torch.zeros_like(t) for t in x if t.requires_grad)
        return x.grad

    def input_forward(self, x: torch.Tensor, target: Optional[torch.Tensor] = None,
                      weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """The module on ``x`` for the gradient of ``x`` alone (``input_grad``; nothing is kept or
        accumulated on the weights): returns ``x`` as differentiated and the output (the loss, last)."""
        x = x.detach().requires_grad_(True)
        out = self.run(x)
        return x, self.loss(fp32(out), target) * weight if self.is_last else out

    @staticmethod
    def input_grad(x: torch.Tensor, out: torch.Tensor, grad: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The gradient of ``x`` through ``out`` (from ``input_forward``) given ``grad`` of ``out``."""
        return torch.autograd.grad(out, x, grad)[0]

    @contextlib.contextmanager
    def frozen_norm_stats(self):
        """Batch-norm running statistics as they were before the block: a forward on a predicted
        input must not move the statistics evaluation uses (the true chain's). The block holds the
        backward too: batch norm's backward reads the running statistics its forward saw."""
        with kept_norm_stats(self.module):
            yield

    @property
    def clips(self) -> bool:
        """Whether ``optim.grad_clip`` is on: the schedule then supplies the norm to ``step``."""
        return self.optim_cfg.grad_clip > 0

    @property
    def needs_norm(self) -> bool:
        """Whether ``step`` needs the norm the schedule measured: to clip, or as fp16's agreed
        found-inf (see [Note: mixed precision])."""
        return self.clips or self.loss_scale is not None

    def grad_sq_norm(self) -> torch.Tensor:
        """The squared norm of this stage's accumulated gradients (float64 on the stage's device,
        zero without parameters; a tied weight only on the stage that counts it): the schedule
        sums it over stages for a whole-model norm."""
        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        elsewhere = {id(self.module.get_parameter(w.name)) for w in self.tied if not w.counted}
        for p in self.module.parameters():
            if p.grad is not None and id(p) not in elsewhere:
                sq += p.grad.detach().double().pow(2).sum()
        return sq

    def step(self, grad_norm: Optional[float] = None, source: str = "gradient", count: bool = True) -> bool:
        """Clip to ``optim.grad_clip`` given the gradient norm the schedule measured (the whole
        model's or this stage's: the schedule decides), update, advance the LR schedule (unless
        not ``count``: an extra update, not a batch's; see ``dni.si_idle_updates``). A
        non-finite loss or gradient (``source`` says where the gradient came from) raises
        ``NonFinite``, or under ``on_nonfinite: skip`` drops the update; returns whether the
        update was made. Under fp16 ``grad_norm`` is the scaled gradients' (the schedule's
        all-reduce): non-finite, every stage skips the step and lowers its loss scale alike."""
        if self.loss_scale is not None:
            grad_norm = self._unscale(grad_norm, source)
            if grad_norm is None:
                return False
        problem = self._nonfinite(grad_norm, source)
        if problem is not None:
            self._skip()
            if self.on_nonfinite == "stop" or self._skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
                more = "" if self.on_nonfinite == "stop" else f" ({MAX_SKIPPED_IN_A_ROW} updates in a row skipped)"
                raise NonFinite(problem + more)
            return False
        self._skipped_in_a_row = 0
        max_norm = self.optim_cfg.grad_clip
        if grad_norm is not None and 0 < max_norm < grad_norm:
            scale = max_norm / (grad_norm + 1e-6)
            for p in self.module.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)
        if self.before is not None:
            with torch.no_grad():
                for name, p in self.module.named_parameters():
                    self.before[name].copy_(p)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if count:
            self.scheduler.step()
        return True

    def _skip(self) -> None:
        """Drop this step's gradients; the LR schedule stays keyed to the step count."""
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # torch warns of a schedule step before any optimizer step
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()
        self.skipped_updates, self._skipped_in_a_row = self.skipped_updates + 1, self._skipped_in_a_row + 1

    def _unscale(self, grad_norm: Optional[float], source: str) -> Optional[float]:
        """fp16: the gradients divided by the loss scale and their norm, or None where the
        (agreed) scaled norm is not finite: the step is skipped and the scale lowered."""
        assert grad_norm is not None, "fp16 needs the schedule's all-reduced norm: see Stage.needs_norm"
        scale, finite = self.loss_scale.value, math.isfinite(grad_norm)
        self.loss_scale.update(finite)
        if not finite:
            self._skip()
            if self._skipped_in_a_row >= MAX_SCALED_SKIPS_IN_A_ROW:
                raise NonFinite(f"{source} at every loss scale from 2^16 down to {scale:g}")
            return None
        for p in self.module.parameters():
            if p.grad is not None:
                p.grad.mul_(1.0 / scale)
        return grad_norm / scale

    def _nonfinite(self, grad_norm: Optional[float], source: str) -> Optional[str]:
        """What is not finite about this update, or None. The norm comes from the clipping the
        schedule already measured, else from one fused pass over the gradients."""
        if self.is_last and not math.isfinite(self.batch_loss):
            return f"loss {self.batch_loss}"
        if grad_norm is None:
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            if not grads:
                return None
            grad_norm = float(torch.nn.utils.get_total_norm(grads))
        return None if math.isfinite(grad_norm) else f"{source} (norm {grad_norm})"

    def take_loss(self) -> float:
        loss, self.batch_loss = self.batch_loss, 0.0
        return loss

    @torch.no_grad()
    def evaluate(self, x: Value) -> Value:
        return self.run(x)

    def probe(self, spec: Spec) -> Spec:
        """This stage's output spec for an input of ``spec`` (``PROBE_ROWS`` zero samples, eval mode, so no
        BatchNorm statistics move; with gradients, so a tuple says which tensors need one); the
        caller turns a failure into a PartitionError."""
        was_training = self.module.training
        self.module.eval()
        try:
            out = self.run(example(spec, PROBE_ROWS, self.device))
        finally:
            self.module.train(was_training)
        tensors = out if isinstance(out, tuple) else (out,)
        if not all(isinstance(t, torch.Tensor) for t in tensors):
            raise PartitionError(
                f"stage {self.stage_index} returns {type(out).__name__}; a stage must return a tensor or a tuple of tensors"
            )
        return spec_of(out)
