"""The two ends of one direction of an edge between neighbouring stages: ``Outbox`` sends
messages, an ``Inbox`` receives them into a mailbox (on a thread of its own, or on its consumer's).
``Transport`` (transport.py) holds one of each per neighbour; see [Note: transport layout] there."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import threading
import time
from collections import deque
from typing import Container, Optional

import numpy as np
import torch
import torch.distributed as dist

from pipedni.crossing import Value
from pipedni.errors import TransportError
from pipedni.transport.link import Link, LinkSpec
from pipedni.transport.wire import (HEADER_BYTES, Header, Kind, NextSize, as_bytes, combined, next_size,
                                    packed, payload_of, wire_buffer, describe_message as _what)

Part = tuple[Header, torch.Tensor, object]  # one tensor of a message as received: header, payload, CUDA event
# Receiver threads block until the peer's CLOSE message; consumers enforce the real timeout.
IDLE_WAIT = datetime.timedelta(days=365)


def peer_name(peer: int, stage: Optional[int]) -> str:
    """How messages name the neighbour: by its stage (``peer`` is its global rank, which differs
    once the pipeline is replicated)."""
    return f"stage {peer if stage is None else stage}"


class Outbox:
    """Send side of one edge direction: async sends, at most ``capacity`` in flight (each holding
    its tensor alive); the oldest is waited for before another starts. Each message is posted at
    once; an emulated link stamps its header with how long the receiver holds it (see [Note:
    emulated links])."""

    def __init__(self, group, peer: int, wire_device: torch.device, capacity: int, timeout: float, who: str,
                 link: LinkSpec = LinkSpec(), link_capacity: int = 64, wire_dtype: Optional[torch.dtype] = None,
                 peer_stage: Optional[int] = None):
        self.group, self.peer, self.wire_device = group, peer, wire_device
        self.peer_name = peer_name(peer, peer_stage)
        self.capacity, self.timeout, self.who, self.wire_dtype = capacity, timeout, who, wire_dtype
        self.pending: deque = deque()  # (works, tensors kept alive, description)
        self.wait_sec = 0.0
        self.num_sent = 0
        self.bytes_sent = 0
        self.sizes: list[NextSize] = []  # per part, the receiver's guess of the next payload's size, kept in step
        self.link = Link(link, link_capacity, timeout, who, f"to {self.peer_name}")

    def send(self, kind: Kind, step: int, microbatch: int, value: Optional[Value] = None) -> None:
        """One message: a tensor, a tuple of them (each part with its own header, an empty tuple
        as one empty part), or nothing (the close)."""
        if isinstance(value, tuple):
            for part, tensor in enumerate(value or (torch.empty(0),)):
                self._send_part(kind, step, microbatch, tensor, part, len(value), True)
        else:
            self._send_part(kind, step, microbatch, value)
        self.num_sent += 1

    def _send_part(self, kind: Kind, step: int, microbatch: int, tensor: Optional[torch.Tensor], part: int = 0,
                   num_parts: int = 1, grouped: bool = False) -> None:
        wire = None if tensor is None else self._on_wire(tensor)
        header = Header(kind, step, microbatch, torch.float32 if tensor is None else tensor.dtype,
                        () if wire is None else tuple(wire.shape),
                        None if wire is None or wire.dtype == tensor.dtype else wire.dtype,
                        part, num_parts, grouped, grouped and tensor.requires_grad)  # a bare tensor: see Stage.forward
        # A payload is its bytes; a filler first completes a receive posted for a wrong guess.
        sizes = next_size(self.sizes, header.part)
        guess, size = sizes.guess, header.nbytes
        sizes.update(size)
        filler = [] if guess is None or guess == size else [self._zeros(guess)]
        payload = [as_bytes(wire)] if size else []
        sent_bytes = (guess if filler else 0) + size
        hold, waited = self.link.reserve(sent_bytes + HEADER_BYTES)
        if hold > 0:
            header = dataclasses.replace(header, hold_us=round(hold * 1e6))
        # one buffer with the payload it guessed, or with the filler: see the note in wire.py
        first, rest = ((filler or payload)[0], payload if filler else []) if combined(guess) else (None, filler + payload)
        tensors = [packed(header, first, self.wire_device), *map(self._tensor, rest)]
        self._post(tensors, header)
        self.wait_sec += waited
        self.bytes_sent += sent_bytes

    def _zeros(self, nbytes: int):
        return np.zeros(nbytes, dtype=np.uint8) if self.wire_device.type == "cpu" else \
            torch.zeros(nbytes, dtype=torch.uint8, device=self.wire_device)

    @staticmethod
    def _tensor(data) -> torch.Tensor:
        return torch.from_numpy(data) if isinstance(data, np.ndarray) else data

    def _on_wire(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach() if tensor.requires_grad else tensor
        if self.wire_dtype is not None and tensor.is_floating_point() and tensor.dtype != self.wire_dtype:
            tensor = tensor.to(self.wire_dtype)  # before the copy to the wire device: fewer bytes to copy
        if tensor.device != self.wire_device:
            tensor = tensor.to(self.wire_device)
        return tensor if tensor.is_contiguous() else tensor.contiguous()

    def _post(self, tensors: list[torch.Tensor], header: Header) -> None:
        while len(self.pending) >= self.capacity:
            self._retire_oldest()
        works = [dist.isend(t, dst=self.peer, group=self.group) for t in tensors]
        self.pending.append((works, tensors, header))

    def _retire_oldest(self) -> None:
        works, _, header = self.pending.popleft()
        start = time.perf_counter()
        try:
            for work in works:
                work.wait(datetime.timedelta(seconds=self.timeout))
        except RuntimeError as err:
            what = _what(header.kind, header.step, header.microbatch)
            raise TransportError(
                f"{self.who} could not send {what} to {self.peer_name} within {self.timeout:.0f}s "
                f"(is {self.peer_name} alive and receiving?): {str(err).splitlines()[0]}"
            ) from None
        self.wait_sec += time.perf_counter() - start

    def flush(self) -> None:
        """Every message sent is complete."""
        while self.pending:
            self._retire_oldest()


class Inbox:
    """Receive side of one edge direction: a mailbox keyed by message, which consumers take from
    in any order. One receive is always posted ahead (a header and, once sizes repeat, its
    payload: see [Note: pre-posted payloads]), so a sender's data moves as soon as it is sent.
    Who completes it is the subclass's: a thread of its own (``ThreadInbox``) or the consumer
    when it waits (``DirectInbox``); see [Note: who receives] in transport.py. A message an
    emulated link holds is filed with the time it is due and is invisible to its consumers until
    then (see [Note: emulated links])."""

    waits_for_room = True  # a full mailbox stops the receiving (back-pressure), unless the consumer receives

    def __init__(self, group, peer: int, wire_device: torch.device, device: torch.device, capacity: int, who: str,
                 peer_stage: Optional[int] = None):
        self.group, self.peer, self.wire_device, self.device = group, peer, wire_device, device
        self.peer_name = peer_name(peer, peer_stage)
        self.capacity, self.who = capacity, who
        self.mailbox: dict[tuple[int, int, int], tuple[float, list[Part]]] = {}  # each message's due time and parts
        self.cond = threading.Condition()
        self.closed = False
        self.error: Optional[BaseException] = None
        self.num_received = 0  # every message taken off the wire, the closing one included
        self.peak_queued = 0  # most messages ever waiting in the mailbox at once
        self.sizes: list[NextSize] = []  # per part, guesses the next payload's size as the peer's Outbox does
        self.parts: list[Part] = []  # the message being received, so far
        self.num_guessed = 0  # payloads that landed in a buffer posted with their header
        self.posted: Optional[tuple] = None  # the next part's header, guessed payload (or None) and their receives

    def _post(self) -> None:
        """Post the next part's header receive, with its payload's if its size can be guessed (in
        one buffer up to ``COMBINED_MAX``: see [Note: pre-posted payloads] in wire.py)."""
        guess = next_size(self.sizes, len(self.parts)).guess
        if combined(guess):
            both, view = wire_buffer(HEADER_BYTES + guess, self.wire_device)
            raw, guessed, buffers = view[:HEADER_BYTES], view[HEADER_BYTES:], [both]
        else:
            header, raw = wire_buffer(HEADER_BYTES, self.wire_device)
            payload, guessed = (None, None) if guess is None else wire_buffer(guess, self.wire_device)
            buffers = [header] if payload is None else [header, payload]
        self.posted = (raw, guessed, [dist.irecv(b, src=self.peer, group=self.group) for b in buffers])

    def _receive_one(self, wait: datetime.timedelta, stream=None) -> bool:
        """Complete the posted receive, waiting at most ``wait``: one part, a message filed once its
        last part is in. False once the peer's closing message came (nothing is posted after it)."""
        raw, guessed, receiving = self.posted
        receiving[0].wait(wait)  # the header, with a guessed payload in its buffer or not
        self.posted = None
        header = Header.decode(raw)
        assert header.part == len(self.parts), f"part {header.part} came after {len(self.parts)} parts"
        size = header.nbytes
        next_size(self.sizes, header.part).update(size)
        for work in receiving[1:]:
            work.wait(wait)  # a guessed payload in a buffer of its own, or the sender's filler for a wrong guess
        if header.kind == Kind.CLOSE:
            with self.cond:
                self.closed = True
                self.num_received += 1
                self.cond.notify_all()
            return False
        if guessed is not None and len(guessed) == size:
            data = guessed
            self.num_guessed += 1
        else:  # posted now that its size is known (an empty payload is never sent)
            posted, data = wire_buffer(size, self.wire_device)
            if size:
                dist.irecv(posted, src=self.peer, group=self.group).wait(wait)
        event = None
        if stream is not None:
            event = torch.cuda.Event()
            event.record(stream)
        self.parts.append((header, payload_of(data, header), event))
        if header.last_part:  # due once the last part's hold has passed: the link delivers parts in order
            self._file(self.parts, time.perf_counter() + header.hold_sec)
            self.parts = []
        self._post()
        return True

    def _file(self, parts: list[Part], due: float) -> None:
        header = parts[0][0]
        key = (int(header.kind), header.step, header.microbatch)
        with self.cond:
            while self.waits_for_room and len(self.mailbox) >= self.capacity:
                self.cond.wait()
            if key in self.mailbox:
                raise TransportError(f"{self.who} received {_what(header.kind, header.step, header.microbatch)} twice from {self.peer_name}")
            self.mailbox[key] = (due, parts)
            self.num_received += 1
            self.peak_queued = max(self.peak_queued, len(self.mailbox))
            self.cond.notify_all()

    def _check_alive(self, what: str) -> None:
        if self.error is not None:
            detail = (str(self.error).splitlines() or [type(self.error).__name__])[0]
            err = TransportError(
                f"{self.who} lost the connection from {self.peer_name} while waiting for {what} "
                f"({self.peer_name} exited or crashed; its own error says why): {detail[:120]}"
            )
            err.neighbour_lost = True  # a consequence: the CLI lets the neighbour's own error go first
            raise err
        if self.closed:
            raise TransportError(f"{self.who} waited for {what} but {self.peer_name} had already closed its side")

    def _timed_out(self, what: str, timeout: float, due: Optional[float]) -> None:
        if due is not None:
            raise TransportError(
                f"{self.who} timed out after {timeout:.0f}s waiting for {what} from {self.peer_name}, which the "
                f"emulated link holds {due - time.perf_counter():.0f}s more; raise dist.timeout_sec or the link's "
                "bandwidth (dist.link_bandwidth_mbps)")
        raise TransportError(
            f"{self.who} timed out after {timeout:.0f}s waiting for {what} from {self.peer_name} "
            f"({len(self.mailbox)} other message(s) queued); is {self.peer_name} stuck or much slower? "
            "raise dist.timeout_sec if so")

    def has(self, kind: Kind, step: int, microbatch: int) -> bool:
        """Whether that message has arrived and is due (it stays in the mailbox)."""
        with self.cond:
            held = self.mailbox.get((int(kind), step, microbatch))
            return held is not None and held[0] <= time.perf_counter()

    def take_ready(self, kind: Kind, steps: Container[int]) -> list[tuple[Header, Value]]:
        """Every message of ``kind`` for one of ``steps`` that has already arrived and is due,
        without waiting (step order)."""
        with self.cond:
            if self.error is not None:
                self._check_alive(f"any {kind.name.lower()}")
            now = time.perf_counter()
            keys = sorted(k for k, (due, _) in self.mailbox.items()
                          if k[0] == int(kind) and k[1] in steps and due <= now)
            items = [self.mailbox.pop(k)[1] for k in keys]
            self.cond.notify_all()
        return [(headers[0], value) for headers, value in map(self._assemble, items)]

    def _assemble(self, parts: list[Part]) -> tuple[tuple[Header, ...], Value]:
        """A message's headers and its value: the tensor, or the tuple of its parts."""
        headers = tuple(h for h, _, _ in parts)
        tensors = tuple(self._to_device(*part) for part in parts)
        if not headers[0].grouped:
            return headers, tensors[0]
        return headers, () if headers[0].num_parts == 0 else tensors

    def _to_device(self, header: Header, payload: torch.Tensor, event) -> torch.Tensor:
        """The payload on the consumer's device in its own dtype (a wire dtype is cast back),
        needing a gradient if the sender's did."""
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
            payload.record_stream(torch.cuda.current_stream(self.device))
        if payload.device != self.device:
            payload = payload.to(self.device, non_blocking=True)
        payload = payload.to(header.dtype) if header.dtype != payload.dtype else payload
        return payload.requires_grad_() if header.requires_grad else payload

    def pending(self) -> list[str]:
        with self.cond:
            return [_what(Kind(k[0]), k[1], k[2]) for k in sorted(self.mailbox)]


class ThreadInbox(Inbox):
    """An inbox whose own thread receives every message as it lands; consumers wait on the mailbox."""

    def __init__(self, group, peer: int, wire_device: torch.device, device: torch.device, capacity: int, who: str,
                 peer_stage: Optional[int] = None):
        super().__init__(group, peer, wire_device, device, capacity, who, peer_stage)
        self.thread = threading.Thread(target=self._run, name=f"recv-from-{peer}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        stream = torch.cuda.Stream(self.wire_device) if self.wire_device.type == "cuda" else None
        try:
            if stream is not None:
                torch.cuda.set_device(self.wire_device)
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                self._post()
                while self._receive_one(IDLE_WAIT, stream):
                    pass
        except BaseException as err:  # handed to the consumer, which raises it with context
            with self.cond:
                self.error = err
                self.cond.notify_all()

    def take(self, kind: Kind, step: int, microbatch: int, timeout: float) -> tuple[tuple[Header, ...], Value]:
        """The message with this key (its parts' headers and its value), waiting at most ``timeout`` seconds."""
        key, what = (int(kind), step, microbatch), _what(kind, step, microbatch)
        deadline = time.perf_counter() + timeout
        with self.cond:
            while True:
                now = time.perf_counter()
                due = self.mailbox.get(key, (None,))[0]
                if due is None:
                    self._check_alive(what)
                elif due <= now:
                    break
                if now >= deadline:
                    self._timed_out(what, timeout, due)
                self.cond.wait(min(deadline, now + 1.0 if due is None else due) - now)
            _, parts = self.mailbox.pop(key)
            self.cond.notify_all()
        return self._assemble(parts)

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise TransportError(f"{self.who} did not receive the closing message from {self.peer_name} within {timeout:.0f}s")
        if self.error is not None:
            self._check_alive("the closing message")


class DirectInbox(Inbox):
    """An inbox without a thread: the consumer completes the posted receives itself while it waits
    for a message, filing any other that comes first. Nothing is received while no consumer
    waits, so ``has`` and ``take_ready`` see only what an earlier ``take`` filed: for schedules
    that know what they wait for (see [Note: who receives] in transport.py)."""

    waits_for_room = False

    def __init__(self, group, peer: int, wire_device: torch.device, device: torch.device, capacity: int, who: str,
                 peer_stage: Optional[int] = None):
        super().__init__(group, peer, wire_device, device, capacity, who, peer_stage)
        self._post()

    def take(self, kind: Kind, step: int, microbatch: int, timeout: float) -> tuple[tuple[Header, ...], Value]:
        """The message with this key (its parts' headers and its value), receiving for at most ``timeout`` seconds."""
        key, what = (int(kind), step, microbatch), _what(kind, step, microbatch)
        deadline = time.perf_counter() + timeout
        while key not in self.mailbox:
            self._check_alive(what)
            self._receive_until(deadline, what, timeout)
        return self._assemble(self.mailbox.pop(key)[1])

    def _receive_until(self, deadline: float, what: str, timeout: float) -> None:
        """Receive one part, or fail naming ``what`` was awaited: past ``deadline``, or the peer gone."""
        left = deadline - time.perf_counter()
        if left <= 0:
            self._timed_out(what, timeout, None)
        try:  # at least 1 ms: a wait of 0 ms is no timeout at all to torch.distributed
            self._receive_one(datetime.timedelta(seconds=max(left, 1e-3)))
        except RuntimeError as err:  # gloo's timeout, or the peer's connection closed
            if time.perf_counter() >= deadline:
                self._timed_out(what, timeout, None)
            self.error = err
            self._check_alive(what)

    def join(self, timeout: float) -> None:
        """Receive until the peer's closing message; any other message is filed (and reported unconsumed)."""
        deadline = time.perf_counter() + timeout
        while not self.closed:
            if self.error is not None:
                self._check_alive("the closing message")
            self._receive_until(deadline, "the closing message", timeout)
