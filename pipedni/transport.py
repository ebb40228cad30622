"""Asynchronous point-to-point messages between neighbouring stages (no schedule knowledge).

[Note: transport layout]
Every edge (i, i+1) gets two dedicated 2-rank process groups, one per direction, created in
the same order on every rank. One direction is then used by exactly one thread on each side
(the main thread sends, a receiver thread receives), so ops on one group never interleave and
a slow gradient never queues behind activations. Groups are warmed up at start-up: NCCL
connects lazily, and a send may block until the matching receive is posted.

Every message is a fixed-size int64 header (kind, step, microbatch, dtype, wire dtype, shape)
followed by the payload's bytes, whose receive is posted together with the header's once the
receiver can guess its size (see [Note: pre-posted payloads] in wire.py). With
``dist.wire_dtype`` set, floating payloads travel in that dtype and are cast back to their own
on receipt (half the bytes in bf16/fp16; integers and bools travel as they are). An edge may be
an emulated slow link: see [Note: emulated links] in link.py. A receiver thread per incoming
direction posts ``irecv`` and blocks on ``wait()`` (gloo never reports an unwaited ``irecv``
complete, so polling ``is_completed()`` would deadlock), then files the tensor in a bounded
mailbox keyed by (kind, step, microbatch). Consumers take messages by key, in any order, with a
finite timeout. A full mailbox stops the receiver thread, which stops the sender:
back-pressure, not memory growth. Sends keep their tensors referenced until complete, and at
most ``SEND_WINDOW`` (or ``queue_size``, if smaller) are in flight.

Backends: NCCL when every rank owns its GPU (payloads stay on the device; the receiver thread
uses its own CUDA stream and hands the consumer an event to wait on), gloo otherwise (CPU
tensors; GPU tensors of ranks sharing one GPU are staged through host memory).
"""

from __future__ import annotations

import contextlib
import datetime
import threading
import time
from collections import deque
from typing import Container, Optional

import torch
import torch.distributed as dist

from pipedni.boundary import TensorSpec
from pipedni.errors import TransportError
from pipedni.link import LinkSpec, make_link
from pipedni.metrics.timeline import NullTimeline, Timeline
from pipedni.wire import HEADER_LEN, Header, Kind, NextSize, describe_message as _what

# Sends in flight per direction. A completed gloo send is only known complete once waited on,
# so a larger window would keep that many already-delivered tensors alive for nothing.
SEND_WINDOW = 4
# Receiver threads block until the peer's CLOSE message; consumers enforce the real timeout.
_IDLE_WAIT = datetime.timedelta(days=365)


class Outbox:
    """Send side of one edge direction: async sends, at most ``capacity`` in flight (each holding
    its tensor alive); the oldest is waited for before another starts. Messages go through the
    edge's link: posted at once, or held for an emulated link's delivery time on its own thread
    (which then owns the sends in flight; see [Note: emulated links])."""

    def __init__(self, group, peer: int, wire_device: torch.device, capacity: int, timeout: float, who: str,
                 link: LinkSpec = LinkSpec(), link_capacity: int = 64, wire_dtype: Optional[torch.dtype] = None):
        self.group, self.peer, self.wire_device = group, peer, wire_device
        self.capacity, self.timeout, self.who, self.wire_dtype = capacity, timeout, who, wire_dtype
        self.pending: deque = deque()  # (works, tensors kept alive, description)
        self.wait_sec = 0.0
        self.num_sent = 0
        self.bytes_sent = 0
        self.cuda = wire_device.type == "cuda"
        self.direct = not link.emulated  # sends are posted, and their waits counted, on the caller's thread
        self.sizes = NextSize()  # the receiver's guess of the next payload's size, kept in step with it
        on_thread = (lambda: torch.cuda.set_device(wire_device)) if self.cuda else (lambda: None)
        self.link = make_link(link, link_capacity, timeout, who, f"to stage {peer}", on_thread)

    def send(self, kind: Kind, step: int, microbatch: int, tensor: Optional[torch.Tensor] = None) -> None:
        wire = None if tensor is None else self._on_wire(tensor)
        header = Header(kind, step, microbatch, torch.float32 if tensor is None else tensor.dtype,
                        () if wire is None else tuple(wire.shape),
                        None if wire is None or wire.dtype == tensor.dtype else wire.dtype)
        encoded = header.encode().to(self.wire_device)  # raises before anything is sent or counted
        # A payload is its bytes; a filler first completes a receive posted for a wrong guess.
        guess, size = self.sizes.guess, header.nbytes
        self.sizes.update(size)
        filler = [] if guess is None or guess == size else [torch.zeros(guess, dtype=torch.uint8, device=self.wire_device)]
        payload = [wire.reshape(-1).view(torch.uint8)] if size else []
        tensors = [encoded, *filler, *payload]
        what = _what(kind, step, microbatch)
        ready = None
        if self.cuda and not self.direct:  # the link's thread posts it: after the work that made it
            ready = torch.cuda.Event()
            ready.record()
        sent_bytes = sum(t.numel() * t.element_size() for t in tensors[1:])  # payload and filler
        nbytes = sent_bytes + encoded.numel() * encoded.element_size()
        waited = self.link.put(nbytes, lambda: self._post(tensors, what, ready))  # may add to wait_sec
        self.wait_sec += waited
        self.num_sent += 1
        self.bytes_sent += sent_bytes

    def _on_wire(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach()
        if self.wire_dtype is not None and tensor.is_floating_point() and tensor.dtype != self.wire_dtype:
            tensor = tensor.to(self.wire_dtype)  # before the copy to the wire device: fewer bytes to copy
        return tensor.to(self.wire_device).contiguous()

    def _post(self, tensors: list[torch.Tensor], what: str, ready=None) -> None:
        while len(self.pending) >= self.capacity:
            self._retire_oldest()
        if ready is not None:
            torch.cuda.current_stream().wait_event(ready)
        works = [dist.isend(t, dst=self.peer, group=self.group) for t in tensors]
        self.pending.append((works, tensors, what))

    def _retire_oldest(self) -> None:
        works, _, what = self.pending.popleft()
        start = time.perf_counter()
        try:
            for work in works:
                work.wait(datetime.timedelta(seconds=self.timeout))
        except RuntimeError as err:
            raise TransportError(
                f"{self.who} could not send {what} to stage {self.peer} within {self.timeout:.0f}s "
                f"(is stage {self.peer} alive and receiving?): {str(err).splitlines()[0]}"
            ) from None
        if self.direct:
            self.wait_sec += time.perf_counter() - start

    def flush(self) -> None:
        """Every message sent is posted and complete (an emulated link's thread is idle after its drain)."""
        self.link.drain(self.timeout)
        while self.pending:
            self._retire_oldest()
        self.link.close()


class Inbox:
    """Receive side of one edge direction: a thread filling a bounded mailbox keyed by message."""

    def __init__(self, group, peer: int, wire_device: torch.device, device: torch.device, capacity: int, who: str):
        self.group, self.peer, self.wire_device, self.device = group, peer, wire_device, device
        self.capacity, self.who = capacity, who
        self.mailbox: dict[tuple[int, int, int], tuple[Header, torch.Tensor, object]] = {}
        self.cond = threading.Condition()
        self.closed = False
        self.error: Optional[BaseException] = None
        self.num_received = 0  # every message taken off the wire, the closing one included
        self.peak_queued = 0  # most messages ever waiting in the mailbox at once
        self.sizes = NextSize()  # guesses the next payload's size as the peer's Outbox does
        self.num_guessed = 0  # payloads that landed in a buffer posted with their header
        self.thread = threading.Thread(target=self._run, name=f"recv-from-{peer}", daemon=True)
        self.thread.start()

    def _recv(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.irecv(tensor, src=self.peer, group=self.group).wait(_IDLE_WAIT)
        return tensor

    def _run(self) -> None:
        stream = torch.cuda.Stream(self.wire_device) if self.wire_device.type == "cuda" else None
        try:
            if stream is not None:
                torch.cuda.set_device(self.wire_device)
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                while self._receive_one(stream):
                    pass
        except BaseException as err:  # handed to the consumer, which raises it with context
            with self.cond:
                self.error = err
                self.cond.notify_all()

    def _receive_one(self, stream) -> bool:
        raw = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.wire_device)
        receiving_header = dist.irecv(raw, src=self.peer, group=self.group)
        guess = self.sizes.guess  # posted with the header: see [Note: pre-posted payloads]
        guessed = None if guess is None else torch.empty(guess, dtype=torch.uint8, device=self.wire_device)
        receiving_guess = None if guessed is None else dist.irecv(guessed, src=self.peer, group=self.group)
        receiving_header.wait(_IDLE_WAIT)
        header = Header.decode(raw.cpu())
        size = header.nbytes
        self.sizes.update(size)
        if receiving_guess is not None:
            receiving_guess.wait(_IDLE_WAIT)  # the payload, or the sender's filler for a wrong guess
        if header.kind == Kind.CLOSE:
            with self.cond:
                self.closed = True
                self.num_received += 1
                self.cond.notify_all()
            return False
        if guess == size:
            data = guessed
            self.num_guessed += 1
        else:  # posted now that its size is known (an empty payload is never sent)
            data = torch.empty(size, dtype=torch.uint8, device=self.wire_device)
            if size:
                self._recv(data)
        payload = data.view(header.payload_dtype).view(header.shape)
        event = None
        if stream is not None:
            event = torch.cuda.Event()
            event.record(stream)
        key = (int(header.kind), header.step, header.microbatch)
        with self.cond:
            while len(self.mailbox) >= self.capacity:
                self.cond.wait()
            if key in self.mailbox:
                raise TransportError(f"{self.who} received {_what(header.kind, header.step, header.microbatch)} twice from stage {self.peer}")
            self.mailbox[key] = (header, payload, event)
            self.num_received += 1
            self.peak_queued = max(self.peak_queued, len(self.mailbox))
            self.cond.notify_all()
        return True

    def _check_alive(self, what: str) -> None:
        if self.error is not None:
            detail = (str(self.error).splitlines() or [type(self.error).__name__])[0]
            err = TransportError(
                f"{self.who} lost the connection from stage {self.peer} while waiting for {what} "
                f"(stage {self.peer} exited or crashed; its own error says why): {detail[:120]}"
            )
            err.neighbour_lost = True  # a consequence: the CLI lets the neighbour's own error go first
            raise err
        if self.closed:
            raise TransportError(f"{self.who} waited for {what} but stage {self.peer} had already closed its side")

    def take(self, kind: Kind, step: int, microbatch: int, timeout: float) -> tuple[Header, torch.Tensor]:
        """The message with this key, waiting at most ``timeout`` seconds for it."""
        key, what = (int(kind), step, microbatch), _what(kind, step, microbatch)
        deadline = time.monotonic() + timeout
        with self.cond:
            while key not in self.mailbox:
                self._check_alive(what)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TransportError(
                        f"{self.who} timed out after {timeout:.0f}s waiting for {what} from stage {self.peer} "
                        f"({len(self.mailbox)} other message(s) queued); is stage {self.peer} stuck or much slower? "
                        "raise dist.timeout_sec if so"
                    )
                self.cond.wait(min(left, 1.0))
            header, payload, event = self.mailbox.pop(key)
            self.cond.notify_all()
        return header, self._to_device(header, payload, event)

    def has(self, kind: Kind, step: int, microbatch: int) -> bool:
        """Whether that message has arrived (it stays in the mailbox)."""
        with self.cond:
            return (int(kind), step, microbatch) in self.mailbox

    def take_ready(self, kind: Kind, steps: Container[int]) -> list[tuple[Header, torch.Tensor]]:
        """Every message of ``kind`` for one of ``steps`` that has already arrived, without waiting
        (step order)."""
        with self.cond:
            if self.error is not None:
                self._check_alive(f"any {kind.name.lower()}")
            keys = sorted(k for k in self.mailbox if k[0] == int(kind) and k[1] in steps)
            items = [self.mailbox.pop(k) for k in keys]
            self.cond.notify_all()
        return [(h, self._to_device(h, p, e)) for h, p, e in items]

    def _to_device(self, header: Header, payload: torch.Tensor, event) -> torch.Tensor:
        """The payload on the consumer's device in its own dtype (a wire dtype is cast back)."""
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
            payload.record_stream(torch.cuda.current_stream(self.device))
        if payload.device != self.device:
            payload = payload.to(self.device, non_blocking=True)
        return payload.to(header.dtype) if header.dtype != payload.dtype else payload

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise TransportError(f"{self.who} did not receive the closing message from stage {self.peer} within {timeout:.0f}s")
        if self.error is not None:
            self._check_alive("the closing message")

    def pending(self) -> list[str]:
        with self.cond:
            return [_what(Kind(k[0]), k[1], k[2]) for k in sorted(self.mailbox)]


class Transport:
    """This stage's links to its neighbours: ``send``/``recv`` towards ``prev`` and ``next``."""

    def __init__(self, stage_index: int, num_stages: int, device: torch.device, wire_device: torch.device,
                 queue_size: int = 64, timeout: float = 300.0, link: LinkSpec = LinkSpec(),
                 wire_dtype: Optional[torch.dtype] = None, timeline: Timeline | NullTimeline = NullTimeline()):
        """``link``: every edge's emulated latency and bandwidth (off by default); ``wire_dtype``:
        the dtype floating payloads travel in (None: their own); ``timeline``: where sends are
        recorded (and the step timers' calls: see ``Timers``)."""
        self.stage_index, self.num_stages, self.timeline = stage_index, num_stages, timeline
        self.device, self.timeout = device, timeout
        self.who = f"stage {stage_index}/{num_stages}"
        self.outboxes: dict[str, Outbox] = {}
        self.inboxes: dict[str, Inbox] = {}
        window = min(SEND_WINDOW, queue_size)
        sends = dict(link=link, link_capacity=queue_size, wire_dtype=wire_dtype)
        for edge in range(num_stages - 1):  # same creation order on every rank: see the note
            forward = dist.new_group([edge, edge + 1], timeout=_IDLE_WAIT)
            backward = dist.new_group([edge, edge + 1], timeout=_IDLE_WAIT)
            if stage_index == edge:  # my "next" link
                self.outboxes["next"] = Outbox(forward, edge + 1, wire_device, window, timeout, self.who, **sends)
                self.inboxes["next"] = Inbox(backward, edge + 1, wire_device, device, queue_size, self.who)
            elif stage_index == edge + 1:  # my "prev" link
                self.inboxes["prev"] = Inbox(forward, edge, wire_device, device, queue_size, self.who)
                self.outboxes["prev"] = Outbox(backward, edge, wire_device, window, timeout, self.who, **sends)
        self._warm_up()

    def _warm_up(self) -> None:
        token = torch.zeros(1, device=self.device)
        for outbox in self.outboxes.values():
            outbox.send(Kind.WARMUP, 0, 0, token)
        for inbox in self.inboxes.values():
            inbox.take(Kind.WARMUP, 0, 0, self.timeout)

    def send(self, direction: str, kind: Kind, step: int, microbatch: int, tensor: torch.Tensor) -> None:
        start = time.perf_counter()
        self.outboxes[direction].send(kind, step, microbatch, tensor)
        if self.timeline.recording:
            self.timeline.record(f"send {kind.name.lower()} {microbatch}", "send", start, time.perf_counter())

    def recv(self, direction: str, kind: Kind, step: int, microbatch: int,
             expect: Optional[TensorSpec] = None) -> torch.Tensor:
        header, tensor = self.inboxes[direction].take(kind, step, microbatch, self.timeout)
        if expect is not None and not expect.matches(header.shape, header.dtype):
            peer = self.inboxes[direction].peer
            raise TransportError(
                f"{self.who} expected {_what(kind, step, microbatch)} from stage {peer} as {expect.describe()} "
                f"but stage {peer} sent {header.describe()}"
            )
        return tensor

    def recv_ready(self, direction: str, kind: Kind, steps: Container[int]) -> list[tuple[Header, torch.Tensor]]:
        """The messages of ``kind`` for ``steps`` that have arrived; the others stay for ``recv``."""
        return self.inboxes[direction].take_ready(kind, steps)

    def arrived(self, direction: str, kind: Kind, step: int, microbatch: int) -> bool:
        """Whether that message is already here, so ``recv`` would not wait."""
        return self.inboxes[direction].has(kind, step, microbatch)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` in place over every stage (the default group): a barrier of the whole
        pipe, so schedules call it only as an explicit action (``ALL_REDUCE``)."""
        dist.all_reduce(tensor)
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
        """Tell both neighbours we are done, finish our sends, wait for theirs; nothing may be left."""
        for outbox in self.outboxes.values():
            outbox.send(Kind.CLOSE, 0, 0)
        for outbox in self.outboxes.values():
            outbox.flush()
        for inbox in self.inboxes.values():
            inbox.join(self.timeout)
        leftover = [f"{m} from stage {i.peer}" for i in self.inboxes.values() for m in i.pending()]
        if leftover:
            raise TransportError(f"{self.who} closed with {len(leftover)} unconsumed message(s): {', '.join(leftover[:5])}")


class NullTransport:
    """The links of a stage that has no neighbours (one process): nothing to send or receive,
    an all-reduce over one stage is the identity, and every counter stays at zero."""

    stage_index, num_stages, who = 0, 1, "stage 0/1"
    send_wait_sec, bytes_sent, peak_queued = 0.0, 0, 0

    def __init__(self, timeline: Timeline | NullTimeline = NullTimeline()):
        self.timeline = timeline

    def send(self, direction: str, kind: Kind, step: int, microbatch: int, tensor: torch.Tensor) -> None:
        raise TransportError(f"{self.who} has no '{direction}' neighbour to send {_what(kind, step, microbatch)} to")

    def recv(self, direction: str, kind: Kind, step: int, microbatch: int,
             expect: Optional[TensorSpec] = None) -> torch.Tensor:
        raise TransportError(f"{self.who} has no '{direction}' neighbour to receive {_what(kind, step, microbatch)} from")

    def recv_ready(self, direction: str, kind: Kind, steps: Container[int]) -> list[tuple[Header, torch.Tensor]]:
        return []

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def counts(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        pass
