"""Data parallel (``dist.data_parallel``): one stage's gradients averaged over its replicas by
DDP's reducer, bucketed and overlapped with the step's last backward.

[Note: averaging over replicas]
Every replica of stage i holds the same weights and computes its gradients on its own share of
the batch, accumulated over the step's microbatches. ``DistributedDataParallel``'s reducer,
built on the stage module (which keeps its own names: the DDP object is never called), has
autograd hooks on every parameter that stay idle until it is told a backward counts
(``prepare_for_backward``). A locked schedule tells it right before the step's last backward,
as torch.distributed.pipelining does for its own stages: the hooks then all-reduce each bucket
of accumulated gradients as soon as the last backward has finished with it, and average them
over the replicas. Decoupled schedules update from gradients of several steps at once (and
backpropagate through stashed weights, which the hooks never see): they run one replica for now.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.parallel.distributed import _find_tensors


class OneReplica:
    """No replicas: nothing to average."""

    def before_last_backward(self, outputs) -> None:
        pass


class Replicas:
    """This stage's replicas over ``group`` (its replica group of the mesh's "dp" dimension)."""

    def __init__(self, module: nn.Module, group, device: torch.device):
        self.ddp = DistributedDataParallel(module, process_group=group, broadcast_buffers=False,
                                           device_ids=[device] if device.type == "cuda" else None)

    def before_last_backward(self, outputs) -> None:
        """The coming backward is the step's last: its gradient hooks average every parameter's
        accumulated gradient over the replicas (see [Note: averaging over replicas])."""
        self.ddp.reducer.prepare_for_backward(list(_find_tensors(outputs)))


def make_replicas(module: nn.Module, group, device: torch.device) -> OneReplica | Replicas:
    """``Replicas`` over ``group``, or ``OneReplica`` without one (or for a stage without parameters)."""
    if group is None or not any(p.requires_grad for p in module.parameters()):
        return OneReplica()
    return Replicas(module, group, device)
