"""End to end: the CLI under torchrun, its outputs, and how it fails on bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from pipedni.config import load_config
from pipedni.engine import Trainer
from pipedni.errors import PartitionError, TransportError
from pipedni.runtime import Runtime
from helpers import REPO, RankFailed, needs_fashion, one_line_error, run_cli, run_distributed


@pytest.mark.slow
@needs_fashion
def test_four_stage_fashion_mnist_run_learns_and_writes_its_outputs(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(["configs/mlp_fashion.yaml", f"--run.dir={run_dir}", "--train.steps=400",
                    "--train.eval_every=200", "--data.test_limit=5000"], nproc=4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["schedule"] == "1f1b" and summary["num_stages"] == 4 and summary["steps"] == 400
    assert summary["test_accuracy"] > 0.80, summary  # chance is 0.10
    assert summary["samples_per_sec"] > 0 and summary["wall_time_sec"] > 0
    assert [s["stage_index"] for s in summary["stages"]] == [0, 1, 2, 3]
    for s in summary["stages"]:
        assert 0 < s["busy_fraction"] <= 1 and s["peak_memory_bytes"] > 0 and s["num_params"] > 0
    assert summary["stages"][-1]["bytes_sent"] > 0  # gradients flow back from the last stage
    # per-step metrics from every stage; the last stage holds the loss and the evaluations
    last = [json.loads(line) for line in (run_dir / "metrics/stage3.jsonl").read_text().splitlines()]
    steps = [r for r in last if "step" in r]
    assert len(steps) == 400 and all("loss" in r and r["samples_per_sec"] > 0 for r in steps)
    assert [r["eval_step"] for r in last if "eval_step" in r] == [200, 400]
    first = [json.loads(line) for line in (run_dir / "metrics/stage0.jsonl").read_text().splitlines()]
    assert len(first) == 400 and "loss" not in first[0] and "wait_grad_sec" in first[0]
    # checkpoints merge into the whole model's state_dict, loadable into a fresh model
    cfg = load_config(run_dir / "config.yaml")
    assert cfg.train.steps == 400
    out = tmp_path / "model.pt"
    export = subprocess.run([sys.executable, "-m", "pipedni.export", str(run_dir), str(out)],
                            capture_output=True, text=True, timeout=120)
    assert export.returncode == 0, export.stderr
    from pipedni.models import build_model

    model = build_model(cfg.model, (1, 28, 28), 10, seed=123)
    model.load_state_dict(torch.load(out))  # strict: every key present, none extra


def test_plain_python_runs_the_whole_model_in_one_process(tmp_path):
    proc = run_cli(["configs/mlp_fashion.yaml", f"--run.dir={tmp_path}", "--data.name=synthetic",
                    "--train.steps=5", "--data.synthetic_size=1024"], nproc=None, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["schedule"] == "single" and summary["num_stages"] == 1


@pytest.mark.slow
def test_config_mistakes_exit_2_with_one_line(tmp_path):
    proc = run_cli(["configs/mlp_fashion.yaml", "--train.shedule=gpipe"], nproc=None, timeout=60)
    assert proc.returncode == 2
    line = one_line_error(proc)
    assert "unknown key 'train.shedule'" in line and "schedule" in line
    proc = run_cli(["configs/mlp_fashion.yaml", "--optim.lr=fast"], nproc=None, timeout=60)
    assert proc.returncode == 2 and "optim.lr = 'fast'" in one_line_error(proc)
    proc = run_cli(["configs/nope.yaml"], nproc=None, timeout=60)
    assert proc.returncode == 2 and "does not exist" in one_line_error(proc)
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    proc = run_cli(["configs/mlp_fashion.yaml", "--data.name=synthetic", f"--run.dir={blocked}/run"], nproc=None,
                   timeout=60)  # was a traceback
    assert proc.returncode == 2 and "cannot be written (Not a directory)" in one_line_error(proc)
    proc = run_cli(["configs/mlp_fashion.yaml", "--data.name=synthetic", f"--run.dir={tmp_path}", "--resume"],
                   nproc=None, timeout=60)
    assert proc.returncode == 2 and "no checkpoint in" in one_line_error(proc)


def test_missing_data_names_the_fix(tmp_path):
    proc = run_cli(["configs/mlp_fashion.yaml", "--data.name=mnist", f"--data.root={tmp_path}"], nproc=None, timeout=60)
    assert proc.returncode == 2
    assert "python -m pipedni.data fetch mnist" in one_line_error(proc)


def test_wrong_process_count_is_a_clear_error(tmp_path):
    proc = run_cli(["configs/mlp_fashion.yaml", "--data.name=synthetic", "--partition.balance=[1,1,2]",
                    f"--run.dir={tmp_path}"], nproc=2, timeout=120)
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if "error:" in line and "[stage" in line]
    assert ours and "partition.balance = [1, 1, 2] describes 3 stages but 2 processes were started" in ours[0]
    assert "--nproc_per_node=3" in ours[0]


# --------------------------------------------------------------------------- library-level failures


@pytest.mark.parametrize("overrides,world,message", [
    (["--train.schedule=torch_1f1b", "--train.microbatches=2"], 4, "needs train.microbatches >= stages, got 2 < 4"),
    (["--train.schedule=torch_gpipe", "--data.batch_size=30"], 2, "data.batch_size = 30 does not divide into"),
    (["--train.schedule=torch_gpipe"], 1, "needs at least 2 stages"),
])
def test_peer_schedules_refuse_layouts_torch_cannot_run(overrides, world, message):
    """torch's Schedule1F1B raises a bare ValueError for M < N, and its equal-microbatch
    averaging would silently train something else on an uneven split: both fail at start-up."""
    from pipedni.engine import check_layout
    from pipedni.errors import LaunchError

    runtime = Runtime(0, world, 0, world, torch.device("cpu"), "gloo" if world > 1 else "none")
    with pytest.raises(LaunchError, match=message):
        check_layout(load_config(None, overrides), runtime)


def _config(run_dir: str):
    return load_config(None, [f"--run.dir={run_dir}", "--data.name=synthetic", "--data.synthetic_size=256",
                              "--data.batch_size=32", "--train.steps=6", "--run.log_every=1000",
                              "--dist.timeout_sec=60"])


def _mismatched(rank, world_size, run_dir):
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.Linear(64, 10))
    cfg = _config(run_dir)
    cfg.partition.balance = [2, 1]
    Trainer(cfg, Runtime(rank, world_size, rank, world_size, torch.device("cpu"), "gloo"), model=model).fit()


def test_stage_that_cannot_take_its_input_fails_at_start_up_naming_both_stages(tmp_path):
    results = run_distributed(_mismatched, 2, str(tmp_path), allow_failures=True)
    err = results[1]
    assert isinstance(err, RankFailed) and isinstance(err.error, PartitionError), err
    message = str(err.error)
    assert "stage 1 cannot take the output of stage 0, [*, 32] float32" in message
    assert "partition.balance" in message


class Unflatten(nn.Module):
    """[B, 30] -> [B, 10, 3]: scores with the classes on the wrong dimension."""

    def forward(self, x):
        return x.view(x.shape[0], 10, 3)


@pytest.mark.parametrize("last, shown", [
    (nn.Linear(32, 11), "[*, 11] float32"),  # one class too many
    (nn.Sequential(nn.Linear(32, 30), Unflatten()), "[*, 10, 3] float32"),  # classes not last
    (nn.Sequential(nn.Linear(32, 1), nn.Flatten(0)), "[*] float32"),  # no class dimension at all
])
def test_last_stage_must_end_in_class_scores_on_the_last_dimension(tmp_path, last, shown):
    """The loss takes [*, classes] scores: [B, C] (one label per sample) or [B, T, C] (one per
    position). Anything else fails at start-up with the shape and the fix, not inside the loss."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), last)
    trainer_args = (_config(str(tmp_path)), Runtime(0, 1, 0, 1, torch.device("cpu"), "none"))
    with pytest.raises(PartitionError) as info:
        Trainer(*trainer_args, model=model)
    assert f"the last stage (stage 0) outputs {shown} but the loss needs [*, 10] class scores" in str(info.value)
    assert "end the model with a layer of 10 outputs" in str(info.value)


class Explode(nn.Module):
    def __init__(self, at_call: int):
        super().__init__()
        self.calls, self.at_call = 0, at_call

    def forward(self, x):
        self.calls += 1
        if self.training and self.calls == self.at_call:
            raise RuntimeError("boom in a user layer")
        return x


def _crash_mid_run(rank, world_size, run_dir):
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), Explode(at_call=12), nn.Linear(16, 10))
    cfg = _config(run_dir)
    cfg.partition.balance = [2, 2]
    trainer = Trainer(cfg, Runtime(rank, world_size, rank, world_size, torch.device("cpu"), "gloo"), model=model)
    trainer.fit()


def test_a_failing_stage_ends_its_neighbour_instead_of_hanging(tmp_path):
    """Stage 1 raises in its 3rd step; stage 0, waiting for a gradient, must fail at once with a
    message naming stage 1 (not sit out dist.timeout_sec = 60 s)."""
    results = run_distributed(_crash_mid_run, 2, str(tmp_path), allow_failures=True, timeout=50)
    assert "boom in a user layer" in results[1].text
    assert isinstance(results[0], RankFailed) and isinstance(results[0].error, TransportError)
    assert "stage 0/2 lost the connection from stage 1" in str(results[0].error)


@pytest.mark.slow
def test_launch_wrapper_exits_with_the_stage_error_code_and_one_line(tmp_path):
    """Plain torchrun exits 1 with a traceback summary when a stage fails; pipedni.launch keeps
    the stage's exit code (2: user mistake) and its one line, printed once, not once per rank."""
    cmd = [sys.executable, "-m", "pipedni.launch", "--nproc_per_node=2", "configs/mlp_fashion.yaml",
           "--data.name=synthetic", "--partition.balance=[1,1,2]", f"--run.dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "describes 3 stages but 2 processes were started" in one_line_error(proc)
    cmd = [sys.executable, "-m", "pipedni.launch", "-n", "2", "configs/mlp_fashion.yaml", "--model.depht=3"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown key 'model.depht'" in one_line_error(proc)


def _time_limited(rank, world_size, run_dir):
    cfg = load_config(None, [
        f"--run.dir={run_dir}", "--run.log_every=1000", "--model.width=32", "--data.name=synthetic",
        "--data.batch_size=32", "--train.schedule=dni", "--train.steps=100000", "--train.eval_every=10",
        "--train.time_limit_sec=1.5", "--dni.kind=linear", "--checkpoint.enabled=true",
    ])
    trainer = Trainer(cfg, Runtime(rank, world_size, rank, world_size, torch.device("cpu"), "gloo"))
    summary = trainer.fit()
    trainer.close()
    return summary


@pytest.mark.slow
def test_time_limit_stops_every_stage_at_the_same_evaluation(tmp_path):
    """train.time_limit_sec is checked at evaluations, where the ranks agree on the largest
    training clock: a DNI first stage that runs ahead must stop at the same step as the last."""
    summary = run_distributed(_time_limited, 3, str(tmp_path), timeout=120)[-1]
    steps = summary["steps"]
    assert 0 < steps < 100000 and steps % 10 == 0
    evals = [json.loads(line) for line in (tmp_path / "metrics/stage2.jsonl").read_text().splitlines()
             if "eval_step" in line]
    assert [e["eval_step"] for e in evals] == list(range(10, steps + 1, 10))  # no second pass at the end
    clocks = [e["train_sec"] for e in evals]
    assert clocks == sorted(clocks) and clocks[-1] >= 1.5 > clocks[-2]
    assert evals[-1]["samples"] == steps * 32
    for stage in range(3):  # every stage stopped after the same step and saved it
        assert torch.load(tmp_path / f"checkpoints/step_{steps:08d}/stage{stage}.pt", weights_only=False)["step"] == steps
