"""train.compile: each stage compiled before training (its time reported apart), training what
eager trains, and eager with one line naming the reason where a stage cannot be compiled."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from pipedni.compiling import compile_stage, microbatch_rows
from pipedni.config import OptimConfig
from pipedni.crossing import StageShapes, TensorSpec
from pipedni.engine import Trainer
from pipedni.export import merge_checkpoints
from pipedni.stage import Stage
from helpers import CPU, assert_same_parameters, gloo_runtime, make_config, run_distributed, train_single

torch.set_num_threads(1)


def test_microbatch_rows_are_the_sizes_tensor_split_makes():
    assert microbatch_rows(30, 4) == [8, 7]
    assert microbatch_rows(32, 4) == [8]
    assert microbatch_rows(3, 4) == [1]


class Breaks(nn.Module):
    """A forward dynamo cannot keep in one graph."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        torch._dynamo.graph_break()
        return self.linear(x)


def test_a_stage_that_cannot_be_one_graph_runs_eager_saying_why(capsys):
    module = Breaks()
    stage = Stage(module, 0, 2, CPU, OptimConfig(), 10)
    spec = TensorSpec((1, 4), torch.float32)
    assert not compile_stage(stage, StageShapes(spec, spec), [3], ())[1]
    assert "stage 0: train.compile: runs eager" in capsys.readouterr().out
    assert "forward" not in module.__dict__  # its own forward again
    assert all(p.grad is None for p in module.parameters())  # the warm-up left no gradient
    assert stage.forward(0, torch.randn(3, 4)).shape == (3, 4)


CASES = [("1f1b", 4, ()), ("async", 1, ("--train.compile=true",)), ("async", 1, ())]


def _train_cases(rank: int, world_size: int, root: str) -> list:
    summaries = []
    for i, (schedule, m, extra) in enumerate(CASES):
        flags = extra if schedule == "async" else ("--train.compile=true", "--train.activation_checkpointing=blocks")
        trainer = Trainer(make_config(Path(root) / str(i), schedule, m, *flags), gloo_runtime(rank, world_size))
        summaries.append(trainer.fit())
        trainer.close()
    return summaries


@pytest.mark.slow
def test_compiled_stages_train_what_eager_trains(tmp_path):
    """1f1b compiled (and recomputing its blocks) equals one eager process; async compiled, whose
    delayed forwards run on stashed and predicted weights, equals async eager; each stage
    reports its compile time."""
    expected, _ = train_single(tmp_path / "single")
    summaries = run_distributed(_train_cases, 2, str(tmp_path), timeout=300)[-1]
    assert_same_parameters(merge_checkpoints(tmp_path / "0"), expected, "1f1b compiled", atol=1e-5)
    assert_same_parameters(merge_checkpoints(tmp_path / "1"), merge_checkpoints(tmp_path / "2"), "async compiled",
                           atol=1e-5)
    for summary in summaries[:2]:
        assert all(stage["compile_sec"] > 0 and stage["compiled"] for stage in summary["stages"])
    assert all("compile_sec" not in stage and "compiled" not in stage for stage in summaries[2]["stages"])


def test_a_compiled_recomputed_block_moves_batch_norm_statistics_once():
    """Compiled, the checkpoint is traced into the graph: the same gradients as eager without
    it, and batch-norm statistics updated by the forward alone."""
    from pipedni import recompute

    def net() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU()), nn.Linear(8, 3))

    x, y = torch.randn(16, 8), torch.arange(16) % 3
    plain, compiled = net(), recompute.apply(net(), "blocks", 0)
    compiled.forward = torch.compile(compiled.forward, fullgraph=True)
    for model in (plain, compiled):
        torch.nn.functional.cross_entropy(model(x), y).backward()
    for (name, p), (_, q) in zip(plain.named_parameters(), compiled.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)
    for (name, p), (_, q) in zip(plain.named_buffers(), compiled.named_buffers()):
        torch.testing.assert_close(q, p, msg=name)
