"""Stages that share fewer processors than there are stages: the replay on one global clock.

[Note: shared cores]
The replay of replay.py gives every stage a processor of its own, so each stage can run ahead
on a clock of its own. When N single-threaded stage processes share C < N cores, as 3 or 4
stages do on this 2-core machine, a stage's forward takes longer while others compute too, so
its time depends on what every other stage does at that moment. ``SharedReplay`` therefore
keeps one clock for all and models the operating system's fair scheduler as processor sharing:
while k stages hold processor work (compute, or a send's per-message cost), each progresses at
min(1, C / k) of its speed. Between two events (a piece of work finishing, a message arriving
for a stage that sleeps on it) nothing changes, so the loop jumps from event to event. Every
stage first runs as far as it can without processor time (receives of messages already
delivered, all-reduces every stage has reached), then either holds work, sleeps until a message
it took arrives, or waits for one not sent yet. A stage's busy time is the wall time of its
compute, as the engine's timers measure it: under sharing, more than its cost. With C >= N
this gives exactly the times of ``Replay`` (tested), which stays the default.
"""

from __future__ import annotations

from typing import Sequence

from pipedni.link import LinkSpec
from pipedni.sim.costs import PipelineCost
from pipedni.sim.replay import Replay, StageTrace, StageProcess
from pipedni.sim.streams import Stream

TICK = 1e-12  # seconds: work left or a wake-up closer than this counts as now (float rounding)


class SharedReplay(Replay):
    """``Replay`` on ``cores`` processors shared by every stage (see [Note: shared cores])."""

    def __init__(self, streams: Sequence[Stream], costs: PipelineCost, num_microbatches: int,
                 link: LinkSpec = LinkSpec(), record: bool = True, cores: int = 1):
        super().__init__(streams, costs, num_microbatches, link, record)
        if cores < 1:
            raise ValueError(f"cores = {cores}; stages need at least one processor")
        self.cores, self.now = cores, 0.0
        self.work: dict[int, list[float]] = {}  # stage -> [processor seconds left, when the work began]
        self.sleep: dict[int, float] = {}  # stage -> when the message it has taken arrives

    def run(self) -> list[StageTrace]:
        while True:
            while self.runnable:
                self._advance(self.procs[self.runnable.popleft()])
            if not self.work and not self.sleep:
                return self._traces()
            self._next_event()

    def _advance(self, p: StageProcess) -> None:
        while not p.done:
            if p.clock > self.now + TICK:  # a receive took a message that arrives later
                self.sleep[p.index] = p.clock
                return
            seconds = self._cpu_sec(p, p.action)
            if seconds > 0:
                self.work[p.index] = [seconds, p.clock]
                return
            start = p.clock
            if not self._try(p, p.action):
                return
            self._complete(p, start)

    def _next_event(self) -> None:
        """Move the clock to the next end of work or wake-up, sharing the cores on the way."""
        rate = min(1.0, self.cores / len(self.work)) if self.work else 0.0
        until = [left / rate for left, _ in self.work.values()] + [t - self.now for t in self.sleep.values()]
        step = max(min(until), 0.0)
        self.now += step
        for index, (left, began) in sorted(self.work.items()):
            if left - step * rate > TICK:
                self.work[index][0] = left - step * rate
                continue
            del self.work[index]
            p = self.procs[index]
            p.clock = self.now
            self._finish_work(p, p.action)
            self._complete(p, began)
            self.runnable.append(index)
        for index, wake in sorted(self.sleep.items()):
            if wake <= self.now + TICK:
                del self.sleep[index]
                self.runnable.append(index)
