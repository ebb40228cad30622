"""A simulated run: a schedule's streams replayed on costs and links, measured as the engine is.

Throughput is read at the last stage, as ``pipedni.bench.runner.measure`` reads a real run:
``batch_size x (timed steps - 1)`` samples between the ends of the first and the last timed
step, the first ``warmup_steps`` steps untimed. A stage's busy fraction is its compute over
the same steps' wall time (forward, backward, predictor, optimizer; waits and sends are not).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from pipedni.errors import ConfigError
from pipedni.metrics.timeline import Event
from pipedni.schedules.streams import (DEFAULT_DELAY, DEFAULT_MAX_STALENESS, check_staleness, pipeline_streams,
                                       simulated)
from pipedni.sim.costs import PipelineCost
from pipedni.sim.replay import StageTrace
from pipedni.sim.shared import replay
from pipedni.transport.link import LinkSpec


@dataclass(frozen=True)
class SimResult:
    """What a simulated run measured; ``events`` is the timeline, one list per stage."""

    schedule: str
    num_microbatches: int  # as run (async: 1)
    total_sec: float  # until the last stage finished, the drain included
    step_sec: float  # per step at the last stage, over the timed steps
    samples_per_sec: float
    busy_fraction: list[float]
    step_end_sec: list[list[float]]  # per stage, per training step (the drain not included)
    events: list[list[Event]]

    def window(self, first: int, count: int) -> list[list[Event]]:
        """The events of steps ``first`` .. ``first + count - 1``, as ``run.timeline_steps`` keeps them."""
        return [[e for e in events if first <= e.step < first + count] for events in self.events]

    def describe(self) -> str:
        b = self.busy_fraction
        busy = (" ".join(f"{x:.0%}" for x in b) if len(b) <= 8
                else f"min {min(b):.0%}, mean {sum(b) / len(b):.0%}, max {max(b):.0%}")
        return (f"{self.schedule} M={self.num_microbatches}: {self.samples_per_sec:.1f} samples/s, "
                f"{self.step_sec * 1e3:.2f} ms/step; busy per stage: {busy}")


def _ratio(numerator: float, denominator: float) -> float:
    if denominator > 0:
        return numerator / denominator
    return math.inf if numerator > 0 else 0.0


def measure(schedule: str, m: int, traces: list[StageTrace], steps: int, batch_size: int,
            warmup_steps: int) -> SimResult:
    """Throughput and busy fractions over the steps after ``warmup_steps`` (see the module doc)."""
    ends = traces[-1].step_end_sec
    span = ends[steps - 1] - ends[warmup_steps]
    busy = []
    for trace in traces:
        begin = trace.step_end_sec[warmup_steps - 1] if warmup_steps > 0 else 0.0
        busy.append(_ratio(sum(trace.busy_sec[warmup_steps:steps]), trace.step_end_sec[steps - 1] - begin))
    timed = steps - 1 - warmup_steps
    return SimResult(schedule, m, max(t.step_end_sec[-1] for t in traces), _ratio(span, timed),
                     _ratio(batch_size * timed, span), busy, [t.step_end_sec[:steps] for t in traces],
                     [t.events for t in traces])


def check(schedule: str, num_stages: int, num_microbatches: int, steps: int, batch_size: int,
          warmup_steps: int, link: LinkSpec, delay: int, max_staleness: int, cores: int = 0) -> None:
    """Every input a simulation could fail on, with the value and the fix."""
    spec = simulated(schedule)
    if num_stages < spec.min_stages:
        raise ConfigError(f"schedule {schedule!r} needs at least {spec.min_stages} stages, got {num_stages}")
    for name, value, low in (("num_microbatches", num_microbatches, 1), ("batch_size", batch_size, 1),
                             ("warmup_steps", warmup_steps, 0), ("delay", delay, 1),
                             ("max_staleness", max_staleness, 0), ("cores", cores, 0)):
        if value < low:
            raise ConfigError(f"{name} = {value}; must be >= {low}")
    if steps < warmup_steps + 2:
        raise ConfigError(f"steps = {steps} leaves under 2 timed steps after warmup_steps = {warmup_steps}; "
                          f"give at least {warmup_steps + 2}")
    if spec.runs_microbatches(num_microbatches) > batch_size:
        raise ConfigError(f"num_microbatches = {num_microbatches} is more than batch_size = {batch_size}; "
                          "a microbatch holds at least one sample")
    if link.latency_sec < 0 or link.bytes_per_sec < 0:
        raise ConfigError(f"link {link}: latency and bandwidth must be >= 0 (0 bandwidth: unlimited)")


def simulate(schedule: str, costs: PipelineCost, num_microbatches: int = 1, steps: int = 20,
             link: LinkSpec = LinkSpec(), batch_size: int = 256, warmup_steps: int = 1,
             boundaries: Sequence[str] = (), delay: int = DEFAULT_DELAY,
             max_staleness: int = DEFAULT_MAX_STALENESS, reduce_norm: bool = False,
             record: bool = True, trusted: bool = True, cores: int = 0, recompute: bool = False) -> SimResult:
    """``steps`` training steps of ``schedule`` on ``costs.num_stages`` stages, every edge direction
    a link of ``link``; ``boundaries``: the modes under ``mixed``; ``record``: keep the events;
    ``trusted``: every dni predictor trusted (else each dni stage in the untrusted fallback);
    ``cores``: 0, a processor per stage; else the stages share that many ([Note: shared cores]);
    ``recompute``: a delayed backward recomputes its forward (``delayed.weight_stashing: false``)."""
    n = costs.num_stages
    check(schedule, n, num_microbatches, steps, batch_size, warmup_steps, link, delay, max_staleness, cores)
    spec = simulated(schedule)
    check_staleness(spec, n, boundaries, delay, max_staleness)
    m = spec.runs_microbatches(num_microbatches)
    streams = pipeline_streams(schedule, n, m, steps, boundaries, delay, max_staleness, reduce_norm, trusted, recompute)
    traces = replay(streams, costs, m, link, record, cores)
    return measure(schedule, m, traces, steps, batch_size, warmup_steps)
