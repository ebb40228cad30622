"""Built-in models, each an ``nn.Sequential`` of named layers that can be cut anywhere.

Weights are drawn once for the whole model from ``run.seed`` and only then split, so the
initial parameters never depend on the number of stages (same seed, same weights, any N).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
from torch import nn

from pipedni.config import ModelConfig
from pipedni.errors import ConfigError
from pipedni.transformer import Block, Embed, Head, init_weights

ModelBuilder = Callable[[ModelConfig, tuple[int, ...], int], nn.Sequential]
MODELS: dict[str, ModelBuilder] = {}


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator adding a builder ``(cfg, input_shape, num_classes) -> nn.Sequential``."""

    def wrap(builder: ModelBuilder) -> ModelBuilder:
        MODELS[name] = builder
        return builder

    return wrap


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int, seed: int) -> nn.Sequential:
    """The whole model with weights drawn from ``seed`` (on CPU; stages move themselves)."""
    if cfg.name not in MODELS:
        raise ConfigError(f"model.name = {cfg.name!r} is unknown; choose one of {', '.join(MODELS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[cfg.name](cfg, tuple(input_shape), num_classes)


def _hidden(linear_or_conv: nn.Module, norm: nn.Module | None) -> nn.Sequential:
    layers = [linear_or_conv] + ([norm] if norm is not None else []) + [nn.ReLU()]
    return nn.Sequential(*layers)


@register_model("mlp")
def mlp(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    """The DNI paper's fully connected net: depth x (Linear -> [BatchNorm] -> ReLU), then Linear.

    Layer names: ``layer0 .. layer{depth-1}`` and ``head``; ``layer0`` flattens its input.
    """
    in_features = 1
    for d in input_shape:
        in_features *= d
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for i in range(cfg.depth):
        block = _hidden(nn.Linear(in_features, cfg.width), nn.BatchNorm1d(cfg.width) if cfg.batchnorm else None)
        layers[f"layer{i}"] = nn.Sequential(nn.Flatten(), *block) if i == 0 else block
        in_features = cfg.width
    layers["head"] = nn.Linear(in_features, num_classes)
    return nn.Sequential(layers)


@register_model("cnn")
def cnn(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    """The DNI paper's conv net: 5x5 conv -> BatchNorm -> ReLU -> 2x2 max-pool blocks, then a classifier.

    Layer names: ``conv0 ..``, optional ``fc`` (cfg.hidden units) and ``head``. Pooling stops
    once the feature map is smaller than 2x2.
    """
    if len(input_shape) != 3:
        raise ConfigError(f"model.name = 'cnn' needs (channels, height, width) inputs, got shape {list(input_shape)}")
    channels, height, width = input_shape
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for i, out in enumerate(cfg.channels):
        conv = nn.Conv2d(channels, out, kernel_size=5, padding=2, bias=not cfg.batchnorm)
        block = _hidden(conv, nn.BatchNorm2d(out) if cfg.batchnorm else None)
        if min(height, width) >= 2:
            block.append(nn.MaxPool2d(2))
            height, width = height // 2, width // 2
        layers[f"conv{i}"] = block
        channels = out
    features = channels * height * width
    if cfg.hidden:
        layers["fc"] = nn.Sequential(nn.Flatten(), nn.Linear(features, cfg.hidden), nn.ReLU())
        layers["head"] = nn.Linear(cfg.hidden, num_classes)
    else:
        layers["head"] = nn.Sequential(nn.Flatten(), nn.Linear(features, num_classes))
    return nn.Sequential(layers)


@register_model("transformer")
def transformer(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    """A nanoGPT-style causal language model over ``num_classes`` tokens: ``[B, T]`` ids in,
    ``[B, T, num_classes]`` next-token scores out.

    Layer names: ``embed`` (token + position), ``block0 .. block{depth-1}`` (pre-LayerNorm causal
    attention + 4x MLP, cfg.width wide, cfg.heads heads) and ``head``. Positions go up to the
    input's length T; no weight tying, so ``embed`` and ``head`` may sit on different stages.
    """
    if len(input_shape) != 1:
        raise ConfigError(
            f"model.name = 'transformer' needs token-id inputs of shape (seq_len,), got {list(input_shape)}; "
            "use a text data set such as data.name=kjv"
        )
    layers: OrderedDict[str, nn.Module] = OrderedDict(embed=Embed(num_classes, input_shape[0], cfg.width))
    for i in range(cfg.depth):
        layers[f"block{i}"] = Block(cfg.width, cfg.heads)
    layers["head"] = Head(cfg.width, num_classes)
    model = nn.Sequential(layers)
    init_weights(model, cfg.depth)
    return model


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
