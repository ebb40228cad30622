"""The script route: ``pipedni.fit(model, train_set, test_set, ...)`` from a user's own script,
under ``torchrun`` or in one process (docs/own_model.md)."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from torch import nn

from pipedni.config import load_config
from pipedni.data.factory import from_torch
from pipedni.data.registry import prepare
from pipedni.errors import same_on_every_rank
from pipedni.stage import Loss
from pipedni.train import run


def fit(model: nn.Module, train_set: Any, test_set: Any, config: Optional[str] = None, *overrides: str,
        loss: Optional[Loss] = None, split_points: Optional[Sequence[str]] = None) -> Optional[dict]:
    """The script route (docs/own_model.md): train ``model`` from your own script on
    ``train_set`` and evaluate on ``test_set`` (torch Datasets of (input, integer label) pairs).
    Under ``torchrun --nproc_per_node=N my_script.py`` each process runs one stage; without
    torchrun the whole model runs in one. ``config`` (a YAML file, or None: the defaults) and
    ``overrides`` (``"--train.schedule=gpipe"``, ...) set the rest as for ``pipedni.train``;
    ``loss(scores, labels)`` returns their mean (default: cross-entropy); ``split_points``
    name modules to cut before. Returns summary.json's content on the last stage, None on the
    others; a mistake raises its PipeDNIError (one line: print it)."""
    points = [f"--model.split_points=[{', '.join(split_points)}]"] if split_points else []
    with same_on_every_rank():
        cfg = load_config(config, [*overrides, *points])
        if loss is not None:  # recorded in config.yaml by name; this run calls the function given
            cfg.train.loss = f"{loss.__module__}:{loss.__qualname__}"
        data = prepare(cfg.data, *from_torch(train_set, test_set, type(train_set).__name__, cfg.data.num_classes))
    return run(cfg, model, data, loss)
