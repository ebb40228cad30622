"""The transformer (nanoGPT-style): token + position embedding, pre-LayerNorm causal block, the
language-model head, nanoGPT's initialisation, and the ``transformer`` model built from them."""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from pipedni.config import ModelConfig
from pipedni.errors import ConfigError
from pipedni.models.registry import register_model


class Embed(nn.Module):
    """Token ids ``[B, T]`` (int64) -> token + learned position embeddings ``[B, T, C]``."""

    def __init__(self, vocab_size: int, max_len: int, width: int):
        super().__init__()
        self.token = nn.Embedding(vocab_size, width)
        self.position = nn.Embedding(max_len, width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        length = ids.shape[1]
        if length > self.position.num_embeddings:
            raise ValueError(
                f"a sequence of {length} tokens is longer than the {self.position.num_embeddings} positions "
                "the model was built for (data.seq_len)"
            )
        positions = torch.arange(length, device=ids.device)
        return self.token(ids) + self.position(positions)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t sees positions <= t only."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        # (B, T, 3C) -> three (B, heads, T, C / heads)
        q, k, v = (t.view(batch, length, self.heads, width // self.heads).transpose(1, 2)
                   for t in self.qkv(x).split(width, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    """x + attention(LayerNorm(x)), then x + MLP(LayerNorm(x)) with a 4x GELU MLP; no dropout."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.mlp[-1].is_residual_projection = True
        self.attn.proj.is_residual_projection = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Head(nn.Sequential):
    """Final LayerNorm, then a Linear to vocabulary scores: ``[B, T, C]`` -> ``[B, T, V]``."""

    def __init__(self, width: int, vocab_size: int):
        super().__init__(nn.LayerNorm(width), nn.Linear(width, vocab_size))


def init_weights(model: nn.Module, depth: int) -> None:
    """nanoGPT's initialisation: N(0, 0.02) weights and zero biases for Linear and Embedding,
    with the residual projections (attention out, MLP out) scaled down by sqrt(2 * depth) so the
    residual stream's variance does not grow with depth. LayerNorms keep ones and zeros."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            std = 0.02 / math.sqrt(2 * depth) if getattr(module, "is_residual_projection", False) else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)


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
