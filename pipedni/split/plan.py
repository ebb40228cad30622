"""What ``pipedni.split`` returns: the stage modules, what crosses each boundary, the weights
tied across stages, and how the stages' state dicts merge back into the model's."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from pipedni.errors import CheckpointError
from pipedni.stage import num_params


@dataclass(frozen=True)
class BoundaryTensor:
    """One tensor crossing a boundary, as it was on the example microbatch."""

    name: str  # the graph's name for the value (e.g. ``layer1``, ``add_3``, ``attention_mask``)
    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool  # it depends on a parameter: its gradient travels back

    def describe(self) -> str:
        grad = "" if self.requires_grad else ", no grad"
        return f"{self.name} {list(self.shape)} {str(self.dtype).replace('torch.', '')}{grad}"


@dataclass
class SplitPlan:
    """Stage modules that take and return tensors (one that needs a gradient bare, else a tuple) and keep the
    model's own parameter names. ``boundaries[b]`` is what stage b hands stage b + 1, in the
    order it is passed; ``tied`` lists each parameter held by several stages, as (stage, name)
    pairs; ``split_points`` are the cuts as module names (the resolved ones when a method chose)."""

    stages: list[nn.Module]
    boundaries: list[list[BoundaryTensor]]
    input_names: list[str]
    split_points: list[tuple[str, str]]
    tracer: str
    keys: list[str] = field(repr=False)  # the model's state_dict keys, in its order
    tied: list[list[tuple[int, str]]] = field(default_factory=list)
    note: str = ""  # how method="time" chose the cuts: what each run of blocks cost

    def merge(self, state_dicts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The model's ``state_dict`` from one state dict per stage: exactly its keys, in its order."""
        if len(state_dicts) != len(self.stages):
            raise CheckpointError(f"merge got {len(state_dicts)} state dicts for {len(self.stages)} stages")
        merged: dict[str, torch.Tensor] = {}
        for state in state_dicts:
            merged.update(state)
        missing = [k for k in self.keys if k not in merged]
        if missing:
            raise CheckpointError(f"the stages' state dicts lack {len(missing)} of the model's keys, e.g. {missing[0]!r}")
        return {k: merged[k] for k in self.keys}

    def describe(self) -> str:
        """One line per stage (parameters, top-level modules) and per boundary (what crosses it)."""
        lines = []
        for i, stage in enumerate(self.stages):
            names = ", ".join(name for name, _ in stage.named_children())
            lines.append(f"stage {i}: {num_params(stage):>10,d} params  [{names}]")
            if i < len(self.boundaries):
                lines.append(f"  -> {'; '.join(t.describe() for t in self.boundaries[i])}")
        return "\n".join([*lines, self.note] if self.note else lines)


def tied_groups(stages: list[nn.Module]) -> list[list[tuple[int, str]]]:
    """Every parameter held by more than one stage, as its (stage, name) holders (one name per
    stage: a stage that knows it by two names counts it once)."""
    holders: dict[int, list[tuple[int, str]]] = {}
    for i, stage in enumerate(stages):
        seen_here: set[int] = set()
        for name, tensor in stage.named_parameters(remove_duplicate=False):
            holders.setdefault(id(tensor), [])
            if id(tensor) not in seen_here:
                holders[id(tensor)].append((i, name))
                seen_here.add(id(tensor))
    return [group for group in holders.values() if len({s for s, _ in group}) > 1]
