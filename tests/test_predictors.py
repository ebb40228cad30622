"""Synthetic-gradient predictors: zero start, shapes, conditioning, scaling, clipping, learnability."""

from __future__ import annotations

import pytest
import torch

from pipedni.config import DNIConfig
from pipedni.dni.predictors import SyntheticGradient, SyntheticGradientTrainer
from pipedni.errors import ConfigError

CPU = torch.device("cpu")
KINDS = [("linear", (32,)), ("lowrank", (32,)), ("mlp", (32,)), ("mlp", (4, 3, 3)), ("conv", (4, 6, 6))]


@pytest.mark.parametrize("kind,shape", KINDS)
@pytest.mark.parametrize("conditioned", [False, True])
def test_prediction_starts_at_zero_and_has_the_activation_shape(kind, shape, conditioned):
    cfg = DNIConfig(kind=kind, condition_on_labels=conditioned, hidden_width=16, rank=4)
    sg = SyntheticGradientTrainer(shape, 10, cfg, CPU, batch_size=5)
    h, labels = torch.randn(5, *shape), torch.randint(10, (5,))
    predicted = sg.predict(h, labels if conditioned else None)
    assert predicted.shape == h.shape
    assert torch.count_nonzero(predicted) == 0  # the last layer starts at zero: no first update


def test_label_conditioning_adds_one_input_per_class():
    plain = SyntheticGradient((32,), 10, DNIConfig(condition_on_labels=False, kind="linear"))
    conditioned = SyntheticGradient((32,), 10, DNIConfig(kind="linear", condition_on_labels=True))
    assert plain.net[0].in_features == 32 and conditioned.net[0].in_features == 42
    conv = SyntheticGradient((4, 6, 6), 10, DNIConfig(kind="conv", condition_on_labels=True, hidden_layers=0))
    assert conv.net[0].in_channels == 14


def test_conv_predictor_rejects_flat_activations():
    with pytest.raises(ConfigError, match="dni.kind = 'conv' needs 4-D activations"):
        SyntheticGradient((32,), 10, DNIConfig(condition_on_labels=False, kind="conv"))


@pytest.mark.parametrize("kind", ["linear", "lowrank", "mlp"])
def test_predictor_learns_a_linear_gradient_field(kind):
    """The regression must actually fit: targets g = A h, as the gradient of a quadratic loss."""
    torch.manual_seed(0)
    cfg = DNIConfig(condition_on_labels=False, kind=kind, hidden_width=64, rank=16, lr=3e-3, normalize_target=False)
    sg = SyntheticGradientTrainer((16,), 10, cfg, CPU, batch_size=64)
    a = torch.randn(16, 16) / 4
    fits = [sg.fit(h, None, h @ a.T) for h in (torch.randn(64, 16) for _ in range(400))]
    (first_loss, first_cosine), (last_loss, last_cosine) = fits[0], fits[-1]
    assert last_loss < 0.1 * first_loss
    assert first_cosine == 0.0 and last_cosine > 0.9  # the zero-initialised predictor, then a good one
    h = torch.randn(256, 16)
    cosine = torch.nn.functional.cosine_similarity(sg.predict(h, None).flatten(), (h @ a.T).flatten(), dim=0)
    assert cosine > 0.9


def test_normalised_targets_are_scaled_by_the_batch_size_not_the_rows():
    """With normalize_target the model regresses on batch_size x gradient; predictions are divided
    back. Regression: the scale was h's row count, so a warm-up microbatch of B/M rows (whose
    gradients are still O(1/B)) trained the predictor M times too small for the decoupled steps."""
    cfg = DNIConfig(condition_on_labels=False, kind="linear", normalize_target=True)
    sg = SyntheticGradientTrainer((8,), 10, cfg, CPU, batch_size=16)
    with torch.no_grad():
        sg.model.net[0].bias.fill_(2.0)
    for rows in (4, 16):  # a microbatch and a whole batch get the same scale
        assert torch.allclose(sg.predict(torch.zeros(rows, 8), None), torch.full((rows, 8), 0.125))
    plain = SyntheticGradientTrainer((8,), 10, DNIConfig(condition_on_labels=False, kind="linear", normalize_target=False), CPU, batch_size=16)
    with torch.no_grad():
        plain.model.net[0].bias.fill_(2.0)
    assert torch.allclose(plain.predict(torch.zeros(4, 8), None), torch.full((4, 8), 2.0))


def test_clip_bounds_each_sample_and_output_scale_multiplies():
    cfg = DNIConfig(condition_on_labels=False, kind="linear", normalize_target=False, clip=1.0, output_scale=0.5)
    sg = SyntheticGradientTrainer((8,), 10, cfg, CPU, batch_size=4)
    with torch.no_grad():
        sg.model.net[0].bias.fill_(3.0)  # per-sample norm 3 * sqrt(8), clipped to 1, then halved
    norms = sg.predict(torch.zeros(4, 8), None).norm(dim=1)
    assert torch.allclose(norms, torch.full((4,), 0.5))


# --------------------------------------------------------------------------- sequences [B, T, C]


@pytest.mark.parametrize("kind", ["linear", "lowrank", "mlp"])
@pytest.mark.parametrize("conditioned", [False, True])
def test_sequence_predictors_act_per_position_on_the_last_dim(kind, conditioned):
    """On [B, T, C] the vector predictors take C (+ V one-hot) inputs per position, not T*C, and a
    position's prediction depends on that position's activation and label only."""
    cfg = DNIConfig(kind=kind, condition_on_labels=conditioned, hidden_width=16, rank=4, batchnorm=kind == "mlp")
    sg = SyntheticGradient((6, 8), 10, cfg).eval()
    assert sg.per_position and sg.net[0].in_features == 8 + (10 if conditioned else 0)
    torch.manual_seed(0)
    for p in sg.parameters():  # leave the zero start: make every layer matter
        torch.nn.init.normal_(p)
    h, labels = torch.randn(3, 6, 8), torch.randint(10, (3, 6))
    changed_h, changed_labels = h.clone(), labels.clone()
    changed_h[:, 2] += 1.0
    changed_labels[:, 2] = (labels[:, 2] + 1) % 10
    with torch.no_grad():
        before = sg(h, labels if conditioned else None)
        after = sg(changed_h, changed_labels if conditioned else None)
    assert before.shape == h.shape
    unchanged = [t for t in range(6) if t != 2]
    torch.testing.assert_close(after[:, unchanged], before[:, unchanged], rtol=0, atol=0)
    assert not torch.allclose(after[:, 2], before[:, 2])


def test_sequence_targets_are_scaled_by_the_labels_per_batch():
    """A mean loss over B*T labels has O(1 / (B*T)) gradients: normalize_target scales by B*T."""
    cfg = DNIConfig(condition_on_labels=False, kind="linear", normalize_target=True)
    sg = SyntheticGradientTrainer((5, 8), 10, cfg, CPU, batch_size=4, labels_per_sample=5)
    with torch.no_grad():
        sg.model.net[0].bias.fill_(2.0)
    assert torch.allclose(sg.predict(torch.zeros(2, 5, 8), None), torch.full((2, 5, 8), 0.1))


def test_four_d_activations_keep_the_flattening_predictor():
    """Only [B, T, C] goes per position: [B, C, H, W] under mlp still flattens each sample."""
    assert not SyntheticGradient((4, 3, 3), 10, DNIConfig(condition_on_labels=False, kind="mlp")).per_position
    assert SyntheticGradient((4, 3, 3), 10, DNIConfig(condition_on_labels=False, kind="mlp", hidden_layers=0)).net[0].in_features == 36


def test_per_position_cdni_needs_a_label_per_position():
    sg = SyntheticGradient((6, 8), 10, DNIConfig(kind="linear", condition_on_labels=True))
    with pytest.raises(ConfigError, match=r"takes 18 rows but the labels have shape \[3\]"):
        sg(torch.randn(3, 6, 8), torch.randint(10, (3,)))
