"""pipedni: pipeline-parallel training with decoupled stages (one process per stage)."""

from pipedni.partition import partition

__all__ = ["partition"]
__version__ = "0.1.0"
