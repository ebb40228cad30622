"""Built-in models, each an ``nn.Sequential`` of named layers that can be cut anywhere: the
registry and ``build_model`` (registry.py), ``mlp`` and ``cnn`` (vision.py), ``transformer``
(transformer.py)."""

# Importing the builders registers them; mlp, cnn, transformer is the order errors list them in.
from pipedni.models import vision  # noqa: F401  isort: skip
from pipedni.models import transformer  # noqa: F401  isort: skip
from pipedni.models.registry import MODELS, ModelBuilder, build_model, has_batchnorm, register_model

__all__ = ["MODELS", "ModelBuilder", "build_model", "has_batchnorm", "register_model"]
