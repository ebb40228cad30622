"""Stages that share processors: the replay on one global clock.

[Note: shared cores]
The replay of replay.py gives every stage a processor of its own, so each stage can run ahead
on a clock of its own. When N single-threaded stage processes share C < N cores, as 3 or 4
stages do on this 2-core machine, a stage's forward takes longer while others compute too, so
its time depends on what every other stage does at that moment. ``SharedReplay`` therefore
keeps one clock for all and models the operating system's fair scheduler as processor sharing:
while k pieces of work are held on a pool of C processors (a stage's compute, a send's
per-message cost, a message being received), each progresses at min(1, C / k) of its speed.
Between two events (a piece of work finishing, a message arriving, a stage waking on one it
took) nothing changes, so the loop jumps from event to event. Every stage first runs as far as
it can without processor time (receives of messages already delivered, all-reduces every stage
has reached), then either holds work, sleeps until a message it took arrives, or waits for one
not sent yet. A stage's busy time is the wall time of its compute, as the engine's timers
measure it: under sharing, more than its cost. With ``cores`` > 0 every stage draws on one pool
of that many; with 0, each stage has a pool of one processor of its own. With no receiving cost
and C >= N this gives exactly the times of ``Replay`` (tested), which stays the default.

[Note: receiving costs a processor]
A message costs processor time at both ends. The sender's main thread pays ``message_sec``
(the header, the posting), which the replay has always charged. The receiving side's work
(the transport's copy off the socket, the receiver thread that decodes the header and files the
message: see pipedni/transport/transport.py) runs beside the stage's own thread, so a stage never waits for it
when a processor is free, but it takes a share of a busy one. That share is what a decoupled
pipeline on few cores pays and a locked one hardly does: a locked stage is idle while its next
message comes in, a decoupled stage is computing. ``receive_sec`` models it: a message
delivered on a direction is received there, in order, one at a time, as a piece of work on the
receiving stage's pool, and the stage can take it once that work is done.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Sequence

from pipedni.schedules.streams import Stream
from pipedni.sim.costs import PipelineCost
from pipedni.sim.replay import Key, Replay, StageProcess, StageTrace, shares_processors
from pipedni.transport.link import LinkSpec

TICK = 1e-12  # seconds: work left or a wake-up closer than this counts as now (float rounding)
Direction = tuple[int, int]  # (from stage, to stage)


class SharedReplay(Replay):
    """``Replay`` on processors shared by the stages and by their messages' receipt (see
    [Note: shared cores]): ``cores`` > 0 for one pool of that many, 0 for one per stage."""

    def __init__(self, streams: Sequence[Stream], costs: PipelineCost, num_microbatches: int,
                 link: LinkSpec = LinkSpec(), record: bool = True, cores: int = 1):
        super().__init__(streams, costs, num_microbatches, link, record)
        if cores < 0:
            raise ValueError(f"cores = {cores}; give 0 (a processor per stage) or more")
        self.cores, self.now = cores, 0.0
        self.work: dict[int, list[float]] = {}  # stage -> [processor seconds left, when the work began]
        self.sleep: dict[int, float] = {}  # stage -> when the message it has taken arrives
        self.arrivals: dict[Direction, deque[tuple[float, Key]]] = {}  # delivered (or to be), not yet received
        self.receiving: dict[Direction, list] = {}  # direction -> [processor seconds left, the message]

    def run(self) -> list[StageTrace]:
        while True:
            while self.runnable:
                self._advance(self.procs[self.runnable.popleft()])
            if not (self.work or self.sleep or self.receiving or any(self.arrivals.values())):
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

    def _deliver(self, key: Key, at: float) -> None:
        """A message that costs its receiver waits on its direction to be received (see
        [Note: receiving costs a processor]); else it can be taken at once."""
        if self.costs.receive_sec <= 0:
            super()._deliver(key, at)
            return
        self.arrivals.setdefault((key[3], key[4]), deque()).append((at, key))

    def _pool(self, stage: int) -> int:
        return stage if self.cores == 0 else -1

    def _rates(self) -> dict[int, float]:
        """Each pool's speed per piece of work held on it (see [Note: shared cores])."""
        held = Counter(map(self._pool, self.work)) + Counter(self._pool(dst) for _, dst in self.receiving)
        return {pool: min(1.0, max(self.cores, 1) / k) for pool, k in held.items()}

    def _next_event(self) -> None:
        """Move the clock to the next end of work, arrival or wake-up, sharing the cores on the way."""
        rates = self._rates()
        until = [left / rates[self._pool(i)] for i, (left, _) in self.work.items()]
        until += [left / rates[self._pool(d[1])] for d, (left, _) in self.receiving.items()]
        until += [t - self.now for t in self.sleep.values()]
        until += [queue[0][0] - self.now for d, queue in self.arrivals.items() if queue and d not in self.receiving]
        step = max(min(until), 0.0)
        self.now += step
        for index, (left, began) in sorted(self.work.items()):
            rate = rates[self._pool(index)]
            if left - step * rate > TICK:
                self.work[index][0] = left - step * rate
                continue
            del self.work[index]
            p = self.procs[index]
            p.clock = self.now
            self._finish_work(p, p.action)
            self._complete(p, began)
            self.runnable.append(index)
        for direction, (left, key) in sorted(self.receiving.items()):
            rate = rates[self._pool(direction[1])]
            if left - step * rate > TICK:
                self.receiving[direction][0] = left - step * rate
                continue
            del self.receiving[direction]
            super()._deliver(key, self.now)
        for direction, queue in sorted(self.arrivals.items()):
            if queue and direction not in self.receiving and queue[0][0] <= self.now + TICK:
                self.receiving[direction] = [self.costs.receive_sec, queue.popleft()[1]]
        for index, wake in sorted(self.sleep.items()):
            if wake <= self.now + TICK:
                del self.sleep[index]
                self.runnable.append(index)


def replay(streams: Sequence[Stream], costs: PipelineCost, num_microbatches: int, link: LinkSpec = LinkSpec(),
           record: bool = True, cores: int = 0) -> list[StageTrace]:
    """Every stage's trace after replaying ``streams`` (see [Note: replay order] in replay.py); raises
    ``DeadlockError`` naming the stuck stages and what each waits for. ``cores``: 0, every stage on
    a processor of its own; else the stages share that many (see [Note: shared cores] above).
    Messages that cost their receiver (``costs.receive_sec``) need the one clock too."""
    if shares_processors(len(streams), cores, costs.receive_sec):
        return SharedReplay(streams, costs, num_microbatches, link, record, cores).run()
    return Replay(streams, costs, num_microbatches, link, record).run()
