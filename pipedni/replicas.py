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
over the replicas.

A decoupled schedule's gradients of one update come from several backwards, some through
stashed weight copies the hooks never see, so it averages just before the update instead
(``average``): each parameter's accumulated gradient is handed back to autograd, through the
parameter's own gradient accumulator, whose hook gives it to the same reducer (a backward with
no compute: the buckets are all-reduced as they fill). Every replica of a stage then makes the
same update, and the replicas stay equal as long as they make their updates at the same steps:
the delays are fixed, and where a step's rule depends on what the replica measured (a dni
stage trusting its predictor) the replicas agree first (``agree``: the one flag all-reduced).
Predictors are not averaged: each fits the gradients of its own share, and whatever it
predicts, the stage's update is the replicas' average. What depends on when a message arrives
(``dni.synthetic_inputs``' updates while a true input is late) cannot be agreed without waiting
for it, and is refused with replicas (pipedni/schedules/registry.py).
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.parallel.distributed import _find_tensors

# The DDP object is never called, so its forward never syncs buffers; the keyword that says so
# was renamed (and the old one warns) in newer torch.
NO_BUFFER_SYNC = ({"forward_sync_buffers": False}
                  if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                  else {"broadcast_buffers": False})


class OneReplica:
    """No replicas: nothing to average or agree on."""

    ddp = None

    def before_last_backward(self, outputs) -> None:
        pass

    def average(self) -> None:
        pass

    def agree(self, flag: bool) -> bool:
        return flag


class Replicas:
    """This stage's replicas over ``group`` (its replica group of the mesh's "dp" dimension)."""

    def __init__(self, module: nn.Module, group, device: torch.device):
        self.group, self.device = group, device
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.ddp = None if not self.params else DistributedDataParallel(
            module, process_group=group, device_ids=[device] if device.type == "cuda" else None, **NO_BUFFER_SYNC)

    def before_last_backward(self, outputs) -> None:
        """The coming backward is the step's last: its gradient hooks average every parameter's
        accumulated gradient over the replicas (see [Note: averaging over replicas])."""
        if self.ddp is not None:
            self.ddp.reducer.prepare_for_backward(list(_find_tensors(outputs)))

    def average(self) -> None:
        """The gradients accumulated so far, averaged over the replicas now (a decoupled update's:
        see [Note: averaging over replicas]); a parameter without one counts as zero."""
        if self.ddp is None:
            return
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        self.ddp.reducer.prepare_for_backward([])
        torch.autograd.backward(self.params, grads)

    def agree(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every replica of this stage (a collective of the replicas)."""
        t = torch.tensor([int(flag)], dtype=torch.int32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return bool(t.item())


def make_replicas(module: nn.Module, group, device: torch.device) -> OneReplica | Replicas:
    """``Replicas`` over ``group``, or ``OneReplica`` without one."""
    return OneReplica() if group is None else Replicas(module, group, device)
