"""Asynchronous point-to-point messages between neighbouring stages (no schedule knowledge).

[Note: transport layout]
Every edge (i, i+1) gets two dedicated 2-rank process groups, one per direction, created in
the same order on every rank. One direction is then used by exactly one thread on each side
(the main thread sends; one thread receives: a receiver thread, or the consumer's own under
direct receive, see [Note: who receives]), so ops on one group never interleave and a slow
gradient never queues behind activations. Groups are warmed up at start-up: NCCL
connects lazily, and a send may block until the matching receive is posted.

Every message is a fixed-size int64 header (kind, step, microbatch, dtype, wire dtype, shape)
followed by the payload's bytes, whose receive is posted together with the header's once the
receiver can guess its size (see [Note: pre-posted payloads] in wire.py). With
``dist.wire_dtype`` set, floating payloads travel in that dtype and are cast back to their own
on receipt (half the bytes in bf16/fp16; integers and bools travel as they are). An edge may be
an emulated slow link: see [Note: emulated links] in link.py. Each incoming direction keeps
one receive posted ahead and files what lands in a mailbox keyed by (kind, step, microbatch);
consumers take messages by key, in any order, with a finite timeout. Who completes the posted
receive is below. Sends keep their tensors referenced until complete.

[Note: who receives]
gloo never reports an unwaited ``irecv`` complete (polling ``is_completed()`` would deadlock),
so someone must block on ``wait()``. By default a receiver thread per incoming direction does,
and files each message as it lands: a stage can ask whether a message has arrived without
waiting for it (decoupled stages do, every step), and a full mailbox stops the thread, which
stops the sender (back-pressure, not memory growth; at most ``SEND_WINDOW`` sends, or
``queue_size`` if smaller, in flight). The thread costs each message a hop, though: it must be
scheduled and take the GIL before the consumer can have the message, and then wake the
consumer; on 2 busy cores that was 1.4 ms a message more than torch's bare ``irecv``
(scripts/transport_bench.py), 1F1B's gap to torch's Schedule1F1B at M=8.
A locked schedule knows what it waits for and never asks without waiting, so its stages
(``direct_receive``) receive on the consumer's own thread, as torch's schedules do: ``take``
completes the posted receive itself (filing any other message that comes first) and posts the
next at once, so the peer's next message moves while the consumer computes. Nothing is
received while no consumer waits, so sends must not wait for their receiver within a step: a
direct stage lets up to ``queue_size`` sends be in flight, and ``settle`` (the end of each
locked step and evaluation) waits for all of them, which by then its neighbours have taken.
``close`` drains each incoming direction up to its closing message before waiting for its own
sends. An emulated link keeps the thread (its hold counts from when a message lands, which only
a thread sees), and so does NCCL (its receives run on the thread's own CUDA stream).

Backends: NCCL when every rank owns its GPU (payloads stay on the device; the receiver thread
uses its own CUDA stream and hands the consumer an event to wait on), gloo otherwise (CPU
tensors; GPU tensors of ranks sharing one GPU are staged through host memory).
"""

from __future__ import annotations

import time
from typing import Container, Optional, Sequence

import torch
import torch.distributed as dist

from pipedni.crossing import Spec, Value, describe_headers, describe_spec, spec_matches
from pipedni.errors import TransportError
from pipedni.metrics.timeline import NullTimeline, Timeline
from pipedni.transport.edge import IDLE_WAIT, DirectInbox, Inbox, Outbox, ThreadInbox
from pipedni.transport.link import LinkSpec
from pipedni.transport.wire import Header, Kind, describe_message as _what

# Sends in flight per direction. A completed gloo send is only known complete once waited on,
# so a larger window would keep that many already-delivered tensors alive for nothing.
SEND_WINDOW = 4


class Transport:
    """This stage's links to its neighbours: ``send``/``recv`` towards ``prev`` and ``next``."""

    def __init__(self, stage_index: int, num_stages: int, device: torch.device, wire_device: torch.device,
                 queue_size: int = 64, timeout: float = 300.0, link: LinkSpec = LinkSpec(),
                 wire_dtype: Optional[torch.dtype] = None, timeline: Timeline | NullTimeline = NullTimeline(),
                 tied: Sequence[Sequence[int]] = (), direct_receive: bool = False, replica: int = 0,
                 num_replicas: int = 1):
        """``link``: every edge's emulated latency and bandwidth (off by default); ``wire_dtype``:
        the dtype floating payloads travel in (None: their own); ``timeline``: where sends are
        recorded (and the step timers' calls: see ``Timers``); ``tied``: the stages holding each
        tied weight, a group apiece (see ``all_reduce``); ``direct_receive``: receive on the
        consumer's thread where the backend and link allow (a locked schedule's stages: see
        [Note: who receives]); ``replica`` of ``num_replicas``: which copy of the pipeline this
        stage belongs to (see [Note: ranks of a replicated pipeline] in pipedni/runtime.py)."""
        self.stage_index, self.num_stages, self.timeline = stage_index, num_stages, timeline
        self.device, self.timeout = device, timeout
        self.who = f"stage {stage_index}/{num_stages}" + (f" (replica {replica})" if num_replicas > 1 else "")
        self.outboxes: dict[str, Outbox] = {}
        self.inboxes: dict[str, Inbox] = {}
        self.direct = direct_receive and wire_device.type == "cpu" and not link.emulated
        window = queue_size if self.direct else min(SEND_WINDOW, queue_size)
        inbox = DirectInbox if self.direct else ThreadInbox
        sends = dict(link=link, link_capacity=queue_size, wire_dtype=wire_dtype)
        rank = lambda stage, r=replica: r * num_stages + stage  # noqa: E731 (global ranks)
        for r in range(num_replicas):  # same creation order on every rank: see the note
            for edge in range(num_stages - 1):
                ranks = [rank(edge, r), rank(edge + 1, r)]
                forward = dist.new_group(ranks, timeout=IDLE_WAIT)
                backward = dist.new_group(ranks, timeout=IDLE_WAIT)
                if r != replica:
                    continue
                if stage_index == edge:  # my "next" link
                    self.outboxes["next"] = Outbox(forward, ranks[1], wire_device, window, timeout, self.who, **sends,
                                                   peer_stage=edge + 1)
                    self.inboxes["next"] = inbox(backward, ranks[1], wire_device, device, queue_size, self.who, edge + 1)
                elif stage_index == edge + 1:  # my "prev" link
                    self.inboxes["prev"] = inbox(forward, ranks[0], wire_device, device, queue_size, self.who, edge)
                    self.outboxes["prev"] = Outbox(backward, ranks[0], wire_device, window, timeout, self.who, **sends,
                                                   peer_stage=edge)
        # This pipeline's stages (the whole world when there is one pipeline), and its holders of each tied weight.
        self.group = None
        self.tied_groups = []
        for r in range(num_replicas) if num_replicas > 1 else ():
            group = dist.new_group([rank(s, r) for s in range(num_stages)])
            self.group = group if r == replica else self.group
        for ranks in tied:
            for r in range(num_replicas):
                group = dist.new_group(sorted(rank(s, r) for s in ranks))
                if r == replica:
                    self.tied_groups.append(group)
        self._warm_up()

    def _warm_up(self) -> None:
        token = torch.zeros(1, device=self.device)
        for outbox in self.outboxes.values():
            outbox.send(Kind.WARMUP, 0, 0, token)
        for inbox in self.inboxes.values():
            inbox.take(Kind.WARMUP, 0, 0, self.timeout)

    def send(self, direction: str, kind: Kind, step: int, microbatch: int, value: Value) -> None:
        start = time.perf_counter()
        self.outboxes[direction].send(kind, step, microbatch, value)
        if self.timeline.recording:
            self.timeline.record(f"send {kind.name.lower()} {microbatch}", "send", start, time.perf_counter())

    def recv(self, direction: str, kind: Kind, step: int, microbatch: int, expect: Optional[Spec] = None) -> Value:
        headers, value = self.inboxes[direction].take(kind, step, microbatch, self.timeout)
        if expect is not None and not spec_matches(expect, headers):
            peer = self.inboxes[direction].peer_name
            raise TransportError(
                f"{self.who} expected {_what(kind, step, microbatch)} from {peer} as {describe_spec(expect)} "
                f"but {peer} sent {describe_headers(headers)}"
            )
        return value

    def recv_ready(self, direction: str, kind: Kind, steps: Container[int]) -> list[tuple[Header, Value]]:
        """The messages of ``kind`` for ``steps`` that have arrived; the others stay for ``recv``."""
        return self.inboxes[direction].take_ready(kind, steps)

    def arrived(self, direction: str, kind: Kind, step: int, microbatch: int) -> bool:
        """Whether that message is already here, so ``recv`` would not wait."""
        return self.inboxes[direction].has(kind, step, microbatch)

    def settle(self) -> None:
        """On a stage that receives directly, wait until every message sent so far has been
        received: locked steps and evaluations end with it (their neighbours take every message
        of the step within it), or up to ``queue_size`` sent tensors would stay alive. A stage
        with receiver threads keeps at most ``SEND_WINDOW`` in flight anyway: nothing to do."""
        for outbox in self.outboxes.values() if self.direct else ():
            outbox.flush()

    def all_reduce(self, tensor: torch.Tensor, group: Optional[int] = None) -> torch.Tensor:
        """Sum ``tensor`` in place over every stage (the default group), or over the holders of
        tied weight ``group``: a barrier of those stages, so schedules call it only as an
        explicit action (``ALL_REDUCE``, ``REDUCE_TIED``)."""
        dist.all_reduce(tensor, group=self.group if group is None else self.tied_groups[group])
        return tensor

    @property
    def send_wait_sec(self) -> float:
        return sum(o.wait_sec for o in self.outboxes.values())

    @property
    def bytes_sent(self) -> int:
        return sum(o.bytes_sent for o in self.outboxes.values())

    def counts(self) -> dict[str, int]:
        """Messages sent and received per direction (``sent_next``, ``received_prev``, ...)."""
        out = {f"sent_{d}": o.num_sent for d, o in self.outboxes.items()}
        out.update({f"received_{d}": i.num_received for d, i in self.inboxes.items()})
        return out

    @property
    def peak_queued(self) -> int:
        return max((i.peak_queued for i in self.inboxes.values()), default=0)

    def close(self) -> None:
        """Tell both neighbours we are done, wait for their closing messages, then finish our
        sends (a direct inbox receives only while it waits); nothing may be left."""
        for outbox in self.outboxes.values():
            outbox.send(Kind.CLOSE, 0, 0)
        for inbox in self.inboxes.values():
            inbox.join(self.timeout)
        for outbox in self.outboxes.values():
            outbox.flush()
        leftover = [f"{m} from {i.peer_name}" for i in self.inboxes.values() for m in i.pending()]
        if leftover:
            raise TransportError(f"{self.who} closed with {len(leftover)} unconsumed message(s): {', '.join(leftover[:5])}")


class NullTransport:
    """The links of a stage that has no neighbours (one process): nothing to send or receive,
    an all-reduce over one stage is the identity, and every counter stays at zero."""

    group = None  # its pipeline is itself

    stage_index, num_stages, who = 0, 1, "stage 0/1"
    send_wait_sec, bytes_sent, peak_queued = 0.0, 0, 0

    def __init__(self, timeline: Timeline | NullTimeline = NullTimeline()):
        self.timeline = timeline

    def send(self, direction: str, kind: Kind, step: int, microbatch: int, value: Value) -> None:
        raise TransportError(f"{self.who} has no '{direction}' neighbour to send {_what(kind, step, microbatch)} to")

    def recv(self, direction: str, kind: Kind, step: int, microbatch: int, expect: Optional[Spec] = None) -> Value:
        raise TransportError(f"{self.who} has no '{direction}' neighbour to receive {_what(kind, step, microbatch)} from")

    def recv_ready(self, direction: str, kind: Kind, steps: Container[int]) -> list[tuple[Header, Value]]:
        return []

    def settle(self) -> None:
        pass

    def all_reduce(self, tensor: torch.Tensor, group: Optional[int] = None) -> torch.Tensor:
        return tensor

    def counts(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        pass
