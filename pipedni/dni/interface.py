"""DNI inside one process: a synthetic-gradient boundary a user puts into their own model or loop.

    boundary = pipedni.dni.Boundary((256,), num_classes=10)      # in the model's __init__
    h = boundary(h, context=labels)                             # in its forward

In training mode ``boundary(h)`` backpropagates the predictor's synthetic gradient into
everything that made ``h`` at once (the layers before it can update before the rest of the
forward has even run), and returns ``h`` cut from that graph. When the true gradient of the
returned tensor arrives, in the user's ``loss.backward()`` (or bootstrapped, through a later
boundary's synthetic gradient), the predictor fits it. In eval mode, or without grad, it is
the identity. The predictor is the pipeline engine's own (``SyntheticGradientTrainer``: the same
kinds, options and trust rule as ``dni.*``), with its own optimizer.

For recurrent nets (truncated BPTT, see dni/tbptt.py) the two halves are apart:
``synthetic(h)`` is the gradient to backpropagate from a window's last state, and
``trigger(h)`` marks a window's first state, whose arriving gradient fits the predictor.

[Note: fitting inside backward]
The fit runs in a tensor hook, during the backward that carries the true gradient: a small
re-entrant backward through the predictor alone (the prediction is made from the detached
output, so nothing of the user's graph is touched). Its gradients are cleared after its own
step, so a user's optimizer that also lists the predictor (a model holding a Boundary hands
it its parameters) finds no gradient and skips it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import torch
from torch import nn

from pipedni.config import DNIConfig
from pipedni.dni.predictors import SyntheticGradientTrainer, labels_per_sample

# The predictor's options a Boundary takes (the engine's dni.* minus what only a pipeline has).
OPTIONS = ("kind", "condition_on_labels", "hidden_layers", "hidden_width", "rank", "batchnorm", "optimizer",
           "lr", "output_scale", "clip", "normalize_target", "min_cosine")


def boundary_config(feature_shape: Sequence[int], options: dict) -> DNIConfig:
    """The engine's DNIConfig with a Boundary's defaults: a conv predictor on feature maps
    ``(C, H, W)`` (as wide as the boundary's C channels), else a linear one (there is no stage to
    size ``auto`` against; in a user's Adam loop a linear predictor learnt what backprop does
    where an mlp one fell far short, and costs less: docs/results.md, "DNI in your own loop"),
    used from the start as in the paper (``min_cosine`` 0)."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TypeError(f"pipedni.dni.Boundary got unknown option(s) {unknown}; valid: {', '.join(OPTIONS)}")
    maps = len(feature_shape) == 3
    width = feature_shape[0] if maps else feature_shape[-1] if len(feature_shape) == 2 else math.prod(feature_shape)
    defaults = {"kind": "conv" if maps else "linear", "hidden_width": int(width), "min_cosine": 0.0,
                "condition_on_labels": False}
    cfg = dataclasses.replace(DNIConfig(), **{**defaults, **options})
    if cfg.kind == "auto":
        raise ValueError("pipedni.dni.Boundary(kind='auto'): auto sizes the predictor against a pipeline stage's "
                         "measured cost; pick kind='linear', 'lowrank', 'mlp' or 'conv'")
    return cfg


class Boundary(nn.Module):
    """A DNI boundary: synthetic gradient backwards at once, the true one fits the predictor.

    ``feature_shape`` is one sample's shape at the boundary (``(C,)``, ``(C, H, W)``, or ``(T, C)``
    for a sequence with one label per position). ``num_classes`` is the label count for label
    conditioning (cDNI, ``condition_on_labels=True``). ``predictor`` replaces the built-in one:
    any module called as ``predictor(h, context)`` returning a tensor shaped like ``h`` (trained by
    this boundary if it has parameters). ``batch_size`` fixes the count that normalises the
    regression target (default: the rows of each call). Other keywords are the engine's
    ``dni.*`` predictor options (``OPTIONS``), e.g. ``kind``, ``lr``, ``output_scale``, ``min_cosine``.
    """

    def __init__(self, feature_shape: Sequence[int], num_classes: int = 0, *, predictor: Optional[nn.Module] = None,
                 batch_size: Optional[int] = None, device: Optional[torch.device] = None, **options):
        super().__init__()
        shape = tuple(int(d) for d in feature_shape)
        self.cfg = boundary_config(shape, options)
        if self.cfg.condition_on_labels and num_classes < 1 and predictor is None:
            raise ValueError("pipedni.dni.Boundary(condition_on_labels=True) needs num_classes >= 1 "
                             f"(got {num_classes}): the predictor appends the one-hot label")
        self.feature_shape = shape
        self.trainer = SyntheticGradientTrainer(shape, num_classes, self.cfg, device or torch.device("cpu"),
                                                batch_size, labels_per_sample(shape), model=predictor)
        self.predictor = self.trainer.model  # a submodule: .to(), state_dict() and eval() reach it
        self.last_fit: Optional[tuple[float, float]] = None  # (regression loss, cosine) of the latest fit
        self.num_fits = 0  # true (or bootstrapped) gradients fitted so far

    @property
    def trusted(self) -> bool:
        """Whether the predictor's gradient is used now (its agreement reached ``min_cosine``)."""
        return self.trainer.trusted

    @property
    def agreement(self) -> float:
        """Moving average of the cosine between predictions and the true gradients fitted."""
        return self.trainer.agreement

    @torch.compiler.disable
    def forward(self, h: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Training: backpropagate the synthetic gradient of ``h`` now, return ``h`` detached with the
        fit attached. While the predictor is not trusted (``min_cosine``), ``h`` passes through
        unchanged (plain backprop) and the fit is still attached. Eval or no grad: ``h``."""
        if not self._active(h):
            return h
        if not self.trusted:
            return self._fit_on_backward(h.view_as(h), h.detach(), context)
        if h.requires_grad:  # nothing before it learns otherwise (a boundary on the input)
            h.backward(self.synthetic(h, context))
        return self.trigger(h, context)

    @torch.compiler.disable
    def synthetic(self, h: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The gradient to backpropagate from ``h`` (``output_scale`` applied); zeros while untrusted."""
        if not self.trusted:
            return torch.zeros_like(h)
        return self.trainer.predict(h.detach(), self._labels(context)).to(h.dtype)

    @torch.compiler.disable
    def trigger(self, h: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``h`` as a new leaf: the gradient that reaches it during backward fits the predictor
        (for a window's first state in truncated BPTT: the true gradient of the window, bootstrapped
        by the synthetic gradient at its end). Eval or no grad: ``h``."""
        if not self._active(h):
            return h
        leaf = h.detach().requires_grad_(True)
        return self._fit_on_backward(leaf, leaf.detach(), context)

    def _active(self, h: torch.Tensor) -> bool:
        return self.training and torch.is_grad_enabled() and h.is_floating_point()

    def _labels(self, context: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if self.cfg.condition_on_labels and context is None:
            raise ValueError("pipedni.dni.Boundary(condition_on_labels=True) was called without context=labels")
        return context if self.cfg.condition_on_labels else None

    def _fit_on_backward(self, out: torch.Tensor, h: torch.Tensor, context: Optional[torch.Tensor]) -> torch.Tensor:
        """``out`` with a hook fitting the predictor on (h, context) -> its gradient. See [Note: fitting inside backward]."""
        labels = self._labels(context)

        def fit(grad: torch.Tensor) -> None:
            self.last_fit = self.trainer.fit(h, labels, grad.detach())
            self.num_fits += 1

        out.register_hook(fit)
        return out

    def get_extra_state(self) -> dict:
        """The predictor's optimizer and agreement ride along in ``state_dict()``."""
        state = self.trainer.state_dict()
        del state["model"]  # the predictor's weights are this module's own entries
        return state

    def set_extra_state(self, state: dict) -> None:
        self.trainer.load_state_dict({"model": self.predictor.state_dict(), **state})

    def extra_repr(self) -> str:
        return f"feature_shape={self.feature_shape}, kind={self.cfg.kind}, output_scale={self.cfg.output_scale}"
