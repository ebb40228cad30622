"""Truncated BPTT with synthetic gradients (pipedni.dni.tbptt), the Copy / Repeat Copy streams,
and the RNN experiments' script on tiny settings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from pipedni.data.copy_task import REPEAT_NORM, CopyStream, bits_loss
from pipedni.dni import Boundary
from pipedni.dni.tbptt import RecurrentNet, TruncatedBPTT

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


def test_copy_episode_layout_is_exact():
    stream = CopyStream(1, 3, bits=4, seed=1)
    x, y = stream.episodes(1)
    patterns = x[:3, :4]
    assert x.shape == (7, 5) and y.shape == (7, 5)
    assert torch.equal(x[3], torch.tensor([0, 0, 0, 0, 1.0]))  # the delimiter alone
    assert torch.all(x[4:] == 0) and torch.all(y[:4] == 0)
    assert torch.equal(y[4:, :4], patterns) and torch.all(y[4:, 4] == 1)  # copied, scored


def test_repeat_copy_episode_layout_is_exact():
    stream = CopyStream(1, 2, repeats=3, bits=4, seed=2)
    x, y = stream.episodes(1)
    assert x.shape == (2 + 1 + 6 + 1, 6) and y.shape == (10, 6)
    assert x[2, 4] == 1 and x[2, 5] == pytest.approx(3 / REPEAT_NORM)
    assert torch.equal(y[3:9, :4], x[:2, :4].repeat(3, 1))
    assert torch.all(y[3:9, 4] == 0) and y[9, 4] == 1  # the end marker comes last
    assert torch.all(y[3:, 5] == 1) and torch.all(y[:3, 5] == 0)  # scored: outputs and end marker


def test_windows_cut_one_continuous_stream_per_row():
    """Windows of 3 read the same steps as windows of 6 would: nothing is dropped or repeated."""
    a, b = CopyStream(2, 2, seed=5), CopyStream(2, 2, seed=5)
    xa = torch.cat([a.window(3)[0] for _ in range(8)], dim=1)
    xb = torch.cat([b.window(6)[0] for _ in range(4)], dim=1)
    assert torch.equal(xa, xb)


def test_bits_loss_scores_only_masked_steps():
    targets = torch.tensor([[[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]]])  # step 0 unscored, step 1 scored
    logits = torch.tensor([[[-50.0, 50.0], [0.0, 0.0]]])
    assert bits_loss(logits, targets).item() == pytest.approx(2.0)  # 2 channels at 1 bit each


def trainer(boundary=None, aux=0.0, seed=0):
    torch.manual_seed(seed)
    net = RecurrentNet(16, 8, inputs=9, cell="lstm")
    return TruncatedBPTT(net, bits_loss, boundary=boundary, aux_weight=aux)


def test_a_zero_synthetic_gradient_is_plain_truncated_bptt():
    """A never-trusted predictor sends zeros: the net's weights equal plain truncated BPTT's."""
    plain, dni = trainer(), trainer(Boundary((32,), min_cosine=1.1))
    stream_a, stream_b = CopyStream(4, 2, seed=0), CopyStream(4, 2, seed=0)
    for _ in range(6):
        plain.step(*stream_a.window(3))
        dni.step(*stream_b.window(3))
    for (name, p), q in zip(plain.net.named_parameters(), dni.net.parameters()):
        assert_close(p, q, msg=name)
    assert dni.boundary.num_fits == 6


@pytest.mark.parametrize("cell,aux", [("lstm", 0.0), ("gru", 1.0)])
def test_every_window_drains_its_gradient_and_the_predictor_learns(cell, aux):
    """Each window's first state receives its gradient (one fit per window), no graph is carried
    into the next window, and the TD regression error falls: a frozen net reads a text of period
    3 in windows of 2, so the gradient from the future is a function of the state (its phase)."""
    torch.manual_seed(0)
    net = RecurrentNet(16, 3, vocab=3, cell=cell)

    def loss_fn(logits, targets):
        return F.cross_entropy(logits.reshape(-1, 3), targets.reshape(-1))

    boundary = Boundary((net.state_features,), output_scale=0.1, lr=3e-3)
    run = TruncatedBPTT(net, loss_fn, lr=0.0, boundary=boundary, aux_weight=aux)
    text = (torch.arange(4 * 300).reshape(4, 300) + torch.arange(4)[:, None]) % 3  # 4 streams, shifted
    errors = []
    for window in range(120):
        i = 2 * window
        run.step(text[:, i:i + 2], text[:, i + 1:i + 3])
        assert boundary.num_fits == window + 1
        assert all(not s.requires_grad and s.grad_fn is None for s in run.state)
        errors.append(boundary.last_fit[0])
    assert sum(errors[-20:]) < 0.2 * sum(errors[:20])
    assert run.evaluate([(text[:, :2], text[:, 1:3])]) > 0


def test_flat_state_round_trips():
    net = RecurrentNet(5, 3, vocab=7, layers=2)
    state = tuple(torch.randn(2, 4, 5) for _ in range(2))
    flat = net.flat(state)
    assert flat.shape == (4, net.state_features) == (4, 20)
    assert all(torch.equal(a, b) for a, b in zip(net.unflat(flat), state))


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="exactly one of vocab"):
        RecurrentNet(4, 2)
    with pytest.raises(ValueError, match="aux_weight"):
        TruncatedBPTT(RecurrentNet(4, 2, inputs=3), bits_loss, aux_weight=1.0)
    with pytest.raises(ValueError, match="condition_on_labels=False"):
        TruncatedBPTT(RecurrentNet(4, 2, inputs=3), bits_loss,
                      boundary=Boundary((8,), num_classes=2, condition_on_labels=True))
    with pytest.raises(ValueError, match="length >= 1"):
        CopyStream(2, 0)


@pytest.mark.slow
def test_the_experiment_script_runs_each_task(tmp_path):
    """scripts/dni_rnn.py, one tiny cell per task (the LM on a small text in kjv's format)."""
    (tmp_path / "kjv").mkdir()
    verses = ["In the beginning God created the heaven and the earth."] * 400
    (tmp_path / "kjv" / "kjv.jsonl").write_text("".join(json.dumps({"text": v}) + "\n" for v in verses))
    tiny = ["--hidden", "8", "--batch", "4", "--copy-steps", "120", "--group-steps", "20", "--lm-chars", "60",
            "--evals", "2", "--test-chars", "2000", "--test-batch", "2", "--data-root", str(tmp_path)]
    for task, method in (("copy", "dni"), ("repeat", "dni_aux"), ("lm", "dni")):
        cell = json.dumps({"task": task, "method": method, "window": 3, "seed": 0})
        out = subprocess.run([sys.executable, str(ROOT / "scripts" / "dni_rnn.py"), "--out", str(tmp_path / "r"),
                              "--one", cell, *tiny], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert ("bpc" in result) == (task == "lm") and result["method"] == method
