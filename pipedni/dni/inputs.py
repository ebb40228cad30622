"""Synthetic-input models (forward unlocking): predict a boundary's activation from the network input.

Jaderberg et al. 2016 (arXiv 1608.05343, section 3.3): stage i+1 need not wait for stage i's
activation h_i of step t if it can predict it from the batch's network input x_t, which every
rank has. ``SyntheticInput`` maps x to h_i; ``SyntheticInputTrainer`` gives it an optimizer,
fits it on the true activations as they arrive, and says whether it may be used yet.

[Note: trusting the input model]
A stage that trains on a poor prediction of its input learns features of inputs it will never
see, and (with several such stages) the errors compound. The input model's last layer starts
at zero, and its ``agreement`` is a moving average of the explained variance (R^2 of its
prediction against the true activations, around their batch mean) over its fits, starting at
0. A stage predicts its input only while that is at least ``dni.si_min_r2``; until then it
waits for the true activation as plain DNI does. So the feature starts neutral: a run with
``dni.synthetic_inputs`` is a DNI run until the input model has learnt.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipedni.config import DNIConfig
from pipedni.dni.predictors import AGREEMENT_RATE, make_optimizer
from pipedni.errors import ConfigError
from pipedni.precision import FP32, Precision, fp32


def _hidden(in_features: int, cfg: DNIConfig, width: int) -> tuple[list[nn.Module], int]:
    """``dni.si_hidden_layers`` of ``width`` units: as wide as the boundary, at most ``dni.hidden_width``
    (an input model wider than the layers it stands in for would cost more than they do)."""
    layers: list[nn.Module] = []
    for _ in range(cfg.si_hidden_layers):
        layers += [nn.Linear(in_features, width), nn.ReLU()]
        in_features = width
    return layers, in_features


class SyntheticInput(nn.Module):
    """Predicts a boundary activation ``(B, *feature_shape)`` from the network input ``(B, *input_shape)``.

    Float inputs (images, features) are flattened into an MLP. Integer token inputs ``(B, T)``
    map to a sequence boundary ``(B, T, C)`` position by position: a token and a position
    embedding, then an MLP over C (it cannot see the context an attention layer mixes in; its
    R^2 says how much that costs, see [Note: trusting the input model]).
    """

    def __init__(self, input_shape: tuple[int, ...], input_dtype: torch.dtype, feature_shape: tuple[int, ...],
                 vocab_size: int, cfg: DNIConfig):
        super().__init__()
        self.feature_shape = tuple(feature_shape)
        self.tokens = not input_dtype.is_floating_point
        if self.tokens:
            if len(input_shape) != 1 or len(feature_shape) != 2 or feature_shape[0] != input_shape[0]:
                raise ConfigError(
                    f"dni.synthetic_inputs: an input model maps token inputs [B, T] to a boundary [B, T, C] of the "
                    f"same T, but the network input is {[None, *input_shape]} {input_dtype} and the boundary "
                    f"{[None, *feature_shape]}; set dni.synthetic_inputs=false for this boundary")
            width = min(cfg.hidden_width, feature_shape[-1])
            self.embed = nn.Embedding(vocab_size, width)
            self.position = nn.Embedding(input_shape[0], width)
            hidden, features = _hidden(width, cfg, width)
            self.net = nn.Sequential(nn.ReLU(), *hidden, nn.Linear(features, feature_shape[-1]))
        else:
            hidden, features = _hidden(math.prod(input_shape), cfg, min(cfg.hidden_width, math.prod(feature_shape)))
            self.net = nn.Sequential(nn.Flatten(), *hidden, nn.Linear(features, math.prod(feature_shape)))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tokens:
            positions = torch.arange(x.shape[1], device=x.device)
            return self.net(self.embed(x) + self.position(positions))
        return self.net(x.float()).view(x.shape[0], *self.feature_shape)


def explained_variance(prediction: torch.Tensor, target: torch.Tensor) -> float:
    """R^2 of ``prediction`` against ``target`` around the target's mean over the batch (1: exact,
    0: no better than that mean)."""
    spread = (target - target.mean(dim=0, keepdim=True)).pow(2).sum()
    return float(1.0 - (prediction - target).pow(2).sum() / spread.clamp_min(1e-12))


class SyntheticInputTrainer:
    """One boundary's input model with its optimizer: ``predict`` a stage's input, ``fit`` it on the
    true activation when that arrives, and ``trusted`` while its R^2 is high enough."""

    def __init__(self, model: nn.Module, cfg: DNIConfig, device: torch.device, precision: Precision = FP32,
                 dtype: torch.dtype = torch.float32):
        """``dtype``: the stage input's, which a prediction stands for; ``precision``: the
        autocast the model's forwards run under."""
        self.cfg, self.model, self.precision, self.dtype = cfg, model.to(device), precision, dtype
        self.optimizer = make_optimizer(list(self.model.parameters()), cfg, cfg.si_lr)
        self.agreement = 0.0  # moving average of the fits' R^2: see [Note: trusting the input model]

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x).to(self.dtype)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.precision.autocast():
            return self.model(x)

    def fit(self, x: torch.Tensor, h: torch.Tensor) -> tuple[float, float]:
        """One regression step towards the true activation ``h`` of network input ``x``; returns the
        loss and the R^2 of the prediction before the step."""
        with torch.enable_grad():
            prediction, h = fp32(self._forward(x)), fp32(h)
            loss = F.mse_loss(prediction, h)
        if not torch.isfinite(loss):
            return float(loss), float("nan")
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        r2 = explained_variance(prediction.detach(), h)
        self.agreement += AGREEMENT_RATE * (r2 - self.agreement)
        return float(loss.detach()), r2

    @property
    def trusted(self) -> bool:
        return self.cfg.si_min_r2 <= 0 or self.agreement >= self.cfg.si_min_r2

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "agreement": self.agreement}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.agreement = float(state["agreement"])
