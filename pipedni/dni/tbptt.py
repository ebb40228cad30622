"""Truncated BPTT with synthetic gradients: a recurrent net trained on a stream in windows of T
steps, the state carried across windows, and a ``Boundary`` standing in for the future's gradient.

Window n, steps nT .. nT+T-1, from state s_0 (the previous window's last state, detached):

    s_0' = boundary.trigger(s_0)              # the gradient reaching s_0 will fit the predictor
    features, s_T = net(x_window, s_0')
    loss = loss_fn(readout(features), y_window) [+ aux_weight * aux]
    backward(loss, and from s_T the synthetic gradient output_scale * sg(s_T))
    optimizer step; carry s_T.detach() into window n+1

Plain BPTT stops every gradient at the window's start; here the window's last state also gets
sg(s_T), the predictor's estimate of what all later windows would send back (Jaderberg et al.
2016, arXiv 1608.05343, section 3.1). The predictor is fitted TD-style: its prediction at s_0
(made from the same state it saw as the previous window's end) regresses onto the gradient that
actually arrives at s_0, the window's own true gradient plus its bootstrapped sg(s_T).

[Note: the output scale as a discount]
The synthetic gradient is scaled before use (``output_scale``, 0.1 here as in the paper and in
koz4k/dni-pytorch). The scaled value is also what reaches s_0 through the window, so the TD
target is g_n + 0.1 J_n^T sg(s_T): the predictor learns a sum over future windows in which the
k-th window ahead counts 0.1^k. One backward pass gives both the weights' gradients and the
target; an unscaled target would need a second pass through the window.

[Note: the auxiliary task]
With ``aux_weight > 0`` a linear head reads the net's features at the window's first step and
predicts the predictor's raw output at the window's last state (T - 1 steps ahead); its squared
error is added to the loss, so the core also learns to carry what the future gradient depends on
(the paper's "DNI + Aux": predicting the synthetic gradient further ahead).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from pipedni.dni.interface import Boundary

State = tuple[torch.Tensor, ...]  # LSTM: (h, c); GRU: (h,), each [layers, B, hidden]


class RecurrentNet(nn.Module):
    """An LSTM or GRU over either token ids (``vocab``) or feature vectors (``inputs``), with a
    linear readout. ``forward`` maps (x [B, T, ...], state) to (features [B, T, hidden], state)."""

    def __init__(self, hidden: int, outputs: int, *, vocab: int = 0, inputs: int = 0, layers: int = 1,
                 cell: str = "lstm"):
        super().__init__()
        if (vocab > 0) == (inputs > 0):
            raise ValueError(f"RecurrentNet needs exactly one of vocab (token ids) or inputs (features); "
                             f"got vocab={vocab}, inputs={inputs}")
        if cell not in ("lstm", "gru"):
            raise ValueError(f"RecurrentNet cell = {cell!r}; use 'lstm' or 'gru'")
        self.cell, self.hidden, self.layers = cell, hidden, layers
        self.embed = nn.Embedding(vocab, hidden) if vocab else nn.Identity()
        core = nn.LSTM if cell == "lstm" else nn.GRU
        self.core = core(hidden if vocab else inputs, hidden, layers, batch_first=True)
        self.readout = nn.Linear(hidden, outputs)

    @property
    def state_features(self) -> int:
        """Features of the flattened state a synthetic-gradient predictor sees per sample."""
        return (2 if self.cell == "lstm" else 1) * self.layers * self.hidden

    def initial_state(self, batch: int, device: Optional[torch.device] = None) -> State:
        zeros = torch.zeros(self.layers, batch, self.hidden, device=device)
        return (zeros, zeros.clone()) if self.cell == "lstm" else (zeros,)

    def forward(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        features, new = self.core(self.embed(x), state if self.cell == "lstm" else state[0])
        return features, (new if self.cell == "lstm" else (new,))

    def flat(self, state: State) -> torch.Tensor:
        """[B, state_features]: every layer's h (and c), per sample."""
        return torch.cat([s.transpose(0, 1).reshape(s.shape[1], -1) for s in state], dim=1)

    def unflat(self, flat: torch.Tensor) -> State:
        parts = flat.chunk(2 if self.cell == "lstm" else 1, dim=1)
        # contiguous: cuDNN's LSTM refuses a transposed initial state ("hx is not contiguous")
        return tuple(p.reshape(p.shape[0], self.layers, self.hidden).transpose(0, 1).contiguous() for p in parts)


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class TruncatedBPTT:
    """Trains ``net`` on consecutive windows of one stream of batches, carrying its state.

    ``boundary``: a Boundary over ``net.flat(state)`` (None: plain truncated BPTT). ``aux_weight``:
    see [Note: the auxiliary task]. ``clip``: gradient-norm clipping of the net (0: off).
    """

    def __init__(self, net: RecurrentNet, loss_fn: LossFn, *, lr: float = 1e-3, clip: float = 1.0,
                 boundary: Optional[Boundary] = None, aux_weight: float = 0.0):
        if boundary is not None and boundary.cfg.condition_on_labels:
            raise ValueError("TruncatedBPTT's boundary predicts the future's gradient from the state alone; "
                             "build it with condition_on_labels=False")
        if aux_weight > 0 and boundary is None:
            raise ValueError(f"aux_weight = {aux_weight} predicts the synthetic gradient, but there is no boundary")
        self.net, self.loss_fn, self.clip, self.boundary, self.aux_weight = net, loss_fn, clip, boundary, aux_weight
        self.aux = nn.Linear(net.hidden, net.state_features) if aux_weight > 0 else None
        params = list(net.parameters()) + (list(self.aux.parameters()) if self.aux is not None else [])
        self.optimizer = torch.optim.Adam(params, lr=lr)
        self.state: Optional[State] = None

    def reset(self) -> None:
        """Forget the carried state (a new stream)."""
        self.state = None

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        """One window ([B, T, ...] inputs and targets): forward, backward, update. Returns the task's
        loss (without the auxiliary term)."""
        net, boundary = self.net, self.boundary
        net.train()
        if self.state is None or self.state[0].shape[1] != inputs.shape[0]:
            self.state = net.initial_state(inputs.shape[0], inputs.device)
        start = self.state
        if boundary is not None:
            start = net.unflat(boundary.trigger(net.flat(start)))
        features, end = net(inputs, start)
        loss = self.loss_fn(net.readout(features), targets)
        tensors, grads = [loss], [None]
        if boundary is not None:
            end_flat = net.flat(end)
            if self.aux is not None:
                tensors[0] = loss + self._aux_loss(features, end_flat)
            tensors.append(end_flat)
            grads.append(boundary.synthetic(end_flat))
        self.optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(tensors, grads)
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(net.parameters(), self.clip)
        self.optimizer.step()
        self.state = tuple(s.detach() for s in end)
        return float(loss.detach())

    def _aux_loss(self, features: torch.Tensor, end_flat: torch.Tensor) -> torch.Tensor:
        """The first step's guess at the predictor's raw output at the window's end. See
        [Note: the auxiliary task]."""
        with torch.no_grad():
            ahead = self.boundary.predictor(end_flat.detach(), None)
        return self.aux_weight * F.mse_loss(self.aux(features[:, 0]), ahead)

    @torch.no_grad()
    def evaluate(self, windows: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """Mean loss over consecutive windows of one stream, the state carried (eval mode)."""
        self.net.eval()
        state, total = None, 0.0
        for inputs, targets in windows:
            if state is None:
                state = self.net.initial_state(inputs.shape[0], inputs.device)
            features, state = self.net(inputs, state)
            total += float(self.loss_fn(self.net.readout(features), targets))
        return total / max(1, len(windows))
