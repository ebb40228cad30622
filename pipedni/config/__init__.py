"""Typed run configuration: the sections (sections.py), loading and checks (load.py), value
types (typecheck.py) and the generated reference table (reference.py).

Precedence: ``--section.key=value`` on the command line > the YAML file > the section defaults.
``python -m pipedni.config`` prints the reference table that ``docs/config.md`` embeds.
"""

from pipedni.config.load import config_from_dict, load_config, parse_override, save_config, validate
from pipedni.config.sections import (
    DNI_BOUNDARY_KEYS,
    SECTIONS,
    CheckpointConfig,
    Config,
    DataConfig,
    DelayedConfig,
    DistConfig,
    DNIConfig,
    ModelConfig,
    OptimConfig,
    PartitionConfig,
    RunConfig,
    TrainConfig,
)

__all__ = [
    "DNI_BOUNDARY_KEYS",
    "SECTIONS",
    "CheckpointConfig",
    "Config",
    "DataConfig",
    "DelayedConfig",
    "DistConfig",
    "DNIConfig",
    "ModelConfig",
    "OptimConfig",
    "PartitionConfig",
    "RunConfig",
    "TrainConfig",
    "config_from_dict",
    "load_config",
    "parse_override",
    "save_config",
    "validate",
]
