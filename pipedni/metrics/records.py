"""What a stage measures: one step's record, the metrics a schedule adds, and per-stage totals.

Every schedule fills the same ``StepStats``; a schedule's own figures (DNI's synthetic-gradient
loss, staleness, store size...) go in ``StepStats.extra`` under names its registry entry
declares as ``MetricSpec``s. The JSONL writer, ``StageTotals`` and the console render them
from those specs without knowing the schedule.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal, Optional, Union

Number = Union[int, float]


@dataclass
class StepStats:
    """What one stage did during one training step (seconds); None where it does not apply."""

    step: int
    loss: Optional[float] = None
    step_sec: float = 0.0
    compute_sec: float = 0.0
    wait_input_sec: float = 0.0
    wait_grad_sec: float = 0.0  # locked: waiting for gradients (and in collectives); decoupled: back-pressure
    send_wait_sec: float = 0.0
    bytes_sent: int = 0  # payload bytes this stage sent during the step (both directions)
    grad_norm: Optional[float] = None  # norm before clipping (when clipping): whole model, or the stage's
    extra: dict[str, Number] = field(default_factory=dict)  # the schedule's own metrics (MetricSpec.key)

    def record(self) -> dict:
        """One JSONL line's worth: the common fields, then the schedule's own; no None values."""
        record = {k: v for k, v in asdict(self).items() if k != "extra" and v is not None}
        record.update(self.extra)
        return record


@dataclass(frozen=True)
class MetricSpec:
    """A schedule's own per-step metric, declared once in its registry entry."""

    key: str  # name in StepStats.extra and metrics/stage<i>.jsonl
    summary_key: str  # name in summary.json's per-stage entry
    reduce: Literal["ema", "max", "sum"]  # ema: moving average (weight 0.05 per step); max: the largest; sum: the total
    header: str  # console column
    fmt: str  # console format spec, e.g. ".2f"

    def fold(self, total: Optional[Number], value: Optional[Number]) -> Optional[Number]:
        if value is None:
            return total
        if total is None:
            return value
        if self.reduce == "sum":
            return total + value
        return max(total, value) if self.reduce == "max" else 0.95 * total + 0.05 * value


@dataclass
class StageTotals:
    """Sums over the timed training steps of one stage (the first step, a warm-up, is excluded);
    ``bytes_sent`` counts training messages only (no evaluation, probes or warm-up)."""

    stage_index: int
    num_params: int = 0
    steps: int = 0
    step_sec: float = 0.0
    compute_sec: float = 0.0
    wait_input_sec: float = 0.0
    wait_grad_sec: float = 0.0
    send_wait_sec: float = 0.0
    bytes_sent: int = 0
    peak_memory_bytes: int = 0
    peak_activation_bytes: Optional[int] = None  # run.activation_memory: see pipedni.metrics.memory
    peak_queued_messages: int = 0  # most messages waiting in one incoming mailbox at once
    skipped_updates: int = 0  # non-finite updates dropped under train.on_nonfinite: skip
    compile_sec: Optional[float] = None  # train.compile: compiling and warming the stage, before training
    compiled: Optional[bool] = None  # train.compile: False where the stage could not be and ran eager
    metrics: tuple[MetricSpec, ...] = ()  # the schedule's own, folded into ``extra``
    extra: dict[str, Number] = field(default_factory=dict)

    def add(self, stats: StepStats) -> None:
        self.steps += 1
        for name in ("step_sec", "compute_sec", "wait_input_sec", "wait_grad_sec", "send_wait_sec", "bytes_sent"):
            setattr(self, name, getattr(self, name) + getattr(stats, name))
        for spec in self.metrics:
            value = spec.fold(self.extra.get(spec.summary_key), stats.extra.get(spec.key))
            if value is not None:
                self.extra[spec.summary_key] = value

    def summary(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("metrics", "extra") and v is not None}
        out.update(self.extra)
        out["busy_fraction"] = self.compute_sec / self.step_sec if self.step_sec > 0 else 0.0
        out["bytes_sent_per_step"] = self.bytes_sent // max(1, self.steps)
        return out
