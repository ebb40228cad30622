"""What each stage's work and messages cost in a simulated run: per batch, from a profile or uniform.

[Note: simulated costs are per batch]
Every figure is for one whole batch, as ``pipedni.bench.profile`` measures it; the simulator
divides compute and message bytes by the microbatch count the schedule runs with. One cost
object therefore serves every schedule of a sweep, including ``async``, which the engine runs
with one microbatch whatever ``train.microbatches`` says. Small microbatches cost more per
sample than a whole batch (on a CPU, much more), so a profile that timed forward and backward
with the batch in M microbatches (``microbatched``, from ``pipedni.bench.profile
--microbatches``) gives the costs of a run with M; ``together`` scales them by how much slower
the stages were when timed all at once. Without that, ``fwd_bwd_sec`` is split forward :
backward = 1 : 2 (a backward computes the gradients of both inputs and weights) unless the
profile has ``forward_sec`` and ``backward_sec`` of its own.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any, Optional, Sequence

from pipedni.errors import ConfigError
from pipedni.transport.wire import HEADER_LEN

HEADER_BYTES = HEADER_LEN * 8  # the int64 header every message carries before its payload
FORWARD_SHARE = 1 / 3  # of fwd_bwd_sec, when a profile does not time forward and backward apart


@dataclass(frozen=True)
class StageCost:
    """One stage's costs for one whole batch (see [Note: simulated costs are per batch])."""

    forward_sec: float
    backward_sec: float
    optimizer_sec: float = 0.0  # one update (a step, not a microbatch)
    predictor_sec: float = 0.0  # the dni predictor's predict + fit (0 on the last stage)
    activation_bytes: float = 0.0  # payload this stage sends forward (its output)
    gradient_bytes: float = 0.0  # payload this stage sends backward (its input's gradient)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"StageCost.{f.name} = {value!r}; give a finite number >= 0")

    @property
    def step_sec(self) -> float:
        """The stage's compute for one batch: what it takes a step when it never waits."""
        return self.forward_sec + self.backward_sec + self.optimizer_sec + self.predictor_sec


@dataclass(frozen=True)
class PipelineCost:
    """Every stage's costs, first to last, and the processor time each message costs: its
    sender's main thread (``message_sec``) and, once delivered, the receiving side's threads
    (``receive_sec``: see [Note: receiving costs a processor] in shared.py)."""

    stages: tuple[StageCost, ...]
    message_sec: float = 0.0  # fixed, per message sent (calibrate it against a measured run)
    receive_sec: float = 0.0  # fixed, per message delivered, before the receiving stage can take it

    def __post_init__(self) -> None:
        if not self.stages:
            raise ConfigError("a simulated pipeline needs at least one stage")
        for name in ("message_sec", "receive_sec"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} = {value!r}; give a finite number >= 0")

    @property
    def num_stages(self) -> int:
        return len(self.stages)


def activations_from_sent(sent: list[float]) -> list[float]:
    """Each boundary's activation bytes from what each stage sent per step: stage i sends its
    activation a_i forward and its input's gradient, as large as a_{i-1}, backward, so a_0 is
    stage 0's bytes and a_i = stage i's bytes - a_{i-1} (the last stage sends no activation)."""
    activation = [0.0] * len(sent)
    for i in range(len(sent) - 1):
        activation[i] = max(sent[i] - (activation[i - 1] if i > 0 else 0.0), 0.0)
    return activation


def uniform(num_stages: int, forward_sec: float, backward_sec: float, optimizer_sec: float = 0.0,
            predictor_sec: float = 0.0, activation_bytes: float = 0.0, gradient_bytes: Optional[float] = None,
            message_sec: float = 0.0) -> PipelineCost:
    """``num_stages`` identical stages, each costing what is given (per batch). The last stage has
    no predictor and sends nothing forward; gradients are as large as activations unless given."""
    if num_stages < 1:
        raise ConfigError(f"num_stages = {num_stages}; a pipeline needs at least 1 stage")
    grad = activation_bytes if gradient_bytes is None else gradient_bytes
    stages = []
    for i in range(num_stages):
        last = i == num_stages - 1
        stages.append(StageCost(forward_sec, backward_sec, optimizer_sec, 0.0 if last else predictor_sec,
                                0.0 if last else activation_bytes, 0.0 if i == 0 else grad))
    return PipelineCost(tuple(stages), message_sec)


def _stage_from_profile(entry: dict[str, Any], index: int, together: bool, microbatches: Optional[int]) -> StageCost:
    key = "fwd_bwd_together_sec" if together else "fwd_bwd_sec"
    split = entry.get("microbatched", {}).get(str(microbatches))
    if split is not None:
        slower = entry[key] / entry["fwd_bwd_sec"] if together and entry.get("fwd_bwd_sec") else 1.0
        forward, backward = split["forward_sec"] * slower, split["backward_sec"] * slower
    elif "forward_sec" in entry and "backward_sec" in entry:
        forward, backward = entry["forward_sec"], entry["backward_sec"]
    elif key in entry:
        forward, backward = entry[key] * FORWARD_SHARE, entry[key] * (1 - FORWARD_SHARE)
    else:
        raise ConfigError(f"profile stage {index} has no {key} (nor forward_sec and backward_sec); "
                          "give the output of python -m pipedni.bench.profile or a bench results.json")
    return StageCost(forward, backward, entry.get("optimizer_sec", 0.0), entry.get("predictor_sec", 0.0),
                     entry.get("activation_bytes", 0.0), entry.get("gradient_bytes", 0.0))


def profile_stages(profile: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-stage entries of ``python -m pipedni.bench.profile``'s JSON, or of a bench ``results.json``."""
    profile = profile.get("profile", profile)
    entries = profile.get("stages") if isinstance(profile, dict) else None
    if not entries:
        raise ConfigError("the profile has no 'stages' list; give the output of python -m pipedni.bench.profile "
                          "or a bench results.json")
    return entries


def from_profile(profile: dict[str, Any], message_sec: float = 0.0, together: bool = False,
                 activation_bytes: Optional[float] = None, microbatches: Optional[int] = None) -> PipelineCost:
    """Costs from ``python -m pipedni.bench.profile``'s JSON, or a bench ``results.json`` (its
    ``profile``). ``together``: the times taken with every stage running at once;
    ``microbatches``: a run's microbatch count, whose timing the profile may hold.
    ``activation_bytes`` (per batch) fills each boundary's messages where the profile has none."""
    stages = [_stage_from_profile(entry, i, together, microbatches) for i, entry in enumerate(profile_stages(profile))]
    if activation_bytes is not None:
        last = len(stages) - 1
        stages = [StageCost(s.forward_sec, s.backward_sec, s.optimizer_sec, s.predictor_sec,
                            0.0 if i == last else activation_bytes, 0.0 if i == 0 else activation_bytes)
                  for i, s in enumerate(stages)]
    return PipelineCost(tuple(stages), message_sec)


def allreduce_sec(nbytes: float, replicas: int, bandwidth_gbps: float, latency_sec: float = 0.0) -> float:
    """A ring all-reduce of ``nbytes`` over ``replicas``: each sends and receives 2 (D-1)/D of it
    in 2 (D-1) hops (``bandwidth_gbps``: gigabits a second per replica, 0: unlimited)."""
    if replicas <= 1:
        return 0.0
    hops = 2 * (replicas - 1)
    moved = nbytes * hops / replicas
    return hops * latency_sec + (0.0 if bandwidth_gbps <= 0 else moved * 8 / (bandwidth_gbps * 1e9))


def replicated(costs: PipelineCost, replicas: int, sync_sec: Sequence[float]) -> PipelineCost:
    """One pipeline of ``replicas`` (``dist.data_parallel``), each on 1/D of the batch: every
    stage's compute and message bytes scale with its share of the rows (per batch: see [Note:
    simulated costs are per batch]; on a CPU small shares cost more per sample than that, as small
    microbatches do), and every update first waits for its gradients' average over the replicas,
    ``sync_sec[i]`` for stage i, added to its optimizer time. Not overlapped with the backward:
    for locked schedules, whose reducer overlaps it with the step's last backward, an upper bound."""
    if replicas < 1 or len(sync_sec) != costs.num_stages:
        raise ConfigError(f"replicas = {replicas} with {len(sync_sec)} all-reduce times for {costs.num_stages} "
                          "stages; give replicas >= 1 and one time per stage")
    share = 1.0 / replicas
    stages = tuple(StageCost(s.forward_sec * share, s.backward_sec * share, s.optimizer_sec + sync,
                             s.predictor_sec * share, s.activation_bytes * share, s.gradient_bytes * share)
                   for s, sync in zip(costs.stages, sync_sec))
    return dataclasses.replace(costs, stages=stages)
