"""``dni.kind: auto``: the predictor is chosen by its measured cost next to the stage it serves."""

import torch
from torch import nn

from pipedni.config import DNIConfig, OptimConfig
from pipedni.crossing import StageShapes, TensorSpec
from pipedni.dni.sizing import candidates, choose, stage_sec
from pipedni.stage import Stage

WIDTH = 256


def _stage(*layers: nn.Module) -> Stage:
    return Stage(nn.Sequential(*layers), 0, 2, torch.device("cpu"), OptimConfig(), 10)


def _shapes(width_in: int) -> StageShapes:
    return StageShapes(TensorSpec((1, width_in), torch.float32), TensorSpec((1, WIDTH), torch.float32))


def test_a_cheaper_stage_gets_a_cheaper_predictor():
    """The same 256-wide boundary and the same candidates: behind one small layer the default
    mlp predictor (1024 wide) costs more than the stage, so auto falls to the cheapest measured
    (lowrank or linear: at this size their costs are close, and both far below the mlp's, so
    timing noise cannot make the mlp the cheapest); behind three 4096-wide layers the mlp is a
    few percent of the stage, so auto keeps the richest."""
    cfg = DNIConfig(kind="auto", condition_on_labels=True)
    small = _stage(nn.Linear(WIDTH, WIDTH))
    large = _stage(nn.Linear(WIDTH, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 4096),
                   nn.ReLU(), nn.Linear(4096, WIDTH))
    cheap, line = choose(small, _shapes(WIDTH), _shapes(WIDTH).output, cfg, 10, 128, 1, ())
    rich, rich_line = choose(large, _shapes(WIDTH), _shapes(WIDTH).output, cfg, 10, 128, 1, ())
    assert cheap.cfg.kind in ("lowrank", "linear") and rich.cfg.kind == "mlp", (line, rich_line)
    assert f"dni.kind auto -> {cheap.cfg.kind}, the cheapest" in line and "mlp" in line  # says what it tried
    assert all(not p.detach().any() for p in cheap.model.net[-1].parameters())  # a fresh, zero-output one


def test_sizing_leaves_the_stage_as_it_found_it():
    """The timing runs real forwards and backwards: no gradient, BatchNorm statistic or
    in-flight microbatch may remain."""
    stage = _stage(nn.Linear(WIDTH, WIDTH), nn.BatchNorm1d(WIDTH))
    before = {k: v.clone() for k, v in stage.module.state_dict().items()}
    assert stage_sec(stage, _shapes(WIDTH), 32) > 0
    after = stage.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in stage.module.parameters()) and stage.in_flight == 0


def test_feature_maps_may_get_a_conv_predictor_first():
    assert [c.kind for c in candidates((8, 4, 4), DNIConfig())] == ["conv", "mlp", "lowrank", "linear"]
    assert [c.kind for c in candidates((16, 32), DNIConfig())] == ["mlp", "lowrank", "linear"]
