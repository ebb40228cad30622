"""A user's own model under the engine: ``model.factory`` builds it, ``pipedni.split`` cuts it,
and every locked schedule (torch's own included) trains it exactly as one process would, with
several tensors per boundary, a skip relayed through a stage, an integer tensor without
gradient, and batch norm.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipedni import data as datasets
from pipedni.config import load_config
from pipedni.crossing import input_split
from pipedni.engine import Trainer, with_saved_balance
from pipedni.errors import PartitionError, PipeDNIError
from pipedni.export import merge_checkpoints
from pipedni.models import build_model
from pipedni.optim import build_optimizer
from pipedni.runtime import Runtime
from pipedni.schedules import registry
from pipedni.split.cut import cut_model
from pipedni.stage import loss_fn
from helpers import REPO, RankFailed, run_cli, assert_same_parameters, free_port, one_line_error, run_distributed
from own_models import Lopsided, ResNet

TESTS = Path(__file__).resolve().parent
SKIP_NET = ("--model.factory=own_models:skip_net", "--data.synthetic_shape=[8]")
RESNET = ("--model.factory=own_models:resnet18", "--model.factory_args={width: 4}",
          "--model.split_points=[layer2, layer4]", "--data.synthetic_shape=[1, 28, 28]")


def make_config(run_dir: Path, schedule: str, microbatches: int, *extra: str):
    return load_config(None, [
        f"--run.dir={run_dir}", "--run.seed=3", "--run.log_every=1000", "--data.name=synthetic",
        "--data.synthetic_size=256", "--data.batch_size=30", "--data.eval_batch_size=64",
        f"--train.schedule={schedule}", f"--train.microbatches={microbatches}", "--train.steps=4",
        "--optim.name=sgd", "--optim.lr=0.1", "--optim.momentum=0.9", *extra,
    ])


CASES = [("skip", "naive", 1), ("skip", "gpipe", 4), ("skip", "1f1b", 4), ("skip", "torch_1f1b", 3),
         ("resnet", "gpipe", 3), ("resnet", "1f1b", 3), ("ids", "1f1b", 3), ("tagged", "1f1b", 3),
         ("tagged", "torch_gpipe", 3)]
# ids: the first cut carries integer ids alone (no gradient travels back over it); tagged: the
# data gives two inputs, features and an integer tag, that the model's forward takes
TAGGED = ("--model.factory=own_models:tagged", "--data.factory=own_models:tagged_data",
          "--model.split_points=[body.2, head]")
MODELS = {"skip": SKIP_NET, "resnet": RESNET, "tagged": TAGGED,
          "ids": ("--model.factory=own_models:bucketed", "--data.synthetic_shape=[8]", "--model.split_points=[embed, head]")}


def _train_cases(rank: int, world_size: int, root: str) -> list:
    runtime = Runtime(rank, world_size, rank, world_size, torch.device("cpu"), "gloo")
    summaries = []
    for model, schedule, m in CASES:
        trainer = Trainer(make_config(Path(root) / f"{model}-{schedule}", schedule, m, *MODELS[model]), runtime)
        summaries.append(trainer.fit())
        trainer.close()
    return summaries


def one_process_over_microbatches(cfg) -> dict[str, torch.Tensor]:
    """The exact reference for a model with batch norm: one process running the same
    microbatches in order, accumulating their weighted losses, one SGD step per batch."""
    train_set, _ = datasets.load_datasets(cfg.data, cfg.run.seed)
    model = build_model(cfg.model, (), train_set.num_classes, cfg.run.seed)
    optimizer = build_optimizer(model.parameters(), cfg.optim)
    for _, inputs, targets in datasets.train_batches(train_set, cfg.data.batch_size, cfg.run.seed, cfg.train.steps, 0):
        for x, t in zip(input_split(inputs, cfg.train.microbatches), torch.tensor_split(targets, cfg.train.microbatches)):
            (loss_fn(model(*x) if isinstance(x, tuple) else model(x), t) * (t.shape[0] / targets.shape[0])).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.state_dict()


def test_locked_schedules_on_split_models_match_one_process(tmp_path):
    summaries = run_distributed(_train_cases, 3, str(tmp_path), timeout=300)
    # SkipNet has no batch norm: the single schedule is its reference
    single = Trainer(make_config(tmp_path / "single", "single", 1, *SKIP_NET), Runtime(0, 1, 0, 1, torch.device("cpu"), "none"))
    single_summary = single.fit()
    expected = merge_checkpoints(tmp_path / "single")
    for i, (model, schedule, m) in enumerate(CASES):
        merged = merge_checkpoints(tmp_path / f"{model}-{schedule}")
        if model != "skip":  # the reference runs the same microbatches (batch norm: buffers must match too)
            expected = one_process_over_microbatches(make_config(tmp_path / "ref", schedule, m, *MODELS[model]))
            assert merged.keys() == expected.keys()
        if model == "resnet":
            ResNet(width=4).load_state_dict(merged, strict=True)  # the user's model takes the checkpoint
        assert_same_parameters(merged, expected, f"{model} {schedule} M={m}", atol=1e-5)
        if model == "skip":
            assert summaries[2][i]["test_accuracy"] == pytest.approx(single_summary["test_accuracy"])


CUT = ("--model.split_points=[blocks.2]", "--train.steps=30")
DECOUPLED = [("dni", (*SKIP_NET, "--model.factory_args={skip: false}", *CUT)),  # hidden state and ids cross
             ("async", (*SKIP_NET, "--model.factory_args={skip: false}", *CUT)),
             ("dni", (*SKIP_NET, *CUT))]  # and the stem's output, skipping to the head: two predictors


def _decoupled(rank: int, world_size: int, root: str) -> list:
    runtime = Runtime(rank, world_size, rank, world_size, torch.device("cpu"), "gloo")
    losses = []
    for i, (schedule, extra) in enumerate(DECOUPLED):
        trainer = Trainer(make_config(Path(root) / str(i), schedule, 2, *extra), runtime)
        trainer.fit()
        trainer.close()
        rows = [json.loads(line) for line in (Path(root) / str(i) / "metrics" / f"stage{rank}.jsonl").open()]
        losses.append([r["loss"] for r in rows if "loss" in r])
    return losses


def test_decoupled_schedules_train_a_split_model_across_a_cut_of_several_tensors(tmp_path):
    """Across the cut: the hidden state (its gradient synthetic, or delayed), the bucket ids
    (int64, no gradient) that the last stage embeds, and in the last run the stem's output that
    skips to the head, each needing a gradient of its own."""
    _, runs = run_distributed(_decoupled, 2, str(tmp_path), timeout=300)
    for (schedule, _), losses in zip(DECOUPLED, runs):
        assert len(losses) == 30 and sum(losses[-5:]) < 0.8 * sum(losses[:5]), schedule


def _ids_only(rank: int, world_size: int, root: str) -> None:
    runtime = Runtime(rank, world_size, rank, world_size, torch.device("cpu"), "gloo")
    Trainer(make_config(Path(root), "dni", 2, "--model.factory=own_models:bucketed", "--data.synthetic_shape=[8]",
                        "--model.split_points=[embed]"), runtime)


def test_a_decoupled_cut_where_nothing_needs_a_gradient_is_one_clear_error(tmp_path):
    results = run_distributed(_ids_only, 2, str(tmp_path), timeout=120, allow_failures=True)
    # stage 1 may fail first on its own check or learn that stage 0 has gone: either way one says why
    errors = [r.error for r in results if isinstance(r, RankFailed) and isinstance(r.error, PartitionError)]
    assert errors and "train.schedule = 'dni': stage " in str(errors[0])
    assert "across a dni boundary, none of them needing a gradient" in str(errors[0])


@pytest.mark.slow
def test_the_config_route_trains_a_resnet_on_its_own_data_under_torchrun_and_exports_its_state_dict(tmp_path):
    run_dir = tmp_path / "run"
    args = ["configs/mlp_fashion.yaml", "--data.factory=own_models:images", "--data.num_classes=10", "--data.batch_size=24",
            "--train.steps=3", f"--run.dir={run_dir}", "--checkpoint.enabled=true", *RESNET[:3]]
    proc = run_cli(args, nproc=3)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "stage 2:" in proc.stdout and "[layer4, avgpool, fc]" in proc.stdout
    out = tmp_path / "resnet.pt"
    export = subprocess.run([sys.executable, "-m", "pipedni.export", str(run_dir), str(out)], capture_output=True,
                            text=True, cwd=REPO, timeout=120)
    assert export.returncode == 0, export.stderr
    ResNet(width=4).load_state_dict(torch.load(out), strict=True)
    saved = (run_dir / "config.yaml").read_text()
    assert "split_points:\n  - layer2\n  - layer4" in saved and "own_models:resnet18" in saved


TAGGED_DATA = ("--data.factory=own_models:tagged_data", "--data.num_classes=10")
MISTAKES = [
    ("--model.factory=own_models", "model.factory = 'own_models' is not 'package.module:function'"),
    ("--model.factory=no_such_pkg:build", "cannot import no_such_pkg"),
    ("--model.factory=own_models:nothing", "own_models has no function 'nothing'"),
    ("--model.factory_args={depth: 3}", "model.factory failed with model.factory_args = {'depth': 3}: TypeError: "
                                        "ResNet.__init__() got an unexpected keyword argument 'depth'"),
    ("--model.split_points=[layer9]", "split point 'layer9' names no module of ResNet; did you mean"),
    ("--data.factory=own_models:not_data", "data.factory = 'own_models:not_data' returned a Tensor; it must return (train, test)"),
    ("--data.factory=own_models:images", "data.num_classes = 3 but data.factory's data has label 3"),
    ("--train.loss=own_models:nope", "train.loss = 'own_models:nope': own_models has no function 'nope'"),
    (("--model.factory=", *TAGGED_DATA), "the data gives 2 inputs per sample, ([*, 8] float32, [*] int64), but "
                                         "model.name = 'mlp' takes one tensor; build a model that takes them with "
                                         "model.factory"),
    (("--model.factory=own_models:skip_net", "--model.split_points=[]", *TAGGED_DATA),
     "example_inputs has 2 values but SkipNet.forward takes 1 (x)"),
    (("--model.factory=own_models:tagged", "--model.factory_args={}", "--model.split_points=[]",
      "--data.factory=own_models:padded_tokens",
      "--data.num_classes=24"), "example_inputs names 'attention_mask', which Tagged.forward does not take; its "
                                "parameters are x, tag"),
]


def _predicted_from_two_inputs(rank: int, world_size: int, root: str) -> None:
    runtime = Runtime(rank, world_size, rank, world_size, torch.device("cpu"), "gloo")
    Trainer(make_config(Path(root), "dni", 2, *TAGGED[:2], "--model.split_points=[head]",
                        "--dni.synthetic_inputs=true"), runtime)


def test_synthetic_inputs_from_a_network_input_of_several_tensors_are_one_clear_error(tmp_path):
    results = run_distributed(_predicted_from_two_inputs, 2, str(tmp_path), timeout=120, allow_failures=True)
    errors = [r.error for r in results if isinstance(r, RankFailed) and isinstance(r.error, PartitionError)]
    assert errors and str(errors[0]) == (
        "dni.synthetic_inputs: stage 1 would predict its input from the network's, but the data gives 2 inputs, "
        "(x [*, 8] float32, tag [*] int64), and an input model reads one; turn synthetic inputs off")


def test_mistakes_in_the_config_route_are_one_line_errors_and_exit_2(tmp_path):
    """Each mistake raises its one-line error at start-up (checked in this process); the command
    line turns such an error into one line on stderr and exit code 2 (checked once)."""
    base = ["--data.name=synthetic", f"--run.dir={tmp_path}", "--train.steps=1", "--data.num_classes=3", *RESNET]
    for override, message in MISTAKES:
        overrides = [override] if isinstance(override, str) else list(override)
        with pytest.raises(PipeDNIError) as info:
            Trainer(load_config(REPO / "configs/mlp_fashion.yaml",
                                [*base, *overrides]), Runtime(0, 1, 0, 1, torch.device("cpu"), "none"))
        assert message in str(info.value) and "\n" not in str(info.value), override
    proc = run_cli(["configs/mlp_fashion.yaml", *base, MISTAKES[1][0]], nproc=None)
    assert proc.returncode == 2 and MISTAKES[1][1] in one_line_error(proc)


def _tied_sync(rank: int, world_size: int) -> list:
    """Three holders of one tied weight, each moving its copy by its own update; every sync
    gives each copy the base plus the sum of the updates."""
    from torch import nn

    from pipedni.config import OptimConfig
    from pipedni.schedules.worker import TiedSync
    from pipedni.stage import Stage, TiedWeight
    from pipedni.transport import Transport

    cpu = torch.device("cpu")
    transport = Transport(rank, world_size, cpu, cpu, tied=[[0, 1, 2]])
    module = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        module.weight.fill_(1.0)
    stage = Stage(module, rank, world_size, cpu, OptimConfig(), 10, tied=[TiedWeight("weight", 0, rank == 0, 3)])
    sync, seen = TiedSync(stage, transport, every=2), []
    for step in range(4):
        with torch.no_grad():
            module.weight.add_(0.1 * (rank + 1) * (step + 1))  # this copy's own update
        sync.after(step)  # syncs after steps 1 and 3
        seen.append(module.weight[0, 0].item())
    transport.close()
    return seen


def test_tied_copies_under_decoupled_schedules_take_the_sum_of_every_copys_updates():
    seen = run_distributed(_tied_sync, 3)
    # rank r adds 0.1 (r + 1) (step + 1) at each step. Step 0: alone (1.2 on rank 1); step 1: the
    # base 1 plus every copy's 0.3 (r + 1), 1.8 in all; step 2: alone again (+ 0.6 on rank 1);
    # step 3: 2.8 plus every copy's 0.7 (r + 1) since the last sync, 4.2 in all
    assert [round(v, 5) for v in seen[1]] == [1.2, 2.8, 3.4, 7.0]
    assert seen[0][1] == seen[1][1] == seen[2][1] and seen[0][3] == seen[2][3]


@pytest.mark.slow
def test_the_script_route_under_torchrun_equals_one_process_with_its_own_data_and_loss(tmp_path):
    """tests/own_script.py calls pipedni.fit with its model, torch Datasets and a label-smoothing
    loss; 2 stages under torchrun must end where the same script ends alone."""
    common = ["--train.steps=6", "--data.batch_size=32", "--optim.lr=0.1", "--run.log_every=100"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    script = str(TESTS / "own_script.py")
    piped = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                            f"--master_port={free_port()}", script, f"--run.dir={tmp_path / 'piped'}",
                            "--train.schedule=1f1b", "--train.microbatches=2", *common],
                           env=env, capture_output=True, text=True, timeout=300)
    assert piped.returncode == 0, piped.stderr[-2000:]
    alone = subprocess.run([sys.executable, script, f"--run.dir={tmp_path / 'alone'}", *common], env=env,
                           capture_output=True, text=True, timeout=300)
    assert alone.returncode == 0, alone.stderr[-2000:]
    assert "test accuracy" in piped.stdout and "test accuracy" in alone.stdout
    assert_same_parameters(merge_checkpoints(tmp_path / "piped"), merge_checkpoints(tmp_path / "alone"), "script route")
    assert "loss: __main__:smoothed" in (tmp_path / "piped" / "config.yaml").read_text()


def _ragged(rank: int, world_size: int, root: str) -> None:
    runtime = Runtime(rank, world_size, rank, world_size, torch.device("cpu"), "gloo")
    Trainer(make_config(Path(root), "gpipe", 2, "--model.factory=own_models:ragged", "--data.synthetic_shape=[8]",
                        "--model.split_points=[b]"), runtime).fit()


def test_a_boundary_tensor_whose_shape_changes_between_batches_is_refused_by_name(tmp_path):
    results = run_distributed(_ragged, 2, str(tmp_path), timeout=120, allow_failures=True)
    errors = [str(r.error) for r in results if isinstance(r, RankFailed) and not getattr(r.error, "neighbour_lost", False)]
    assert errors and "stage 1/2 expected activation of step 0 microbatch 0 from stage 0 as (" in errors[0]
    assert "narrow [*, 3] float32" in errors[0] and "but stage 0 sent (" in errors[0]


def test_a_decoupled_run_times_a_split_model_and_records_the_cut_for_a_rerun(tmp_path):
    """partition.method: auto is time for decoupled schedules: Lopsided's costly first block gets
    a stage of its own (parameters would give it two), the printed split says what was
    measured, and the saved config records the cut."""
    # 60 repeats: the first block's compute outweighs the tables' optimizer steps by far, so
    # the split does not hang on a busy machine's timing noise (30 tipped 2 runs in 5)
    cfg = make_config(tmp_path, "dni", 2, "--model.factory=own_models:lopsided", "--model.factory_args={repeats: 60}",
                      "--data.synthetic_shape=[64]")
    train_set, _ = datasets.load_datasets(cfg.data, cfg.run.seed)
    runtime = Runtime(0, 2, 0, 2, torch.device("cpu"), "none")
    cut = cut_model(cfg, registry.get(cfg.train.schedule), runtime, Lopsided(repeats=60), train_set)
    assert "partition.method time: stage costs " in cut.description
    assert "x 1.12 for its dni.kind auto predictor); differs from the parameter split [2, 3]" in cut.description
    assert cut.cfg.model.split_points == ["blocks.1"] and cfg.model.split_points == []  # recorded for a rerun


def test_a_resumed_split_model_is_cut_where_its_checkpoint_was_cut(tmp_path):
    """A timed split may cut elsewhere when measured again: a resumed run takes the checkpoint's
    split points (same stage count, none given), as a Sequential takes its balance."""
    (tmp_path / "meta.json").write_text(json.dumps({"num_stages": 2, "balance": None, "split_points": ["blocks.1"]}))
    cfg = make_config(tmp_path, "dni", 2, *SKIP_NET)
    assert with_saved_balance(cfg, tmp_path, 2).model.split_points == ["blocks.1"]
    assert with_saved_balance(cfg, tmp_path, 3).model.split_points == []  # another stage count: cut afresh
    given = make_config(tmp_path, "dni", 2, *SKIP_NET, "--model.split_points=[blocks.2]")
    assert with_saved_balance(given, tmp_path, 2).model.split_points == ["blocks.2"]  # the user's cut wins


def test_a_stage_failing_at_start_up_ends_the_others_with_one_line_each_not_a_traceback(tmp_path):
    """The last stage refuses the model's 10 scores for 4 classes; stage 0 used to die with
    gloo's traceback in the start-up broadcast that followed. Now stage 1 says why in one line,
    and stage 0, whose loss is a consequence, at most one line after it (torchrun may stop it first)."""
    args = ["configs/mlp_fashion.yaml", "--data.factory=own_models:images", "--data.num_classes=4", "--train.steps=1",
            f"--run.dir={tmp_path}", *RESNET[:2], "--model.split_points=[layer4]"]
    proc = run_cli(args, nproc=2)
    stages = [line for line in proc.stderr.splitlines() if line.startswith("[stage ")]
    assert "[stage 0/2] Traceback" not in proc.stderr and "RuntimeError" not in proc.stderr, proc.stderr[-3000:]
    assert stages[0].startswith("[stage 1/2] error: the last stage (stage 1) outputs [*, 10] float32 but the loss "
                                "needs [*, 4]"), stages
    assert all(s.startswith("[stage 0/2] error: stage 0/2 lost another stage during") for s in stages[1:]), stages
