"""The discrete-event core: each stage a sequential process replaying its stream on costs and links.

[Note: replay order]
Each stage runs its actions in order on a clock of its own. Compute takes its cost; SEND costs
the sender ``message_sec`` and the message is delivered at ``LinkModel.deliver_at`` of that
time on the edge direction's own link (pipedni/transport/link.py, [Note: emulated links]); RECV waits until the
message named by (kind, step, microbatch, from stage, to stage) is delivered; ALL_REDUCE waits
until every stage has reached it. A delivery time depends only on the sender's clock and the
earlier messages on the same direction, which that one sender sent before, and a RECV waits
for one named message, so running each stage as far as it can go until it must wait for a
message not sent yet, in any order, gives exactly the times a global event queue would. No
stream asks "what has arrived by now?" (see [Note: the decoupled stream] in streams.py): that
would need the queue. When no stage can move and some have actions left, the streams
deadlock, and the error says who waits for what. This holds while every stage has a processor
of its own and a message costs only its sender; stages sharing fewer cores, or messages whose
receipt takes processor time, need the one clock of shared.py ([Note: shared cores]).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Sequence, Union

from pipedni.metrics.timeline import Event
from pipedni.schedules.actions import ActionKind, DeadlockError
from pipedni.schedules.steps import SimAction
from pipedni.schedules.streams import Stream
from pipedni.sim.costs import HEADER_BYTES, PipelineCost, StageCost
from pipedni.transport.link import LinkModel, LinkSpec

Key = tuple[str, int, int, int, int]  # (F or B, step, microbatch, from stage, to stage)
K = ActionKind
CATEGORY = {K.F: "forward", K.B: "backward", K.SG: "predictor", K.FIT: "predictor", K.STEP: "optimizer",
            K.SEND_F: "send", K.SEND_B: "send", K.RECV_F: "wait for activation", K.RECV_B: "wait for gradient",
            K.ALL_REDUCE: "optimizer"}
COMPUTE = (K.F, K.B, K.SG, K.FIT, K.STEP)  # what counts as busy (an all-reduce's wait does not)


@dataclass
class StageTrace:
    """What one stage did: when each step ended, its compute seconds per step, its events."""

    step_end_sec: list[float] = field(default_factory=list)  # one per step, then the finish
    busy_sec: list[float] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)


class StageProcess:
    """One stage being replayed: where it is in its stream, and its clock."""

    def __init__(self, index: int, stream: Stream, cost: StageCost):
        self.index, self.stream, self.cost = index, stream, cost
        self.step, self.pos, self.clock, self.busy = 0, 0, 0.0, 0.0
        self.reduced = 0  # ALL_REDUCEs passed
        self.waits_for: Union[Key, int, None] = None  # a message, or the index of an all-reduce
        self.trace = StageTrace()
        self.close_steps()

    @property
    def done(self) -> bool:
        return self.step == len(self.stream)

    @property
    def action(self) -> SimAction:
        return self.stream[self.step][self.pos]

    def close_steps(self) -> None:
        """Record the end of every step whose actions are all done."""
        while not self.done and self.pos == len(self.stream[self.step]):
            self.trace.step_end_sec.append(self.clock)
            self.trace.busy_sec.append(self.busy)
            self.step, self.pos, self.busy = self.step + 1, 0, 0.0


class Replay:
    """Streams replayed on costs and links; ``run`` returns each stage's trace."""

    def __init__(self, streams: Sequence[Stream], costs: PipelineCost, num_microbatches: int,
                 link: LinkSpec = LinkSpec(), record: bool = True):
        if len(streams) != costs.num_stages:
            raise ValueError(f"{len(streams)} streams for {costs.num_stages} stages' costs")
        self.n, self.m, self.costs, self.spec, self.record = len(streams), num_microbatches, costs, link, record
        self.procs = [StageProcess(i, list(s), c) for i, (s, c) in enumerate(zip(streams, costs.stages))]
        self.links: dict[tuple[int, int], LinkModel] = {}
        self.mailbox: dict[Key, float] = {}  # sent, not yet received: when it is delivered
        self.sent: set[Key] = set()
        self.waiting: dict[Key, int] = {}  # a message -> the stage blocked on it
        self.arrived: dict[int, dict[int, float]] = {}  # all-reduce index -> {stage: when it got there}
        self.runnable = deque(range(self.n))

    def run(self) -> list[StageTrace]:
        while self.runnable:
            self._advance(self.procs[self.runnable.popleft()])
        return self._traces()

    def _traces(self) -> list[StageTrace]:
        """Every stage's trace once no stage can move; raises if one is stuck or a message is left."""
        stuck = [p for p in self.procs if not p.done]
        if stuck:
            raise DeadlockError("simulated deadlock, no stage can move: " + "; ".join(map(self._describe, stuck)))
        if self.mailbox:
            left = ", ".join(_what(key) for key in sorted(self.mailbox)[:4])
            raise DeadlockError(f"{len(self.mailbox)} message(s) sent but never received, e.g. {left}")
        return [p.trace for p in self.procs]

    def _advance(self, p: StageProcess) -> None:
        while not p.done:
            start = p.clock
            if not self._try(p, p.action):
                return
            self._complete(p, start)

    def _complete(self, p: StageProcess, start: float) -> None:
        """``p``'s action ran from ``start`` to ``p.clock``: count it, record it, go on to the next."""
        action = p.action
        if action.kind in COMPUTE:
            p.busy += p.clock - start
        if self.record:
            p.trace.events.append(Event(action.name(p.step), CATEGORY[action.kind], start, p.clock - start, p.step))
        p.pos += 1
        p.close_steps()

    def _try(self, p: StageProcess, action: SimAction) -> bool:
        """Do ``action`` on ``p``'s clock; False (nothing done) if it must wait."""
        kind = action.kind
        if kind in COMPUTE or kind.startswith("SEND_"):
            p.clock += self._cpu_sec(p, action)
            self._finish_work(p, action)
            return True
        if kind.startswith("RECV_"):
            return self._recv(p, action)
        if kind == ActionKind.ALL_REDUCE:
            return self._all_reduce(p)
        raise ValueError(f"stage {p.index}: unknown action kind {kind!r} in {action}")

    def _cpu_sec(self, p: StageProcess, action: SimAction) -> float:
        """What ``action`` costs ``p``'s processor: its compute, a send's message cost; else 0."""
        kind, cost = action.kind, p.cost
        if kind.startswith("SEND_"):
            return self.costs.message_sec
        if kind == ActionKind.STEP:
            return cost.optimizer_sec
        per_batch = {K.F: cost.forward_sec, K.B: cost.backward_sec, K.SG: cost.predictor_sec, K.FIT: cost.predictor_sec}
        return per_batch[kind] / self.m if kind in per_batch else 0.0

    def _finish_work(self, p: StageProcess, action: SimAction) -> None:
        """What is left once ``action``'s processor time is spent: a send posts its message."""
        if action.kind.startswith("SEND_"):
            self._send(p, action)

    def _send(self, p: StageProcess, action: SimAction) -> None:
        """Post ``action``'s message at ``p.clock``, the end of its sender's cost."""
        forward = action.kind == ActionKind.SEND_F
        dst = p.index + 1 if forward else p.index - 1
        if not 0 <= dst < self.n:
            raise ValueError(f"stage {p.index}: {action} sends to stage {dst}, which does not exist")
        key: Key = (action.kind[-1], action.step, action.microbatch, p.index, dst)
        if key in self.sent:
            raise ValueError(f"stage {p.index} sends {_what(key)} twice")
        payload = p.cost.activation_bytes if forward else p.cost.gradient_bytes
        link = self.links.setdefault((p.index, dst), LinkModel(self.spec))
        self.sent.add(key)
        self._deliver(key, link.deliver_at(p.clock, payload / self.m + HEADER_BYTES))

    def _deliver(self, key: Key, at: float) -> None:
        """The message ``key`` can be taken from ``at`` on; a stage blocked on it can move."""
        self.mailbox[key] = at
        if key in self.waiting:
            self.runnable.append(self.waiting.pop(key))

    def _recv(self, p: StageProcess, action: SimAction) -> bool:
        src = p.index - 1 if action.kind == ActionKind.RECV_F else p.index + 1
        key: Key = (action.kind[-1], action.step, action.microbatch, src, p.index)
        if key not in self.mailbox:
            self.waiting[key], p.waits_for = p.index, key
            return False
        p.clock = max(p.clock, self.mailbox.pop(key))
        p.waits_for = None
        return True

    def _all_reduce(self, p: StageProcess) -> bool:
        arrived = self.arrived.setdefault(p.reduced, {})
        if p.index not in arrived:
            arrived[p.index] = p.clock
            if len(arrived) == self.n:  # the last to arrive lets every other one go
                self.runnable.extend(i for i in arrived if i != p.index)
        if len(arrived) < self.n:
            p.waits_for = p.reduced
            return False
        p.clock, p.waits_for = max(arrived.values()), None
        p.reduced += 1
        return True

    def _describe(self, p: StageProcess) -> str:
        where = f"stage {p.index} at step {p.step}" if p.step < len(p.stream) - 1 else f"stage {p.index} at finish"
        if isinstance(p.waits_for, tuple):
            src = self.procs[p.waits_for[3]]
            gone = f" (stage {src.index} has finished without sending it)" if src.done else ""
            return f"{where} waits for {_what(p.waits_for)}{gone}"
        missing = [i for i in range(self.n) if i not in self.arrived.get(p.waits_for or 0, {})]
        return f"{where} waits in all-reduce #{p.waits_for} for stages {missing}"


def _what(key: Key) -> str:
    kind, step, mb, src, dst = key
    noun = "activation" if kind == ActionKind.F else "gradient"
    return f"the {noun} of step {step} microbatch {mb} from stage {src} to stage {dst}"


def shares_processors(num_stages: int, cores: int, receive_sec: float) -> bool:
    """Whether a replay needs shared.py's one clock: fewer cores than stages, or messages whose
    receipt takes processor time beside a stage's compute."""
    return 0 < cores < num_stages or receive_sec > 0
