"""pipedni: pipeline-parallel training with decoupled stages (one process per stage)."""

from pipedni.split import split
from pipedni.split.partition import partition

__all__ = ["fit", "partition", "split"]


def __getattr__(name: str):
    """``pipedni.fit`` (the script route) imports the engine only when asked for: ``python -m
    pipedni.train`` must not find its own module already imported by the package."""
    if name == "fit":
        from pipedni.script import fit

        return fit
    raise AttributeError(f"module 'pipedni' has no attribute {name!r}")
__version__ = "0.1.0"
