"""Synthetic-gradient models (DNI / cDNI): predict dLoss/dh from a stage's output h (and label).

Jaderberg et al. 2016 (arXiv 1608.05343). Each non-last stage owns one predictor for its output
boundary, with its own optimizer. The predictor's last layer starts at zero, so training
begins with a zero synthetic gradient (no update) rather than a random one.

[Note: per-position predictors]
On a sequence boundary, activations ``[B, T, C]`` of a language model with one label per
position, the vector predictors (linear, lowrank, mlp) act on each position's C features alone,
as a Linear over C shared by all positions (not over T*C): they stay small next to the stage,
do not depend on T, and cDNI appends each position's own one-hot label ``[B, T, V]``. The
gradient of the mean loss over B*T labels is O(1 / (B*T)), so ``dni.normalize_target`` scales
by the labels per batch, B*T, rather than by B.

[Note: trusting the predictor]
A zero-initialised predictor soon predicts small gradients that point nowhere in particular,
and an adaptive optimizer (Adam) turns even tiny gradients into full-size steps: the stage
then walks its weights in a direction the loss did not ask for, and with several dni
boundaries the stages after it learn from features that drift (measured: at 4 stages with Adam
1e-3 the loss stayed at chance for 60 steps, then grew 100-fold). So each predictor keeps
``agreement``, a moving average (rate ``AGREEMENT_RATE`` per fit) of the cosine between its
predictions and the true gradients that arrive, starting at 0, and a stage updates from its
synthetic gradient only while that is at least ``dni.min_cosine``. Until then it learns from
the true gradient instead, one step late, as ``async`` does (``dni.fallback: delayed``, see
pipedni/schedules/decoupled.py, [Note: the untrusted fallback]); with ``dni.fallback: frozen`` its
gradients are dropped (the optimizer skips its parameters: no step, no state change). A stage
thus uses its predictor once it has learnt, and stops again if the predictor loses track.
``dni.min_cosine: 0`` always uses it, as the paper.

Why not freeze by default: on the char LM of configs/bench_transformer_kjv.yaml plain DNI's
predictor never agrees (cosine about 0: a position's gradient is not predictable from its
features alone), so a frozen stage 0 kept its initial weights for the whole run, and the
benchmark's "dni" was the last stage training alone.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pipedni.config import DNIConfig
from pipedni.errors import ConfigError
from pipedni.optim import fused
from pipedni.precision import FP32, Precision, fp32


AGREEMENT_RATE = 0.1  # weight of each new fit's cosine in a predictor's agreement


def _zero_last(module: nn.Module) -> nn.Module:
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    return module


def _mlp(in_features: int, out_features: int, cfg: DNIConfig) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(cfg.hidden_layers):
        layers.append(nn.Linear(width, cfg.hidden_width))
        if cfg.batchnorm:
            layers.append(nn.BatchNorm1d(cfg.hidden_width))
        layers.append(nn.ReLU())
        width = cfg.hidden_width
    layers.append(_zero_last(nn.Linear(width, out_features)))
    return nn.Sequential(*layers)


def _conv(in_channels: int, out_channels: int, cfg: DNIConfig) -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = in_channels
    for _ in range(cfg.hidden_layers):
        layers.append(nn.Conv2d(channels, cfg.hidden_width, 5, padding=2))
        if cfg.batchnorm:
            layers.append(nn.BatchNorm2d(cfg.hidden_width))
        layers.append(nn.ReLU())
        channels = cfg.hidden_width
    layers.append(_zero_last(nn.Conv2d(channels, out_channels, 5, padding=2)))
    return nn.Sequential(*layers)


def is_sequence(feature_shape: tuple[int, ...]) -> bool:
    """True for a (T, C) sample: a sequence boundary with one label per position.

    See [Note: per-position predictors]."""
    return len(feature_shape) == 2


def labels_per_sample(feature_shape: tuple[int, ...]) -> int:
    """Labels one sample carries past this boundary: T on a sequence, else 1."""
    return feature_shape[0] if is_sequence(feature_shape) else 1


def make_optimizer(params: list[nn.Parameter], cfg: DNIConfig, lr: float) -> torch.optim.Optimizer:
    """A predictor's (or an input model's) own optimizer: ``dni.optimizer`` at ``lr``."""
    if cfg.optimizer == "adam":
        return fused(torch.optim.Adam, params, lr=lr)
    return fused(torch.optim.SGD, params, lr=lr, momentum=0.9)


class SyntheticGradient(nn.Module):
    """Predicts the gradient of the loss with respect to ``h`` (shape ``(B, *feature_shape)``).

    Label conditioning (cDNI) appends the one-hot label: as extra features for the vector
    predictors, as extra constant channels for ``conv`` (the label tiled over the feature map).
    On a sequence ``(B, T, C)`` the vector predictors work per position: see
    [Note: per-position predictors].
    """

    def __init__(self, feature_shape: tuple[int, ...], num_classes: int, cfg: DNIConfig):
        super().__init__()
        self.feature_shape, self.num_classes, self.cfg = tuple(feature_shape), num_classes, cfg
        self.per_position = cfg.kind != "conv" and is_sequence(self.feature_shape)
        extra = num_classes if cfg.condition_on_labels else 0
        if cfg.kind == "conv":
            if len(feature_shape) != 3:
                raise ConfigError(
                    f"dni.kind = 'conv' needs 4-D activations (B, C, H, W) but this boundary carries "
                    f"{[None, *feature_shape]}; use dni.kind=mlp (or lowrank / linear) here"
                )
            self.net = _conv(feature_shape[0] + extra, feature_shape[0], cfg)
            return
        features = feature_shape[-1] if self.per_position else math.prod(feature_shape)
        if cfg.kind == "linear":
            self.net = nn.Sequential(_zero_last(nn.Linear(features + extra, features)))
        elif cfg.kind == "lowrank":
            self.net = nn.Sequential(nn.Linear(features + extra, cfg.rank), _zero_last(nn.Linear(cfg.rank, features)))
        else:
            self.net = _mlp(features + extra, features, cfg)

    def forward(self, h: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The raw prediction, in the regression target's units (see ``dni.normalize_target``)."""
        batch = h.shape[0]
        if self.cfg.kind == "conv":
            x = h
            if self.cfg.condition_on_labels:
                onehot = F.one_hot(labels, self.num_classes).to(h.dtype)
                x = torch.cat([h, onehot[:, :, None, None].expand(-1, -1, *h.shape[2:])], dim=1)
            return self.net(x)
        # one row per sample, or per position (B*T rows of C features) on a sequence
        x = h.reshape(-1, self.feature_shape[-1]) if self.per_position else h.reshape(batch, -1)
        if self.cfg.condition_on_labels:
            x = torch.cat([x, self._onehot_rows(labels, x.shape[0], h.dtype)], dim=1)
        return self.net(x).view(batch, *self.feature_shape)

    def _onehot_rows(self, labels: torch.Tensor, num_rows: int, dtype: torch.dtype) -> torch.Tensor:
        """One-hot labels, one per row of the predictor's input (per sample or per position)."""
        if labels.numel() != num_rows:
            raise ConfigError(
                f"dni.condition_on_labels: the predictor of a {[None, *self.feature_shape]} boundary takes "
                f"{num_rows} rows but the labels have shape {list(labels.shape)}; per-position predictors "
                "need one label per position, else set dni.condition_on_labels=false"
            )
        return F.one_hot(labels.reshape(-1), self.num_classes).to(dtype)


class SyntheticGradientTrainer:
    """One boundary's predictor with its optimizer: ``predict`` for the stage's backward,
    ``fit`` on the gradients that arrive later. Converts between target units and gradients."""

    def __init__(self, feature_shape: tuple[int, ...], num_classes: int, cfg: DNIConfig, device: torch.device,
                 batch_size: Optional[int], labels_per_sample: int = 1, model: Optional[nn.Module] = None,
                 precision: Precision = FP32):
        """``precision``: the autocast its forwards run under (the engine's ``train.precision``; in a
        user's loop, whatever autocast the caller runs in)."""
        self.cfg, self.labels_per_sample, self.precision = cfg, labels_per_sample, precision
        # Gradients of a mean loss over the batch's labels are O(1 / labels per batch), for a whole
        # batch and for a microbatch of it alike (see Stage.forward's weights), hence the batch's
        # label count, not h's rows. See [Note: per-position predictors] for sequences. Without a
        # batch size (pipedni.dni.Boundary in a user's loop) each call's own rows count.
        self.batch_size = batch_size
        self.agreement = 0.0  # moving average of the fits' cosines: see [Note: trusting the predictor]
        # ``model``: a user's own predictor, called as model(h, labels) (pipedni.dni.Boundary)
        self.model = (model if model is not None else SyntheticGradient(feature_shape, num_classes, cfg)).to(device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(params, cfg, cfg.lr) if params else None
        self.dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), None)

    def _forward(self, h: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        """The model on ``h`` as its weights' dtype (a bf16 activation meets fp32 weights: autocast
        computes in bf16 all the same), under ``precision``'s autocast."""
        x = h if self.dtype is None or h.dtype == self.dtype or not h.is_floating_point() else h.to(self.dtype)
        with self.precision.autocast():
            return self.model(x, labels)

    def target_scale(self, h: torch.Tensor) -> float:
        """What a true gradient of ``h`` is multiplied by to make the O(1) regression target."""
        if not self.cfg.normalize_target:
            return 1.0
        batch = self.batch_size if self.batch_size is not None else h.shape[0]
        return float(batch * self.labels_per_sample)

    @torch.no_grad()
    def predict(self, h: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        """The synthetic gradient to backpropagate through the stage for output ``h``."""
        self.model.train()
        grad = self._forward(h, labels).to(h.dtype) / self.target_scale(h)
        if self.cfg.clip > 0:
            norms = grad.reshape(grad.shape[0], -1).norm(dim=1).clamp_min(1e-12)
            factor = (self.cfg.clip / norms).clamp(max=1.0)
            grad = grad * factor.view(-1, *([1] * (grad.dim() - 1)))
        return grad * self.cfg.output_scale

    def fit(self, h: torch.Tensor, labels: Optional[torch.Tensor], grad: torch.Tensor) -> tuple[float, float]:
        """One regression step towards the gradient that arrived for ``h``; returns the loss and
        the cosine between the prediction (before this step) and the arrived gradient."""
        target = fp32(grad) * self.target_scale(h)
        with torch.enable_grad():
            prediction = fp32(self._forward(h, labels))
            loss = F.mse_loss(prediction, target)
        if not torch.isfinite(loss):  # a non-finite gradient arrived: the stage reports it, the predictor keeps clear
            return float(loss), float("nan")
        if self.optimizer is not None:
            loss.backward()
            self.optimizer.step()
            # cleared after the step, not before the next: an optimizer that also lists the
            # predictor (a user's, over a model holding a pipedni.dni.Boundary) finds no gradient
            self.optimizer.zero_grad(set_to_none=True)
        cosine = float(F.cosine_similarity(prediction.detach().flatten(), target.flatten(), dim=0))
        self.agreement += AGREEMENT_RATE * (cosine - self.agreement)
        return float(loss.detach()), cosine

    @property
    def trusted(self) -> bool:
        """Whether the stage should update from this predictor's gradients now."""
        return self.cfg.min_cosine <= 0 or self.agreement >= self.cfg.min_cosine

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(),
                "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
                "agreement": self.agreement}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.agreement = float(state["agreement"])
