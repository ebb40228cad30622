"""Mixed boundaries (``train.schedule: mixed``) equal one process applying the same rules.

The reference (tests/references.py) is written apart from the engine: plain modules and optimizers, stage i's
true backward of step s at "time" s + d_i (a deep copy of the stage for each delayed forward
under weight stashing, a recomputation under features replay; with weight prediction the
delayed forward runs on the weights extrapolated d_i updates along the last one), and for a
dni boundary a predictor of the same kind (zero-initialised, so equal at the start)
predicting at each forward and fitting each true gradient once stage i+1 has sent it. A pipelined run over real gloo
processes must match it parameter by parameter, predictors included, send every message
exactly once and end with nothing in flight. The async schedule is the case "every boundary
async, one microbatch" (tests/test_delayed.py checks it against this same reference).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipedni import data as datasets
from pipedni.config import load_config
from pipedni.engine import Trainer
from pipedni.errors import ConfigError, LaunchError
from pipedni.export import merge_checkpoints
from pipedni.optim import build_optimizer
from pipedni.runtime import Runtime
from pipedni.schedules import registry
from pipedni.stage import loss_fn
from helpers import assert_every_message_received, read_steps, run_distributed
from references import mixed_reference, stages_of

STEPS = 6
NUM_STAGES = 3


def make_config(run_dir: Path, *extra: str):
    return load_config(None, [
        f"--run.dir={run_dir}", "--run.seed=3", "--run.log_every=1000", "--model.name=mlp", "--model.depth=4",
        "--model.width=24", "--data.name=synthetic", "--data.synthetic_size=256", "--data.batch_size=20",
        "--partition.method=uniform", "--train.schedule=mixed", f"--train.steps={STEPS}", "--train.microbatches=2",
        "--optim.name=sgd", "--optim.lr=0.1", "--optim.momentum=0.9", "--dni.kind=linear", "--dni.lr=0.01",
        *extra,
    ])


# (name, boundaries, extra overrides): each a different rule for some stage
CASES = [
    ("locked", ["locked", "locked"], ()),
    ("async_locked", ["async", "locked"], ()),
    ("locked_async_replay", ["locked", "async"], ("--delayed.weight_stashing=false",)),
    ("dni_async", ["dni", "async"], ("--dni.max_staleness=1", "--dni.condition_on_labels=true",
                                     "--dni.min_cosine=0")),
    ("dni_async_until_trusted", ["dni", "async"], ("--dni.max_staleness=1", "--dni.min_cosine=0.15")),
    ("dni_async_until_trusted_replay", ["dni", "async"], ("--dni.max_staleness=1", "--dni.min_cosine=0.15",
                                                          "--delayed.weight_stashing=false")),
    ("dni_async_frozen_until_trusted", ["dni", "async"], ("--dni.max_staleness=1", "--dni.min_cosine=0.15",
                                                          "--dni.fallback=frozen")),
    ("locked_dni_warmup", ["locked", "dni"], (f"--dni.warmup_steps={STEPS - 1}",)),
]


def _config(root: Path, name: str, modes: list[str], extra: tuple[str, ...]):
    return make_config(root / name, f"--train.boundaries=[{','.join(modes)}]", *extra)


def _train_cases(rank: int, world_size: int, root: str) -> list:
    runtime = Runtime(rank, world_size, rank, world_size, torch.device("cpu"), "gloo")
    out = []
    for name, modes, extra in CASES:
        trainer = Trainer(_config(Path(root), name, modes, extra), runtime)
        trainer.fit()
        trainer.close()  # raises if any message was left unconsumed
        end = getattr(trainer.worker, "gradients", None)
        state = None if end is None else {k: v.numpy().copy() for k, v in end.sg.model.state_dict().items()}
        out.append((trainer.worker.transport.counts(), state))  # numpy: plain pickles across processes
    return out


def test_mixed_boundaries_equal_a_single_process_applying_the_same_rules(tmp_path):
    """Locked, async (stashed and replayed) and dni boundaries, with a warm-up, in three stages
    and two microbatches: every parameter and predictor weight equals the reference."""
    results = run_distributed(_train_cases, NUM_STAGES, str(tmp_path), timeout=300)
    for c, (name, modes, extra) in enumerate(CASES):
        cfg = _config(tmp_path, name, modes, extra)
        expected, predictors = mixed_reference(cfg, NUM_STAGES, modes, cfg.train.microbatches, STEPS)
        merged = merge_checkpoints(tmp_path / name)
        assert merged.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(merged[key], expected[key], rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{name} {key}: {m}")
        for i, state in predictors.items():
            for key, value in state.items():
                torch.testing.assert_close(torch.from_numpy(results[i][c][1][key]), value, rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"{name} predictor {i} {key}: {m}")
        assert_every_message_received([per_rank[c][0] for per_rank in results])
    for name in ("dni_async_until_trusted", "dni_async_frozen_until_trusted"):
        gate = [r["sg_untrusted"] for r in read_steps(tmp_path / name, 0) if "sg_untrusted" in r]
        assert 0 in gate and 1 in gate, (name, gate)  # the predictor was untrusted, then trusted


def test_all_locked_mixed_is_plain_backprop_and_the_rules_matter(tmp_path):
    """The reference with every boundary locked is one process's backprop (so the parity above
    covers locked exactly), and every other case trains something else."""
    cfg = _config(tmp_path, "x", ["locked", "locked"], ())
    locked, _ = mixed_reference(cfg, NUM_STAGES, ["locked", "locked"], 2, STEPS)
    train_set, model, _ = stages_of(cfg, NUM_STAGES)
    opt = build_optimizer(model.parameters(), cfg.optim)
    for _, x, y in datasets.train_batches(train_set, cfg.data.batch_size, cfg.run.seed, STEPS):
        loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(locked[key], value, rtol=1e-5, atol=1e-6)
    for name, modes, extra in CASES[1:]:
        other, _ = mixed_reference(_config(tmp_path, name, modes, extra), NUM_STAGES, modes, 2, STEPS)
        assert any(not torch.allclose(other[k], locked[k]) for k in locked), name


@pytest.mark.parametrize("modes,extra,message", [
    (["dni"], (), "has 1 entries but 3 stages have 2 boundaries"),
    (["dni", "async"], (), "train.boundaries[0] = dni (stage 0 -> 1): stage 1 returns gradients 2 step(s) late"),
    (["dni", "async"], ("--dni.max_staleness=2", "--dni.warmup_steps=5"), "cannot warm up locked"),
    (["async", "async"], ("--delayed.delay=3", "--dist.queue_size=8", "--train.microbatches=2"),
     "raise dist.queue_size to at least 9"),
])
def test_impossible_mixes_name_the_boundary(modes, extra, message):
    cfg = load_config(None, ["--train.schedule=mixed", f"--train.boundaries=[{','.join(modes)}]",
                             "--delayed.delay=2", "--dni.max_staleness=1", *extra])
    with pytest.raises(LaunchError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        registry.check_layout(cfg, NUM_STAGES)


@pytest.mark.parametrize("overrides,message", [
    (["--train.schedule=mixed", "--train.boundaries=[locked,dnni]"], "train.boundaries[1] = 'dnni' is not a boundary mode"),
    (["--train.boundaries=[dni]"], "is read only by train.schedule: mixed (it is '1f1b')"),
    (["--train.schedule=dni", "--dni.boundaries=[{warmup_steps: -1}]"], "warmup_steps = -1; must be >= 0"),
])
def test_bad_boundary_lists_are_refused_before_any_stage_starts(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        registry.check_config(load_config(None, overrides))


def test_a_fallback_later_than_the_staleness_bound_is_refused():
    """Stage 1 (after a dni boundary, before an async one) falls back 2 steps late: stage 0 must
    be allowed to wait that long for its gradients, or the two would wait on each other."""
    cfg = load_config(None, ["--train.schedule=mixed", "--train.boundaries=[dni,dni,async]", "--dni.max_staleness=1"])
    with pytest.raises(LaunchError, match=r"train.boundaries\[1\] = dni \(stage 1 -> 2\): while its predictor is "
                                          r"untrusted stage 1 sends stage 0 its gradients 2 steps late"):
        registry.check_layout(cfg, 4)
    registry.check_layout(load_config(None, ["--train.schedule=mixed", "--train.boundaries=[dni,dni,async]",
                                             "--dni.max_staleness=1", "--dni.boundaries=[{}, {fallback: frozen}]"]), 4)


def test_per_boundary_warm_up_needs_mixed():
    cfg = load_config(None, ["--train.schedule=dni", "--dni.boundaries=[{}, {warmup_steps: 10}]"])
    with pytest.raises(LaunchError, match="use train.schedule: mixed"):
        registry.check_layout(cfg, NUM_STAGES)


def test_a_bad_boundary_mode_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipedni.train", "configs/mlp_fashion.yaml", "--train.schedule=mixed",
                           "--train.boundaries=[lockd]", f"--run.dir={tmp_path}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "train.boundaries[0] = 'lockd'" in lines[0] and "Traceback" not in proc.stderr
