"""The synthetic data set: class-dependent means plus unit noise, generated from the seed (no files).

Not to be confused with the synthetic gradients of pipedni/dni/ (the DNI predictors).
"""

from __future__ import annotations

import torch

from pipedni.config import DataConfig
from pipedni.data.dataset import Dataset, Source
from pipedni.errors import DataError

SYNTHETIC = "synthetic"


def load_synthetic(cfg: DataConfig, seed: int) -> tuple[Dataset, Dataset]:
    """Class-dependent means plus unit noise: learnable, cheap, and fixed by `seed` alone."""
    shape, num_classes, size = list(cfg.synthetic_shape), cfg.synthetic_classes, cfg.synthetic_size
    if not shape or min(shape) < 1 or num_classes < 2 or size < 1:
        raise DataError(
            f"synthetic data needs positive data.synthetic_shape (got {shape}), data.synthetic_classes "
            f">= 2 (got {num_classes}) and data.synthetic_size >= 1 (got {size})"
        )
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(num_classes, *shape, generator=gen)

    def draw(n: int) -> Dataset:
        targets = torch.randint(num_classes, (n,), generator=gen)
        inputs = means[targets] + torch.randn(n, *shape, generator=gen)
        return Dataset(inputs=inputs, targets=targets, num_classes=num_classes, name=SYNTHETIC)

    return draw(size), draw(max(1, size // 4))


SOURCE = Source(SYNTHETIC, load_synthetic, num_classes=None)  # data.synthetic_classes decides
