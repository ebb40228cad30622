"""A user's own training script: the script route of docs/own_model.md, which the tests run
under torchrun and alone. Its own model, data sets and loss; everything else from the command
line, as ``pipedni.train`` reads it."""

import sys

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import pipedni
from own_models import SkipNet


def smoothed(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(scores, labels, label_smoothing=0.1)


def blobs(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long() + 2 * (x[:, 1] + x[:, 2] > 0).long())


if __name__ == "__main__":
    torch.manual_seed(0)  # the same weights on every rank
    summary = pipedni.fit(SkipNet(num_classes=4), blobs(512, 0), blobs(128, 1), None, *sys.argv[1:],
                          loss=smoothed, split_points=["blocks.2"])
    if summary is not None:
        print(f"test accuracy {summary['test_accuracy']:.3f}")
