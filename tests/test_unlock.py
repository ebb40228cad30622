"""Forward unlocking (``dni.synthetic_inputs``): the input model, complete unlock and the
``arrived`` policy over real gloo processes, exact message accounting with one side much slower,
evaluation on the true chain, and the layouts and inputs it refuses."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipedni.config import load_config
from pipedni.dni.inputs import SyntheticInput, SyntheticInputTrainer, explained_variance
from pipedni.errors import ConfigError, LaunchError
from pipedni.export import merge_checkpoints
from pipedni.schedules import registry
from helpers import Slow, assert_every_message_received, one_line_error, read_steps, run_cli, run_distributed, train_run

SYNTHETIC = ["--data.name=synthetic", "--data.synthetic_size=2048", "--data.batch_size=32", "--run.seed=1",
             "--optim.name=adam", "--optim.lr=1e-3", "--dni.min_cosine=0", "--dni.max_staleness=3",
             "--dist.queue_size=16", "--dni.kind=linear"]


def test_input_model_learns_a_fixed_activation_stream():
    """Images to a hidden layer, and tokens to a per-position boundary: the regression's R^2 starts
    at 0 (the last layer is zero), rises far above it, and the model is trusted only then."""
    torch.manual_seed(0)
    cfg = load_config(None, ["--dni.si_min_r2=0.5"]).dni
    layer = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU())
    trainer = SyntheticInputTrainer(SyntheticInput((1, 8, 8), torch.float32, (32,), 10, cfg), cfg, torch.device("cpu"))
    assert not trainer.trusted
    r2s = []
    for _ in range(600):
        x = torch.randn(64, 1, 8, 8)
        with torch.no_grad():
            h = layer(x)
        r2s.append(trainer.fit(x, h)[1])
    assert r2s[0] <= 0.0 and min(r2s[-20:]) > 0.8, (r2s[0], r2s[-20:])
    assert trainer.trusted
    x = torch.randn(64, 1, 8, 8)
    assert explained_variance(trainer.predict(x), layer(x).detach()) > 0.8

    embed, position = torch.randn(12, 16), torch.randn(5, 16)  # a boundary of token + position features
    tokens = SyntheticInputTrainer(SyntheticInput((5,), torch.int64, (5, 16), 12, cfg), cfg, torch.device("cpu"))
    for _ in range(600):
        x = torch.randint(12, (32, 5))
        r2 = tokens.fit(x, embed[x] + position)[1]
    assert r2 > 0.9 and tokens.trusted


def _model(sleep: float = 0.015):
    """Stage 0 sleeps ``sleep`` s a microbatch (the balances below cut after Slow): the later
    stages, which predict their inputs, are much faster than the stage they wait for."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), Slow(sleep), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))


def _unlocked(rank, world_size, run_dir, overrides):
    summary, counts = train_run(rank, world_size, run_dir, overrides, _model())
    return summary, counts


def _evaluate_merged(run_dir, overrides) -> float:
    """Test accuracy of the checkpoint's weights run as one model in one process: the true chain."""
    from pipedni.data import eval_batches, load_datasets
    from pipedni.stage import num_correct

    cfg = load_config(None, [f"--run.dir={run_dir}", *overrides])
    _, test = load_datasets(cfg.data, cfg.run.seed)
    model = _model()
    model.load_state_dict(merge_checkpoints(run_dir))
    model.eval()
    with torch.no_grad():
        correct = sum(num_correct(model(x), y) for x, y in eval_batches(test, cfg.data.eval_batch_size))
    return correct / len(test)


def test_complete_unlock_runs_ahead_within_its_bound_and_evaluates_the_true_chain(tmp_path):
    """The paper's complete unlock: every later stage trains on predicted inputs at every step
    (si_policy always, no trust gate) and its synthetic gradient. The fast stages run ahead of
    the slow first one by at most dni.max_staleness steps, every message is received, the model
    learns, and the accuracy evaluation reports is the true chain's (the merged weights in one
    process give the same). The input model's state is in the checkpoint."""
    args = [*SYNTHETIC, "--train.schedule=dni", "--train.steps=80", "--train.eval_every=40",
            "--partition.balance=[4,2,3]", "--dni.synthetic_inputs=true", "--dni.si_policy=always",
            "--dni.si_min_r2=0"]
    results = run_distributed(_unlocked, 3, str(tmp_path), args, timeout=180)
    summary = results[-1][0]
    assert_every_message_received([counts for _, counts in results])
    stages = summary["stages"]
    for i in (1, 2):
        assert stages[i]["predicted_input_updates"] == summary["steps"] - 1  # all timed steps
        late = [r["si_late"] for r in read_steps(tmp_path, i)]
        assert max(late) == 3, late  # ahead as far as allowed, never further
        assert stages[i]["si_r2"] > 0.5
    assert summary["test_accuracy"] > 0.5  # chance: 0.1
    assert summary["test_accuracy"] == pytest.approx(_evaluate_merged(tmp_path, args), abs=1e-9)
    state = torch.load(tmp_path / "checkpoints" / "step_00000080" / "stage2.pt", weights_only=False)
    assert set(state["synthetic_input"]) == {"model", "optimizer", "agreement"}


@pytest.mark.slow
@pytest.mark.parametrize("slow_first", [True, False])
def test_the_arrived_policy_predicts_only_what_has_not_arrived(tmp_path, slow_first):
    """Synthetic inputs on boundary 1 only (mixed, both boundaries dni). Behind a slow stage 0,
    stage 2's inputs come late: it trains mostly on predictions and fills its waits with idle
    updates. With the slow stage last instead, stage 2's inputs have always arrived: it trains
    on them. Stage 1 has no input model either way; both runs drain exactly."""
    balance = "[4,2,3]" if slow_first else "[3,2,4]"  # Slow is layer 3: in stage 0, or moved to stage 2
    layers = list(_model(0.005))  # x 4 microbatches (train.microbatches) a step
    model = nn.Sequential(*layers) if slow_first else nn.Sequential(*(layers[i] for i in (0, 1, 2, 4, 5, 6, 3, 7, 8)))
    args = [*SYNTHETIC, "--train.schedule=mixed", "--train.boundaries=[dni,dni]", "--train.steps=60",
            f"--partition.balance={balance}", "--dni.boundaries=[{}, {synthetic_inputs: true, si_idle_updates: 2}]",
            "--dni.si_min_r2=0.2"]
    results = run_distributed(train_run, 3, str(tmp_path), args, model, timeout=180)
    assert_every_message_received([counts for _, counts in results])
    stages = results[-1][0]["stages"]
    assert "predicted_input_updates" not in stages[1]
    predicted, idle = stages[2]["predicted_input_updates"], stages[2]["idle_updates"]
    if slow_first:
        assert predicted > 30 and idle > 30, stages[2]
    else:
        assert predicted <= 3 and idle == 0, stages[2]


@pytest.mark.parametrize("overrides,error,message", [
    (["--train.schedule=1f1b", "--dni.synthetic_inputs=true"], ConfigError,
     "train.schedule = '1f1b' has no dni boundary"),
    (["--train.schedule=mixed", "--train.boundaries=[locked,dni]", "--dni.boundaries=[{synthetic_inputs: true}]"],
     LaunchError, "the boundary is locked, but stage 1 may skip the wait for its input only across a dni boundary"),
    (["--train.schedule=mixed", "--train.boundaries=[dni,async]", "--dni.synthetic_inputs=true"],
     LaunchError, "stage 1 trains on a predicted input only if it updates at once, but its own boundary is async"),
    (["--train.schedule=dni", "--dni.si_idle_updates=-1"], ConfigError, "dni.si_idle_updates = -1; must be >= 0"),
])
def test_impossible_synthetic_inputs_are_refused(overrides, error, message):
    with pytest.raises(error, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        registry.check_layout(load_config(None, overrides), 3)


def test_an_input_model_that_cannot_map_the_shapes_is_refused():
    cfg = load_config(None, []).dni
    with pytest.raises(ConfigError, match=r"maps token inputs \[B, T\] to a boundary \[B, T, C\] of the same T"):
        SyntheticInput((16,), torch.int64, (64,), 65, cfg)


def test_synthetic_inputs_on_a_locked_schedule_exit_2_with_one_line(tmp_path):
    proc = run_cli(["configs/mlp_fashion.yaml", "--dni.synthetic_inputs=true", f"--run.dir={tmp_path}"],
                   nproc=None, timeout=60)
    assert proc.returncode == 2 and "dni.synthetic_inputs is set but train.schedule" in one_line_error(proc)
