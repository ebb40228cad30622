"""Loading a Config: defaults < YAML file < ``--section.key=value``, strict types, checks once at load.

Precedence: ``--section.key=value`` on the command line > the YAML file > the section defaults.
An unknown key lists the valid keys; a wrong type names the field, the value and the expected
type; ``validate`` runs the cross-field checks.
"""

from __future__ import annotations

import math
import typing
from pathlib import Path
from typing import Any, Optional

import yaml

from pipedni.config.sections import DNI_BOUNDARY_KEYS, SECTIONS, Config, DNIConfig, ModelConfig, OptimConfig
from pipedni.config.typecheck import coerce, type_name
from pipedni.errors import ConfigError


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


def expand_shorthands(argv: typing.Sequence[str]) -> list[str]:
    """``--resume`` is ``--checkpoint.resume=latest``; ``--resume=STEP`` (or a folder) names one."""
    out = []
    for arg in argv:
        if arg == "--resume":
            arg = "--checkpoint.resume=latest"
        elif arg.startswith("--resume="):
            arg = "--checkpoint.resume=" + arg.split("=", 1)[1]
        out.append(arg)
    return out


def load_config(path: Optional[str | Path] = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file at ``path``, then ``--section.key=value`` overrides (and the
    shorthands ``expand_shorthands`` knows); validated."""
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
    for arg in expand_shorthands(overrides):
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


def _validate_replicas(cfg: Config) -> None:
    d, batch, m = cfg.dist.data_parallel, cfg.data.batch_size, cfg.train.microbatches
    _require(d >= 1, f"dist.data_parallel = {d}; must be >= 1 (1: one pipeline)")
    _require(batch % d == 0, f"data.batch_size = {batch} (the global batch) does not divide into dist.data_parallel = "
                             f"{d} equal shares; make it a multiple of {d}")
    _require(d == 1 or batch // d >= m, f"data.batch_size = {batch} gives each of dist.data_parallel = {d} replicas "
                                        f"{batch // d} samples, fewer than train.microbatches = {m}; make the batch at "
                                        f"least {d * m}")


def validate(cfg: Config) -> None:
    """Cross-field checks, run once at load. What depends on the schedule (its name, the
    boundary modes, where synthetic inputs may run) is checked by the schedules themselves
    (``pipedni.schedules.registry.check_config``), which build on this package."""
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
    _validate_checkpoint(cfg)
    if cfg.run.tensorboard:
        from pipedni.metrics import tensorboard

        _require(tensorboard.available(), "run.tensorboard = true needs the tensorboard package; "
                                          "pip install 'pipedni[tensorboard]' (or tensorboard), or drop the option")
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
    _validate_replicas(cfg)
    for key in ("link_latency_ms", "link_bandwidth_mbps"):
        value = getattr(cfg.dist, key)
        _require(math.isfinite(value) and value >= 0, f"dist.{key} = {value}; must be >= 0 (0: off)")
    _require(cfg.run.threads >= 0, f"run.threads = {cfg.run.threads}; must be >= 0")
    _require(cfg.run.log_every >= 1, f"run.log_every = {cfg.run.log_every}; must be >= 1")
    _require(cfg.train.tied_sync_every >= 1, f"train.tied_sync_every = {cfg.train.tied_sync_every}; must be >= 1")
    _require(cfg.run.timeline_steps >= 0, f"run.timeline_steps = {cfg.run.timeline_steps}; must be >= 0 (0: off)")
    _validate_dni(cfg)
    delay = cfg.delayed.delay
    _require(delay >= 1, f"delayed.delay = {delay}; must be >= 1 (a stage never waits for its own step's gradient)")
    _require(
        delay + 2 <= cfg.dist.queue_size,
        f"delayed.delay = {delay} lets a stage run {delay} steps ahead, more than dist.queue_size = "
        f"{cfg.dist.queue_size} messages can hold; raise dist.queue_size to at least {delay + 2}",
    )
    balance = cfg.partition.balance
    if balance is not None:
        _require(
            len(balance) >= 1 and min(balance) >= 1,
            f"partition.balance = {balance}; every stage needs at least one layer",
        )


def _validate_checkpoint(cfg: Config) -> None:
    c = cfg.checkpoint
    _require(c.every_steps >= 0, f"checkpoint.every_steps = {c.every_steps}; must be >= 0 (0: off)")
    _require(c.every_minutes >= 0, f"checkpoint.every_minutes = {c.every_minutes}; must be >= 0 (0: off)")
    _require(c.keep_last >= 0, f"checkpoint.keep_last = {c.keep_last}; must be >= 0 (0: keep all)")
    _require(
        c.every_minutes == 0 or cfg.train.eval_every > 0,
        f"checkpoint.every_minutes = {c.every_minutes} is checked at evaluations but train.eval_every = 0; "
        "set train.eval_every to the steps between checks, or use checkpoint.every_steps",
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
        _require(b.min_cosine <= 1, f"{where}.min_cosine = {b.min_cosine}; must be <= 1 (0: always update)")
        _require(b.warmup_steps >= 0, f"{where}.warmup_steps = {b.warmup_steps}; must be >= 0")
        _require(b.si_min_r2 <= 1, f"{where}.si_min_r2 = {b.si_min_r2}; must be <= 1 (0: always predict)")
        _require(b.si_hidden_layers >= 0, f"{where}.si_hidden_layers = {b.si_hidden_layers}; must be >= 0")
        _require(b.si_lr > 0, f"{where}.si_lr = {b.si_lr}; must be > 0")
        _require(b.si_idle_updates >= 0, f"{where}.si_idle_updates = {b.si_idle_updates}; must be >= 0 (0: off)")


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

