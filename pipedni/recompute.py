"""Activation checkpointing (``train.activation_checkpointing``): the parts of a stage that keep
only their inputs in the forward and compute the rest again in the backward.

[Note: recomputing a stage]
``blocks`` recomputes each child of an ``nn.Sequential`` stage on its own (a built-in model's
layers, a user's blocks): a backward then holds one block's activations at a time beside the
blocks' inputs. ``stage`` recomputes the whole stage from its input: the least memory, one more
forward. Both use ``torch.utils.checkpoint`` without reentrance, which replays the forward's RNG
(dropout) and autocast state, so the gradients are the ones without it, bit for bit. The
replay must not move batch-norm statistics a second time: its recompute context puts them
back. The module keeps its own parameter names (its ``forward`` is replaced on the instance,
not wrapped), so checkpoints, tied weights and the optimizer's names do not change; the replay
runs on the weights the forward ran on, which under weight stashing are not the module's own.
Compiled (``train.compile``), the checkpoint is traced into the graph: the compiled backward
recomputes from the forward's own inputs, stashed weights included, and a buffer's update is
part of the forward graph alone.
A ``pipedni.dni.Boundary`` backpropagates inside its own forward, which a replay inside a
backward cannot do: a stage holding one is refused.
"""

from __future__ import annotations

import contextlib
import types

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipedni.dni.interface import Boundary
from pipedni.errors import ConfigError
from pipedni.stage import kept_norm_stats

MODES = ("none", "blocks", "stage")


def _recomputed(self: nn.Module, *args, **kwargs):
    """``self``'s own forward, recomputed in the backward (see [Note: recomputing a stage]) on the
    weights this forward ran on: a stashed copy (``Stage.stash``) is swapped in for the forward
    alone, and the replay comes after it."""
    forward = type(self).forward.__get__(self)
    if not torch.is_grad_enabled() or self.__dict__.get("_replaying"):  # evaluation, or the replay itself
        return forward(*args, **kwargs)
    if torch.compiler.is_compiling():  # train.compile: the compiled backward recomputes from the graph's own inputs
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    weights = dict(self.named_parameters())

    def replay(*args):
        self.__dict__["_replaying"] = True
        try:
            return torch.func.functional_call(self, weights, args, kwargs)
        finally:
            self.__dict__["_replaying"] = False

    contexts = lambda: (contextlib.nullcontext(), kept_norm_stats(self))  # noqa: E731 (forward, replay)
    return checkpoint(replay, *args, use_reentrant=False, context_fn=contexts)


def _recompute(module: nn.Module) -> None:
    # A bound method, not a closure: a deep copy of the module rebinds it to the copy.
    module.forward = types.MethodType(_recomputed, module)


def check(module: nn.Module, mode: str, stage_index: int) -> None:
    """Whether stage ``stage_index``'s module can recompute as ``mode`` says: a ConfigError with the fix if not."""
    if mode == "none":
        return
    held = [name for name, m in module.named_modules() if isinstance(m, Boundary)]
    if held:
        raise ConfigError(f"train.activation_checkpointing = {mode!r}: stage {stage_index} holds a pipedni.dni.Boundary "
                          f"({held[0]}), which backpropagates in its forward and cannot be recomputed in a backward; "
                          "use --train.activation_checkpointing=none")
    if mode == "blocks" and not isinstance(module, nn.Sequential):
        raise ConfigError(f"train.activation_checkpointing = 'blocks' recomputes each block of an nn.Sequential stage, "
                          f"but stage {stage_index} is cut from the model's graph (pipedni.split) and has no blocks "
                          "of its own; use --train.activation_checkpointing=stage")


def apply(module: nn.Module, mode: str, stage_index: int) -> nn.Module:
    """``module`` (one stage) recomputing its activations as ``mode`` says; returns it."""
    check(module, mode, stage_index)
    if mode == "stage":
        _recompute(module)
    elif mode == "blocks":
        for block in module:
            _recompute(block)
    return module
