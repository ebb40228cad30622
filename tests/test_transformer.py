"""The transformer language model: layer names and shapes, causality, initialisation, and
cutting it into stages."""

from __future__ import annotations

import pytest
import torch

from pipedni.config import ModelConfig
from pipedni.errors import ConfigError
from pipedni.models import build_model
from pipedni.split.partition import partition

VOCAB, SEQ = 65, 16


def tiny(depth: int = 4, seed: int = 0) -> torch.nn.Sequential:
    return build_model(ModelConfig(name="transformer", depth=depth, width=32, heads=2), (SEQ,), VOCAB, seed=seed)


def test_layers_are_embed_blocks_head_and_shapes_follow_the_sequence():
    model = tiny(depth=3)
    assert [name for name, _ in model.named_children()] == ["embed", "block0", "block1", "block2", "head"]
    ids = torch.randint(VOCAB, (5, SEQ))
    assert model.embed(ids).shape == (5, SEQ, 32)
    assert model(ids).shape == (5, SEQ, VOCAB)
    assert model(ids[:, :7]).shape == (5, 7, VOCAB)  # shorter sequences are fine
    with pytest.raises(ValueError, match="longer than the 16 positions"):
        model(torch.randint(VOCAB, (1, SEQ + 1)))


def test_attention_is_causal():
    """Changing a token changes the scores at its position and after it, never before it."""
    model = tiny().eval()
    ids = torch.randint(VOCAB, (2, SEQ))
    changed = ids.clone()
    changed[:, 9] = (changed[:, 9] + 1) % VOCAB
    with torch.no_grad():
        before, after = model(ids), model(changed)
    torch.testing.assert_close(after[:, :9], before[:, :9], rtol=0, atol=1e-6)
    assert not torch.allclose(after[:, 9:], before[:, 9:])


def test_heads_split_the_width():
    """Different head counts give different functions of the same weights."""
    one = build_model(ModelConfig(name="transformer", depth=1, width=32, heads=1), (SEQ,), VOCAB, seed=0)
    four = build_model(ModelConfig(name="transformer", depth=1, width=32, heads=4), (SEQ,), VOCAB, seed=0)
    four.load_state_dict(one.state_dict())
    ids = torch.randint(VOCAB, (2, SEQ))
    assert four.block0.attn.heads == 4 and not torch.allclose(one(ids), four(ids))


def test_initialisation_is_nanogpt_like_and_seeded():
    model = tiny(depth=8)
    assert torch.equal(model.block3.attn.qkv.weight, tiny(depth=8).block3.attn.qkv.weight)
    assert not torch.equal(model.block3.attn.qkv.weight, tiny(depth=8, seed=1).block3.attn.qkv.weight)
    assert model.embed.token.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.block0.mlp[0].weight.std().item() == pytest.approx(0.02, rel=0.1)
    # residual projections are scaled by 1 / sqrt(2 * depth) = 1 / 4
    assert model.block0.mlp[2].weight.std().item() == pytest.approx(0.005, rel=0.1)
    assert model.block0.attn.proj.weight.std().item() == pytest.approx(0.005, rel=0.15)
    assert all(torch.count_nonzero(p) == 0 for n, p in model.named_parameters() if n.endswith(".bias"))
    assert torch.equal(model.head[0].weight, torch.ones(32))  # LayerNorm: ones and zeros


def test_any_cut_composes_back_to_the_model():
    model = tiny().eval()
    ids = torch.randint(VOCAB, (3, SEQ))
    with torch.no_grad():
        expected = model(ids)
        for balance in ([1, 5], [3, 3], [2, 1, 1, 2]):
            x = ids
            for stage in partition(model, len(balance), balance):
                x = stage(x)
            torch.testing.assert_close(x, expected, rtol=0, atol=0)


def test_image_inputs_are_refused_with_the_fix():
    with pytest.raises(ConfigError, match=r"token-id inputs of shape \(seq_len,\), got \[1, 28, 28\].*data.name=kjv"):
        build_model(ModelConfig(name="transformer"), (1, 28, 28), 10, seed=0)


def test_the_gpt2_small_config_is_gpt2_small_shaped():
    """configs/gpt2_small_kjv.yaml: 12 blocks of width 768 with 12 heads over 1024 positions,
    bf16, and a layout that fits its 4 stages."""
    from pathlib import Path

    from pipedni.config import load_config
    from pipedni.schedules import registry
    from pipedni.stage import num_params

    cfg = load_config(Path(__file__).parent.parent / "configs" / "gpt2_small_kjv.yaml")
    assert (cfg.model.depth, cfg.model.width, cfg.model.heads, cfg.data.seq_len) == (12, 768, 12, 1024)
    assert cfg.train.precision == "bf16"
    registry.check_layout(cfg, 4)
    model = build_model(cfg.model, (cfg.data.seq_len,), 80, seed=0)
    assert 85e6 < num_params(model) < 87e6
