"""The model registry: a builder per built-in model's name, and ``build_model`` that seeds it.

Weights are drawn once for the whole model from ``run.seed`` and only then split, so the
initial parameters never depend on the number of stages (same seed, same weights, any N).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from pipedni.config import ModelConfig
from pipedni.errors import ConfigError
from pipedni.importing import call, import_function

ModelBuilder = Callable[[ModelConfig, tuple[int, ...], int], nn.Sequential]
MODELS: dict[str, ModelBuilder] = {}


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator adding a builder ``(cfg, input_shape, num_classes) -> nn.Sequential``."""

    def wrap(builder: ModelBuilder) -> ModelBuilder:
        MODELS[name] = builder
        return builder

    return wrap


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int, seed: int) -> nn.Module:
    """The whole model with weights drawn from ``seed`` (on CPU; stages move themselves): a
    built-in one, or the user's from ``model.factory``."""
    make = import_function("model.factory", cfg.factory) if cfg.factory else None
    if make is None and cfg.name not in MODELS:
        raise ConfigError(f"model.name = {cfg.name!r} is unknown; choose one of {', '.join(MODELS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if make is None:
            return MODELS[cfg.name](cfg, tuple(input_shape), num_classes)
        model = call("model.factory", make, cfg.factory_args)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.factory = {cfg.factory!r} returned a {type(model).__name__}; it must return an nn.Module")
    return model


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
