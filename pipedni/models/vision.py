"""The DNI paper's image models, ``mlp`` and ``cnn``: ``nn.Sequential``s of named blocks that
can be cut between any two blocks."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from pipedni.config import ModelConfig
from pipedni.errors import ConfigError
from pipedni.models.registry import register_model


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
