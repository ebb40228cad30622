"""dist.data_parallel: each stage replicated D times, each replica on its share of the global
batch, gradients averaged over the replicas: 2 stages x 2 replicas train what one process
trains at the same global batch (a locked schedule), or what one process applying the same
delays trains (async); dni's replicas, whose predictors each fit their own share, stay equal;
one replica writes the checkpoints and the summary; the launch scripts place a replicated job
on several nodes, as two torchrun agents here show."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipedni.engine import Trainer
from pipedni.export import merge_checkpoints
from pipedni.runtime import Runtime
from helpers import REPO, assert_same_parameters, free_port, make_config, one_line_error, read_steps, run_cli, \
    run_distributed, train_single
from references import mixed_reference

EXTRA = ("--data.batch_size=32",)  # 16 a replica: 4 equal microbatches for torch's schedules
CASES = [("1f1b", 4, ()), ("gpipe", 4, ()), ("torch_1f1b", 4, ()), ("naive", 1, ("--train.precision=bf16",))]
# name, schedule, microbatches, settings; a dni stage starts untrusted (its fallback: delayed
# updates) and at this min_cosine comes to trust its predictor within the run
DECOUPLED = [("async", "async", 1, ()), ("mixed", "mixed", 2, ("--train.boundaries=[async]",)),
             ("cdni", "dni", 2, ("--dni.condition_on_labels=true", "--train.steps=12",
                                    "--dni.min_cosine=0.05"))]


def _train_cases(rank: int, world_size: int, root: str) -> list:
    summaries = []
    runtime = Runtime(rank, world_size, rank, world_size, torch.device("cpu"), "gloo", num_replicas=2)
    for schedule, m, extra in CASES:
        cfg = make_config(Path(root) / schedule, schedule, m, *EXTRA, "--dist.data_parallel=2", *extra)
        trainer = Trainer(cfg, runtime)
        summaries.append(trainer.fit())
        trainer.close()
    for name, schedule, m, extra in DECOUPLED:  # each replica's weights, to compare with the other's
        trainer = Trainer(make_config(Path(root) / name, schedule, m, *EXTRA, "--dist.data_parallel=2", *extra),
                          runtime)
        trainer.fit()
        trainer.close()
        summaries.append(torch.nn.utils.parameters_to_vector(trainer.worker.stage.module.parameters()).tolist())
    return summaries


def test_two_stages_by_two_replicas_train_what_one_process_trains(tmp_path):
    """Gradients averaged over the replicas by DDP's reducer equal one process's on the whole
    batch (within float summation order); checkpoints hold one file per stage; replica 0's last
    stage writes the summary, the other replica its own metrics."""
    references = {"fp32": train_single(tmp_path / "single", *EXTRA),
                  "bf16": train_single(tmp_path / "single-bf16", *EXTRA, "--train.precision=bf16")}
    summaries = run_distributed(_train_cases, 4, str(tmp_path), timeout=240)
    for i, (schedule, m, extra) in enumerate(CASES):
        expected, reference = references["bf16" if extra else "fp32"]
        run = tmp_path / schedule
        # bf16: each replica's half-batch matmul rounds in 16 bits apart from the whole batch's
        assert_same_parameters(merge_checkpoints(run), expected, f"{schedule} 2x2", atol=3e-3 if extra else 1e-6)
        assert sorted(p.name for p in next((run / "checkpoints").iterdir()).glob("*.pt")) == ["stage0.pt", "stage1.pt"]
        summary = summaries[1][i]  # rank 1: replica 0's last stage
        assert summary["data_parallel"] == 2 and [s["stage_index"] for s in summary["stages"]] == [0, 1]
        assert [[r["stage_index"] for r in s["replicas"]] for s in summary["stages"]] == [[0, 0], [1, 1]]
        assert summary["test_loss"] == pytest.approx(reference["test_loss"], rel=1e-2 if extra else 1e-4)
        assert all(s is None for s in (summaries[0][i], summaries[2][i], summaries[3][i]))
        assert (run / "replicas/1/metrics/stage1.jsonl").is_file()
    for j, (name, schedule, m, extra) in enumerate(DECOUPLED, start=len(CASES)):
        for stage in (0, 1):  # ranks 0, 2 hold stage 0; 1, 3 stage 1
            assert summaries[stage][j] == summaries[stage + 2][j], f"{name}: stage {stage}'s replicas differ"
        if schedule == "dni":
            untrusted = [r["sg_untrusted"] for r in read_steps(tmp_path / name, 0) if "sg_untrusted" in r]
            assert untrusted[0] == 1 and 0 in untrusted, untrusted  # agreed both ways: fallback, then the predictor
            continue
        cfg = make_config(tmp_path / name, schedule, m, *EXTRA, *extra)
        expected = mixed_reference(cfg, 2, ["async"], m, cfg.train.steps)[0]
        assert_same_parameters(merge_checkpoints(tmp_path / name), expected, f"{name} 2x2")
    # resumed by one process (one replica of one stage), the run goes on as one process's would
    resumed, _ = train_single(tmp_path / "1f1b", *EXTRA, "--train.steps=6", "--checkpoint.resume=latest")
    longer, _ = train_single(tmp_path / "single6", *EXTRA, "--train.steps=6")
    assert_same_parameters(resumed, longer, "resumed with one replica")


def test_bad_replica_layouts_are_one_clear_line():
    base = ["configs/mlp_fashion.yaml", "--data.name=synthetic", "--train.steps=1"]
    launch = [sys.executable, "-m", "pipedni.launch"]
    cases = [(["--nproc_per_node=3", *base, "--dist.data_parallel=2"], "do not divide into dist.data_parallel = 2"),
             (["--nproc_per_node=4", *base, "--dist.data_parallel=2", "--data.batch_size=127"],
              "does not divide into dist.data_parallel = 2 equal shares"),
             (["--nproc_per_node=4", *base, "--dist.data_parallel=2", "--train.schedule=dni",
               "--dni.synthetic_inputs=true"], "with dni.synthetic_inputs a stage's updates depend on when"),
             (["--nproc_per_node=4", *base, "--dist.data_parallel=0"], "dist.data_parallel = 0; must be >= 1")]
    for args, message in cases:
        proc = subprocess.run(launch + args, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in one_line_error(proc), proc.stderr
    proc = run_cli([*base, "--dist.data_parallel=2"], 3, timeout=120)  # torchrun itself: each rank says it
    assert proc.returncode != 0 and "replicas do not divide the 3 processes started" in proc.stderr


def test_the_slurm_script_prints_the_line_each_node_runs(tmp_path):
    """launch/slurm.sh under the environment a 2-node Slurm allocation sets (scontrol stood in)."""
    (tmp_path / "scontrol").write_text("#!/bin/sh\necho node7\necho node8\n")
    (tmp_path / "scontrol").chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", DRY_RUN="1", SLURM_GPUS_ON_NODE="4",
               SLURM_JOB_NODELIST="node[7-8]", SLURM_NNODES="2", SLURM_JOB_ID="42", SLURM_JOB_NAME="lm")
    out = subprocess.run(["bash", "launch/slurm.sh", "configs/gpt2_small_kjv.yaml", "--dist.data_parallel=2"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=30, check=True).stdout
    assert out.split() == ["srun", "torchrun", "--nnodes=2", "--nproc_per_node=4", "--rdzv_id=42",
                           "--rdzv_backend=c10d", "--rdzv_endpoint=node7:29500", "--max-restarts=3", "-m",
                           "pipedni.train", "configs/gpt2_small_kjv.yaml", "--run.name=lm-42",
                           "--checkpoint.every_steps=500", "--dist.data_parallel=2"]


@pytest.mark.slow
def test_two_torchrun_agents_run_a_replicated_pipeline_as_one_process_would(tmp_path):
    """launch/multinode.sh on two 'nodes' of this machine (two torchrun agents of 2 processes,
    a static rendezvous on 127.0.0.1): 2 stages x 2 replicas, node 1 holding replica 1, train
    what one process trains."""
    args = [*make_args(), f"--run.dir={tmp_path / 'two_nodes'}"]
    env = dict(os.environ, HEAD="127.0.0.1", NNODES="2", NPROC="2", PORT=str(free_port()), OMP_NUM_THREADS="1")
    nodes = [subprocess.Popen(["bash", "launch/multinode.sh", *args], cwd=REPO, env=dict(env, NODE_RANK=str(n)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for n in (0, 1)]
    outputs = [node.communicate(timeout=240)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), outputs
    expected, _ = train_single(tmp_path / "single", *EXTRA)
    assert_same_parameters(merge_checkpoints(tmp_path / "two_nodes"), expected, "two agents")
    summary = json.loads((tmp_path / "two_nodes" / "summary.json").read_text())
    assert summary["data_parallel"] == 2 and summary["num_stages"] == 2


def make_args() -> list[str]:
    """make_config's settings as the command line gives them (the config file supplies the rest)."""
    return ["configs/mlp_fashion.yaml", "--run.seed=3", "--run.log_every=1000", "--model.name=mlp", "--model.depth=3",
            "--model.width=32", "--data.name=synthetic", "--data.synthetic_size=256", "--data.batch_size=32",
            "--data.eval_batch_size=64", "--partition.method=uniform", "--train.schedule=1f1b",
            "--train.microbatches=4", "--train.steps=4", "--train.eval_every=0", "--optim.name=sgd", "--optim.lr=0.1",
            "--optim.momentum=0.9", "--dist.data_parallel=2"]
