"""Typed run configuration: one dataclass per YAML section, loading, overrides and validation.

Precedence: ``--section.key=value`` on the command line > the YAML file > the defaults below.
Every field carries a one-line doc (``field.metadata["doc"]``); ``python -m pipedni.config``
prints the reference table that ``docs/usage.md`` embeds.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from pipedni.errors import ConfigError
from pipedni.typecheck import coerce, type_name

def _f(default: Any, doc: str) -> Any:
    """A dataclass field with a documented default (lists are copied per instance)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass
class RunConfig:
    name: str = _f("default", "Run name; also the default run directory name.")
    dir: Optional[str] = _f(None, "Output directory (default: runs/<name>).")
    seed: int = _f(0, "Seed for weights and data order; identical on every rank.")
    threads: int = _f(0, "Torch CPU threads per stage process (0: cores / local processes).")
    log_every: int = _f(10, "Steps between console updates (metrics are written every step).")
    activation_memory: bool = _f(
        False, "Count the bytes each stage keeps for backward (summary: peak_activation_bytes); costs a hook per saved tensor."
    )


@dataclass
class ModelConfig:
    name: Literal["mlp", "cnn", "transformer"] = _f(
        "mlp", "Built-in model: mlp (fully connected), cnn (conv) or transformer (causal character LM)."
    )
    depth: int = _f(3, "mlp: number of hidden Linear layers; transformer: number of blocks.")
    width: int = _f(256, "mlp: units per hidden layer; transformer: model width (d_model).")
    heads: int = _f(4, "transformer: attention heads per block (model.width must divide by it).")
    batchnorm: bool = _f(False, "mlp / cnn: add BatchNorm after each hidden Linear / conv layer.")
    channels: list[int] = _f([32, 64], "cnn: output channels of each 5x5 conv block.")
    hidden: int = _f(0, "cnn: width of a hidden Linear layer before the classifier (0: none).")


@dataclass
class DataConfig:
    name: Literal["fashion_mnist", "mnist", "mnist_5k", "kjv", "synthetic"] = _f(
        "fashion_mnist",
        "Data set: fashion_mnist, mnist (IDX files), mnist_5k (5000-digit CSV), kjv (King James Bible, "
        "characters) or synthetic (random, no I/O).",
    )
    root: str = _f("data", "Directory searched first for data files (IDX files, mnist_5k.csv.gz, kjv.jsonl).")
    batch_size: int = _f(128, "Training batch size (split into train.microbatches).")
    eval_batch_size: int = _f(1000, "Batch size of the forward-only evaluation pass.")
    normalize: bool = _f(True, "Standardise float inputs with the training set's mean and std (not token ids).")
    train_limit: int = _f(0, "Use only the first N training samples (0: all).")
    test_limit: int = _f(0, "Evaluate on only the first N test samples (0: all).")
    seq_len: int = _f(128, "kjv: characters per sample; targets are the same characters shifted by one.")
    synthetic_shape: list[int] = _f([1, 28, 28], "synthetic: shape of one input sample.")
    synthetic_classes: int = _f(10, "synthetic: number of classes.")
    synthetic_size: int = _f(8192, "synthetic: number of training samples (test: a quarter).")


@dataclass
class PartitionConfig:
    balance: Optional[list[int]] = _f(None, "Layers per stage, e.g. [2, 2]; overrides method.")
    method: Literal["uniform", "parameters"] = _f(
        "parameters", "uniform: equal layer counts; parameters: exact min-max parameter split."
    )


@dataclass
class TrainConfig:
    schedule: Literal["single", "naive", "gpipe", "1f1b", "dni", "torch_gpipe", "torch_1f1b"] = _f(
        "1f1b",
        "single (one process, reference), naive, gpipe, 1f1b, dni (synthetic gradients), or "
        "torch_gpipe / torch_1f1b (torch.distributed.pipelining's schedules on the same stages: the peer).",
    )
    steps: int = _f(0, "Optimizer steps to run (0: use train.epochs).")
    epochs: float = _f(1.0, "Passes over the training set when train.steps is 0.")
    microbatches: int = _f(4, "Microbatches per batch for naive / gpipe / 1f1b and dni's warm-up (M).")
    eval_every: int = _f(0, "Steps between test-set evaluations (0: only at the end).")
    time_limit_sec: float = _f(
        0.0, "Stop at the first evaluation after this many seconds of training, evaluation excluded (0: off)."
    )


@dataclass
class OptimConfig:
    name: Literal["sgd", "adam", "adamw"] = _f("sgd", "Optimizer: sgd, adam or adamw.")
    lr: float = _f(0.05, "Peak learning rate.")
    momentum: float = _f(0.9, "sgd: momentum.")
    weight_decay: float = _f(0.0, "Weight decay (decoupled for adamw).")
    betas: list[float] = _f([0.9, 0.999], "adam / adamw: betas.")
    lr_schedule: Literal["constant", "cosine"] = _f(
        "constant", "constant, or cosine: linear warmup then cosine decay to min_lr."
    )
    warmup_steps: int = _f(0, "cosine: steps of linear warmup from 0 to lr.")
    min_lr: float = _f(0.0, "cosine: learning rate at the last step.")
    grad_clip: float = _f(
        0.0, "Clip the gradient norm to this (0: off): of the whole model when locked, per stage under dni."
    )


@dataclass
class DNIConfig:
    kind: Literal["linear", "lowrank", "mlp", "conv"] = _f(
        "mlp", "Synthetic-gradient model: linear, lowrank, mlp (per position on [B, T, C]), or conv (4-D)."
    )
    condition_on_labels: bool = _f(
        False, "cDNI: give the predictor the one-hot label (of each position, on sequences) as extra input."
    )
    hidden_layers: int = _f(2, "mlp / conv: hidden layers of the predictor.")
    hidden_width: int = _f(1024, "mlp: units per hidden layer; conv: channels per hidden layer.")
    rank: int = _f(64, "lowrank: width of the bottleneck.")
    batchnorm: bool = _f(False, "mlp / conv: BatchNorm after each hidden layer of the predictor.")
    optimizer: Literal["adam", "sgd"] = _f("adam", "Optimizer of the predictors (their own, not optim.*).")
    lr: float = _f(3e-4, "Learning rate of the predictors.")
    output_scale: float = _f(1.0, "Multiply predicted gradients by this before backpropagating them.")
    clip: float = _f(0.0, "Clip each sample's predicted gradient to this L2 norm (0: off).")
    normalize_target: bool = _f(
        True, "Regress on (labels per batch) x gradient (O(1) values) and divide back before use."
    )
    max_staleness: int = _f(8, "Most steps a stage may run ahead of the gradients it has received.")
    microbatches: int = _f(
        1, "Pieces each batch runs in, freed one by one (activation memory / M); one update per batch."
    )
    warmup_steps: int = _f(0, "Train locked (1F1B) this many steps first; predictors fit true gradients.")
    boundaries: list[dict] = _f(
        [], "Per-boundary overrides: entry i (stage i -> i+1) maps predictor keys above to values."
    )

    def for_boundary(self, index: int) -> "DNIConfig":
        """This config with boundary ``index``'s overrides applied."""
        if index >= len(self.boundaries):
            return self
        return dataclasses.replace(self, **self.boundaries[index])


# Keys a per-boundary entry may set (the predictor's own settings, not the schedule's).
DNI_BOUNDARY_KEYS = ("kind", "condition_on_labels", "hidden_layers", "hidden_width", "rank", "batchnorm",
                     "optimizer", "lr", "output_scale", "clip", "normalize_target")


@dataclass
class DistConfig:
    backend: Literal["auto", "gloo", "nccl"] = _f(
        "auto", "auto: nccl when every rank has its own GPU, else gloo."
    )
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "auto: cuda when available, else cpu.")
    timeout_sec: float = _f(300.0, "Longest wait for any message before the job fails.")
    queue_size: int = _f(64, "Messages buffered per incoming direction before the sender waits.")


@dataclass
class CheckpointConfig:
    enabled: bool = _f(True, "Write final per-stage checkpoints to <run.dir>/checkpoints.")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dni: DNIConfig = field(default_factory=DNIConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) if self.run.dir else Path("runs") / self.run.name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}


def _set(section_obj: Any, section: str, key: str, value: Any, source: str) -> None:
    hints = typing.get_type_hints(type(section_obj))
    if key not in hints:
        valid = ", ".join(sorted(hints))
        raise ConfigError(f"unknown key '{section}.{key}' ({source}); valid keys of '{section}': {valid}")
    try:
        setattr(section_obj, key, coerce(value, hints[key]))
    except TypeError:
        raise ConfigError(
            f"{section}.{key} = {value!r} ({source}) is not valid; expected {type_name(hints[key])}"
        ) from None


def _apply_mapping(cfg: Config, data: Any, source: str) -> None:
    if data is None:
        return
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping of sections, got {type(data).__name__}")
    for section, values in data.items():
        if section not in SECTIONS:
            raise ConfigError(
                f"unknown section '{section}' ({source}); valid sections: {', '.join(SECTIONS)}"
            )
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"section '{section}' ({source}) must be a mapping of key: value")
        for key, value in values.items():
            _set(getattr(cfg, section), section, str(key), value, source)


def parse_override(arg: str) -> tuple[str, str, Any]:
    """Split ``--section.key=value`` into (section, key, YAML-parsed value)."""
    body = arg[2:] if arg.startswith("--") else arg
    if "=" not in body or "." not in body.split("=", 1)[0]:
        raise ConfigError(f"override '{arg}' must look like --section.key=value")
    dotted, raw = body.split("=", 1)
    section, key = dotted.split(".", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    if section not in SECTIONS:
        raise ConfigError(f"unknown section '{section}' in '{arg}'; valid sections: {', '.join(SECTIONS)}")
    return section, key, value


# --------------------------------------------------------------------------- loading


def load_config(path: Optional[str | Path] = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file at ``path``, then ``--section.key=value`` overrides; validated."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist; pass a YAML file such as configs/mlp_fashion.yaml")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"config file '{path}' is not valid YAML: {str(err).splitlines()[0]}") from None
        _apply_mapping(cfg, data, str(path))
    for arg in overrides:
        section, key, value = parse_override(arg)
        _set(getattr(cfg, section), section, key, value, "command line")
    validate(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    """A validated Config from a nested dict (as written to ``config.yaml``)."""
    cfg = Config()
    _apply_mapping(cfg, data, "dict")
    validate(cfg)
    return cfg


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_microbatches(cfg: Config, key: str, m: int) -> None:
    batch = cfg.data.batch_size
    _require(m >= 1, f"{key} = {m}; must be >= 1")
    _require(m <= batch, f"{key} = {m} exceeds data.batch_size = {batch}; use at most one microbatch per sample")
    _require(
        not cfg.model.batchnorm or batch // m >= 2,
        f"model.batchnorm needs microbatches of >= 2 samples but data.batch_size = {batch} "
        f"/ {key} = {m} leaves {batch // m}; use fewer microbatches",
    )


def validate(cfg: Config) -> None:
    """Cross-field checks, run once at load."""
    _require(cfg.data.batch_size >= 1, f"data.batch_size = {cfg.data.batch_size}; must be >= 1")
    _require(cfg.data.eval_batch_size >= 1, f"data.eval_batch_size = {cfg.data.eval_batch_size}; must be >= 1")
    _require(cfg.data.seq_len >= 1, f"data.seq_len = {cfg.data.seq_len}; must be >= 1")
    _check_microbatches(cfg, "train.microbatches", cfg.train.microbatches)
    _require(cfg.train.steps >= 0, f"train.steps = {cfg.train.steps}; must be >= 0")
    _require(
        cfg.train.steps > 0 or cfg.train.epochs > 0,
        "train.steps and train.epochs are both 0; set one of them",
    )
    _require(cfg.train.eval_every >= 0, f"train.eval_every = {cfg.train.eval_every}; must be >= 0")
    limit = cfg.train.time_limit_sec
    _require(limit >= 0, f"train.time_limit_sec = {limit}; must be >= 0 (0: off)")
    _require(
        limit == 0 or cfg.train.eval_every > 0,
        f"train.time_limit_sec = {limit} is checked at evaluations but train.eval_every = 0; "
        "set train.eval_every to the steps between checks",
    )
    _require(cfg.optim.lr > 0, f"optim.lr = {cfg.optim.lr}; must be > 0")
    _require(cfg.optim.grad_clip >= 0, f"optim.grad_clip = {cfg.optim.grad_clip}; must be >= 0 (0: off)")
    _validate_optim(cfg.optim)
    _require(cfg.model.depth >= 1, f"model.depth = {cfg.model.depth}; must be >= 1")
    _require(cfg.model.width >= 1, f"model.width = {cfg.model.width}; must be >= 1")
    _require(cfg.model.hidden >= 0, f"model.hidden = {cfg.model.hidden}; must be >= 0 (0: none)")
    _validate_transformer(cfg.model)
    _require(
        len(cfg.model.channels) >= 1 and min(cfg.model.channels) >= 1,
        f"model.channels = {cfg.model.channels}; give at least one positive channel count",
    )
    _require(cfg.dist.timeout_sec > 0, f"dist.timeout_sec = {cfg.dist.timeout_sec}; must be > 0")
    _require(cfg.dist.queue_size >= 2, f"dist.queue_size = {cfg.dist.queue_size}; must be >= 2")
    _require(cfg.run.threads >= 0, f"run.threads = {cfg.run.threads}; must be >= 0")
    _require(cfg.run.log_every >= 1, f"run.log_every = {cfg.run.log_every}; must be >= 1")
    _validate_dni(cfg)
    balance = cfg.partition.balance
    if balance is not None:
        _require(
            len(balance) >= 1 and min(balance) >= 1,
            f"partition.balance = {balance}; every stage needs at least one layer",
        )


def _validate_transformer(m: ModelConfig) -> None:
    if m.name != "transformer":
        return
    _require(m.heads >= 1, f"model.heads = {m.heads}; must be >= 1")
    _require(
        m.width % m.heads == 0,
        f"model.width = {m.width} does not divide into model.heads = {m.heads} heads; "
        f"use a width that is a multiple of {m.heads} (e.g. {m.heads * max(1, round(m.width / m.heads))})",
    )
    _require(not m.batchnorm, "model.batchnorm = true; the transformer uses LayerNorm, set model.batchnorm=false")


def _validate_optim(o: OptimConfig) -> None:
    _require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
             f"optim.betas = {o.betas}; give two numbers in [0, 1) like [0.9, 0.999]")
    _require(o.momentum >= 0, f"optim.momentum = {o.momentum}; must be >= 0")
    _require(o.weight_decay >= 0, f"optim.weight_decay = {o.weight_decay}; must be >= 0")
    _require(o.warmup_steps >= 0, f"optim.warmup_steps = {o.warmup_steps}; must be >= 0")
    _require(0 <= o.min_lr <= o.lr, f"optim.min_lr = {o.min_lr} must lie in [0, optim.lr = {o.lr}]")


def _validate_dni(cfg: Config) -> None:
    d = cfg.dni
    _require(d.max_staleness >= 1, f"dni.max_staleness = {d.max_staleness}; must be >= 1")
    _check_microbatches(cfg, "dni.microbatches", d.microbatches)
    in_flight = d.max_staleness * d.microbatches
    _require(
        in_flight < cfg.dist.queue_size,
        f"dni.max_staleness x dni.microbatches = {in_flight} must be below dist.queue_size = "
        f"{cfg.dist.queue_size} (the mailbox must hold every message in flight); raise dist.queue_size",
    )
    _require(d.warmup_steps >= 0, f"dni.warmup_steps = {d.warmup_steps}; must be >= 0")
    for i, entry in enumerate(d.boundaries):
        probe = DNIConfig()
        for key, value in entry.items():
            _require(
                key in DNI_BOUNDARY_KEYS,
                f"dni.boundaries[{i}] sets '{key}'; a boundary may set: {', '.join(DNI_BOUNDARY_KEYS)}",
            )
            _set(probe, f"dni.boundaries[{i}]", key, value, "config")
            entry[key] = getattr(probe, key)
    for i in range(max(1, len(d.boundaries))):
        b = d.for_boundary(i)
        where = f"dni.boundaries[{i}]" if d.boundaries else "dni"
        _require(b.lr > 0, f"{where}.lr = {b.lr}; must be > 0")
        _require(b.hidden_layers >= 0, f"{where}.hidden_layers = {b.hidden_layers}; must be >= 0")
        _require(b.hidden_width >= 1 and b.rank >= 1, f"{where}: hidden_width and rank must be >= 1")
        _require(b.clip >= 0, f"{where}.clip = {b.clip}; must be >= 0 (0: off)")


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


if __name__ == "__main__":  # python -m pipedni.config [docs/usage.md]: see pipedni.configdoc
    from pipedni.configdoc import main

    sys.exit(main(sys.argv[1:]))
