"""Checkpoints: one folder per step holding every stage's file, keyed by the whole model's names.

Layout: ``<run.dir>/checkpoints/step_<step, 8 digits>/stage<i>.pt``. A stage file holds the
stage's weights and buffers (the whole model's parameter names), its optimizer state keyed by
parameter name (not position, so a checkpoint resumes under any split), the LR schedule, the
RNG state, the schedule's own state (predictors, the weights before the last update) and the
step: everything a run needs to go on from that step.

[Note: atomic checkpoints]
Every rank writes its file into ``.step_<step>.partial/`` (each file written to a temporary
name and renamed); once every rank has written (an all-reduce of who failed), rank 0 renames the
folder to ``step_<step>`` and only then deletes the oldest folders beyond
``checkpoint.keep_last``. A process killed at any moment leaves either the complete new folder
or a ``.partial`` one, which nothing reads, beside the previous complete checkpoint. Several
nodes need ``run.dir`` on a shared file system (rank 0 renames what every rank wrote).

Before a checkpoint mid-run the schedule drains (``Worker.finish``: the delayed updates and the
fits still owed are made), so nothing in flight is lost and the checkpoint is a step boundary
of every stage alike. A locked schedule owes nothing: resuming it is bit-identical to not
stopping. A decoupled run with checkpoints makes those owed updates early, every
``every_steps``; its resume equals the uninterrupted run with the same checkpoints.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from pipedni.errors import CheckpointError
from pipedni.stage import Stage

STEP_DIR = re.compile(r"step_(\d+)")
PARTIAL_DIR = re.compile(r"\.step_(\d+)\.partial")
STAGE_FILE = re.compile(r"stage(\d+)\.pt")


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def partial_dir(root: Path, step: int) -> Path:
    """Where the ranks write checkpoint ``step`` until it is complete ([Note: atomic checkpoints])."""
    return root / f".step_{step:08d}.partial"


def has_checkpoint(root: Path) -> bool:
    """Whether ``root`` holds a complete checkpoint (a step folder, or an earlier version's files)."""
    return bool(complete_steps(root) or stage_files(root))


def save_atomic(obj: object, path: Path) -> None:
    """Write to a temporary file in the same directory, then rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def complete_steps(root: Path) -> list[int]:
    """Steps with a complete checkpoint folder under ``root``, oldest first."""
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.fullmatch(p.name)))


def stage_files(folder: Path) -> list[Path]:
    files = [p for p in folder.glob("stage*.pt") if STAGE_FILE.fullmatch(p.name)]
    return sorted(files, key=lambda p: int(STAGE_FILE.fullmatch(p.name).group(1)))


def find(root: Path, which: str) -> Path:
    """The checkpoint folder ``which`` names: latest (in ``root``), a step, or a folder's path.
    A run of an earlier version (``checkpoints/stage<i>.pt``, no step folders) counts as one."""
    steps = complete_steps(root)
    if which == "latest":
        if steps:
            return step_dir(root, steps[-1])
        if stage_files(root):
            return root
        raise CheckpointError(f"no checkpoint in {root} to resume from; train first (checkpoint.enabled, "
                              "checkpoint.every_steps) or give checkpoint.resume a step folder's path")
    if which.isdigit():
        if int(which) in steps:
            return step_dir(root, int(which))
        have = ", ".join(map(str, steps)) or "none"
        raise CheckpointError(f"checkpoint.resume = {which}: no checkpoint of step {which} in {root} "
                              f"(steps there: {have}); use one of them or latest")
    folder = Path(which)
    if not folder.is_dir() or not stage_files(folder):
        raise CheckpointError(f"checkpoint.resume = {which!r} is not a checkpoint folder (no stage<i>.pt in it); "
                              f"give latest, a step number, or a path such as {step_dir(root, 100)}")
    return folder


def read_meta(folder: Path) -> dict:
    """``meta.json`` of a checkpoint folder (step, stages, balance or split points, schedule), or {} for none."""
    try:
        return json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return {}


def load_file(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated, not a torch file, ...
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(err).__name__}: {err})") from None
    missing = {"model", "stage_index", "num_stages", "step"} - set(state) if isinstance(state, dict) else {"model"}
    if missing:
        raise CheckpointError(f"{path} is not a pipedni stage checkpoint (no {', '.join(sorted(missing))})")
    return state


def load_folder(folder: Path) -> list[dict]:
    """Every stage's file of one checkpoint, checked to be one whole run's (stages, step, launch)."""
    states = [load_file(p) for p in stage_files(folder)]
    if not states:
        raise CheckpointError(f"no stage checkpoints in {folder}")
    num_stages = states[0]["num_stages"]
    found = sorted(s["stage_index"] for s in states)
    if found != list(range(num_stages)):
        raise CheckpointError(f"{folder} has checkpoints of stages {found} but the run had {num_stages} stages")
    if len({(s.get("run_token"), s["step"], s["num_stages"]) for s in states}) > 1:
        steps = ", ".join(f"stage {s['stage_index']}: step {s['step']}" for s in states)
        raise CheckpointError(f"{folder}'s stage checkpoints come from different runs ({steps}); rerun training")
    return sorted(states, key=lambda s: s["stage_index"])


def merged_model(states: list[dict], where: Path) -> dict[str, torch.Tensor]:
    """The whole model's state_dict from its stages' files. A name in two files is a weight
    tied across stages (an embedding and the head that shares it): kept identical by the locked
    schedules, so the copies must be equal."""
    merged: dict[str, torch.Tensor] = {}
    for state in states:
        for name, tensor in state["model"].items():
            if name in merged and not torch.equal(merged[name], tensor):
                raise CheckpointError(f"parameter {name!r} differs between two stage checkpoints of {where}")
            merged[name] = tensor
    return merged


def _param_order(stage: Stage) -> list[Optional[str]]:
    """The optimizer's parameters in its own order, by name (None: a stage without parameters'
    placeholder, see build_optimizer)."""
    name_of = {id(p): n for n, p in stage.module.named_parameters()}
    return [name_of.get(id(p)) for group in stage.optimizer.param_groups for p in group["params"]]


def optimizer_by_name(stage: Stage) -> dict:
    """The optimizer's state_dict with parameter names where torch keeps positions."""
    order, saved = _param_order(stage), stage.optimizer.state_dict()
    return {"state": {order[i]: s for i, s in saved["state"].items() if order[i] is not None},
            "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]]}


def load_optimizer_by_name(stage: Stage, saved: list[dict]) -> None:
    """This stage's optimizer from the named states of any split: each parameter's state, and
    each group's settings (the learning rate included) from the saved group holding its first
    parameter."""
    state = {name: s for by_name in saved for name, s in by_name["state"].items()}
    groups = {name: g for by_name in saved for g in by_name["param_groups"] for name in g["params"]}
    order, current = _param_order(stage), stage.optimizer.state_dict()
    new_groups = []
    for group in current["param_groups"]:
        first = order[group["params"][0]] if group["params"] else None
        source = groups.get(first, group)
        new_groups.append({**{k: v for k, v in source.items() if k != "params"}, "params": group["params"]})
    new_state = {i: state[name] for i, name in enumerate(order) if name in state}
    stage.optimizer.load_state_dict({"state": new_state, "param_groups": new_groups})


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class Checkpointer:
    """Writes this rank's part of each checkpoint and, on rank 0, completes and prunes folders."""

    def __init__(self, run_dir: Path, cfg, rank: int, distributed: bool, run_token: str = "", writes: bool = True):
        """``writes``: whether this rank writes its stage's file (one replica of each stage does:
        the others hold the same weights and only take part in the agreement on failures)."""
        self.root, self.cfg, self.rank, self.distributed = run_dir / "checkpoints", cfg, rank, distributed
        self.writes = writes
        self.run_token = run_token
        self.last_step: Optional[int] = None  # the newest complete checkpoint this run knows of
        self.last_train_sec = 0.0  # training seconds at the last one (checkpoint.every_minutes)

    def due(self, done: int) -> bool:
        every = self.cfg.every_steps
        return self.cfg.enabled and every > 0 and done % every == 0

    def due_by_time(self, train_sec: float) -> bool:
        """Whether ``every_minutes`` have passed; ``train_sec`` must be the same on every rank."""
        minutes = self.cfg.every_minutes
        return self.cfg.enabled and minutes > 0 and train_sec - self.last_train_sec >= 60 * minutes

    def save(self, stage: Stage, step: int, num_stages: int, config: dict, extra: dict,
             train_sec: float = 0.0) -> None:
        """This stage's file of checkpoint ``step``; every rank calls it at the same step."""
        if not self.cfg.enabled or self.last_step == step:
            return
        partial = partial_dir(self.root, step)
        state = {"model": stage.module.state_dict(), "optimizer_by_name": optimizer_by_name(stage),
                 "scheduler": stage.scheduler.state_dict(), "rng": rng_state(stage.device), **extra,
                 "step": step, "stage_index": stage.stage_index, "num_stages": num_stages,
                 "run_token": self.run_token, "layers": stage_layers(stage.module),
                 "loss_scale": None if stage.loss_scale is None else stage.loss_scale.state_dict(), "config": config}
        failure = ""
        try:
            if self.writes:
                save_atomic(state, partial / f"stage{stage.stage_index}.pt")
        except OSError as err:
            failure = f"{partial}: {err.strerror or err}"
        failed = self._who_failed(bool(failure))
        if failed is not None:
            previous = f"step {self.last_step}" if self.last_step is not None else "none"
            err = CheckpointError(f"stage {failed}: cannot write checkpoint of step {step} "
                                  f"({failure or 'see its error'}); the last complete checkpoint ({previous}) is "
                                  "kept; free space or point run.dir elsewhere, then resume with --resume")
            err.printed_elsewhere = failed != stage.stage_index
            raise err
        if self.rank == 0:
            meta = {"step": step, "num_stages": num_stages, "balance": config["partition"]["balance"],
                    "split_points": config["model"]["split_points"], "schedule": config["train"]["schedule"],
                    "run_token": self.run_token}
            self._complete(partial, step, meta)
        self.last_step, self.last_train_sec = step, train_sec

    def _who_failed(self, failed_here: bool) -> Optional[int]:
        """The lowest stage that could not write its file, or None (every rank learns it)."""
        if not self.distributed:
            return self.rank if failed_here else None
        flags = torch.zeros(dist.get_world_size(), dtype=torch.int32)
        flags[self.rank] = int(failed_here)
        dist.all_reduce(flags)
        failed = flags.nonzero()
        return int(failed[0]) if len(failed) else None

    def _complete(self, partial: Path, step: int, meta: dict) -> None:
        """Rank 0, once every file is in: the folder becomes the checkpoint, then old ones go."""
        final = step_dir(self.root, step)
        try:
            (partial / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
            if final.exists():  # the same step written again (a resumed run re-reaching it)
                shutil.rmtree(final)
            os.replace(partial, final)
            keep = self.cfg.keep_last
            for old in complete_steps(self.root)[:-keep] if keep else []:
                shutil.rmtree(step_dir(self.root, old), ignore_errors=True)
            for stale in self.root.glob(".step_*.partial"):  # left by a run killed while writing
                m = PARTIAL_DIR.fullmatch(stale.name)
                if m and int(m.group(1)) < step:
                    shutil.rmtree(stale, ignore_errors=True)
        except OSError as err:
            raise CheckpointError(f"cannot complete checkpoint {final} ({err.strerror or err}); "
                                  "the previous complete checkpoint is kept") from None


def stage_layers(module: nn.Module) -> list[str]:
    """What a stage holds, to recognise a checkpoint written under the same split: an
    ``nn.Sequential`` stage's layer names, a split model's stage's state_dict keys (its
    top-level names may repeat across stages: see pipedni.split)."""
    if isinstance(module, nn.Sequential):
        return [name for name, _ in module.named_children()]
    return list(module.state_dict().keys())


def _own_file(folder: Path, stage_index: int, num_stages: int, layers: list[str]) -> Optional[dict]:
    """This stage's file alone, when the checkpoint was written under this same split (its
    meta.json says so and the file's layers are this stage's); None otherwise."""
    meta = read_meta(folder)
    path = folder / f"stage{stage_index}.pt"
    if meta.get("num_stages") != num_stages or not path.is_file():
        return None
    state = load_file(path)
    same = state["layers"] == layers and state.get("run_token") == meta.get("run_token")
    return state if same and state["step"] == meta.get("step") else None


def restore(stage: Stage, folder: Path, num_stages: int) -> tuple[int, Optional[dict]]:
    """Load checkpoint ``folder`` (written under any split) into ``stage``: weights, optimizer,
    LR schedule; returns its step and, when it was written under this same split, this stage's
    own file (its RNG state is restored, and the caller restores the schedule's state from it).
    Under the same split only that file is read; under another, every stage's."""
    layers = stage_layers(stage.module)
    own = _own_file(folder, stage.stage_index, num_stages, layers)
    states = [own] if own is not None else load_folder(folder)
    if own is None and len(states) == num_stages and states[stage.stage_index]["layers"] == layers:
        own = states[stage.stage_index]  # the same split, in a folder without meta.json (older runs)
    merged, own_keys = merged_model(states, folder), list(stage.module.state_dict())
    missing = [k for k in own_keys if k not in merged]
    if missing:
        raise CheckpointError(f"{folder} does not fit this model: it has no {', '.join(missing[:3])}"
                              f"{' ...' if len(missing) > 3 else ''}; resume with the model config that wrote it")
    try:
        stage.module.load_state_dict({k: merged[k] for k in own_keys})
    except RuntimeError as err:
        raise CheckpointError(f"{folder} does not fit this model ({str(err).splitlines()[-1].strip()}); "
                              "resume with the model config that wrote it") from None
    if all("optimizer_by_name" in s for s in states):
        load_optimizer_by_name(stage, [s["optimizer_by_name"] for s in states])
    elif own is not None and "optimizer" in own:  # an earlier version's positional state
        stage.optimizer.load_state_dict(own["optimizer"])
    stage.scheduler.load_state_dict(states[0]["scheduler"])
    if stage.loss_scale is not None and states[0].get("loss_scale"):  # the same on every stage
        stage.loss_scale.load_state_dict(states[0]["loss_scale"])
    if own is not None and "rng" in own:
        set_rng_state(own["rng"], stage.device)
    return int(states[0]["step"]), own
