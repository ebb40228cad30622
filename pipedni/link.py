"""An emulated network link between neighbouring stages: when each message is delivered.

[Note: emulated links]
Stages on one machine talk over shared memory or loopback in microseconds; between nodes,
racks or sites a message pays a latency and a bandwidth. ``dist.link_latency_ms`` and
``dist.link_bandwidth_mbps`` emulate that in the send path, with no root and no ``tc``: each
edge direction is one link that carries one message at a time, so a message sent at ``sent``
with ``nbytes`` bytes (header included) is delivered at

    transmitted = max(sent, link free) + nbytes / bandwidth      (the link is then free again)
    delivered   = transmitted + latency

The model is deterministic given the send times, and it is the sender's alone: no clock is
shared between processes. ``EmulatedLink`` holds each message on a thread of its own (one per
edge direction) until its delivery time and only then posts the real send, so the receiver
sees it no earlier than the model says (plus the machine's own transfer time, which is what an
unemulated run pays too). Delivery times on one direction never decrease, so holding the
messages in order is enough. Messages on the wire are bounded (``capacity``): a sender that
outruns its link waits, and that wait counts as send wait, as it would on a real link.

Off (both zero), ``DirectLink`` posts on the caller's thread at once: no thread, no copy.
Collectives (the whole-model clipping norm's all-reduce, the barrier after an evaluation) use
the default process group and are not emulated.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional

from pipedni.errors import TransportError

Post = Callable[[], None]


@dataclass(frozen=True)
class LinkSpec:
    """One edge direction's emulated latency (seconds, one way) and bandwidth (bytes/s; 0: unlimited)."""

    latency_sec: float = 0.0
    bytes_per_sec: float = 0.0

    @staticmethod
    def from_config(latency_ms: float, bandwidth_mbps: float) -> "LinkSpec":
        return LinkSpec(latency_ms / 1e3, bandwidth_mbps * 1e6 / 8)

    @property
    def emulated(self) -> bool:
        return self.latency_sec > 0 or self.bytes_per_sec > 0

    def describe(self) -> str:
        bandwidth = f"{self.bytes_per_sec * 8 / 1e6:g} Mbit/s" if self.bytes_per_sec > 0 else "unlimited bandwidth"
        return f"{self.latency_sec * 1e3:g} ms one way, {bandwidth}"


class LinkModel:
    """Delivery times of the messages sent on one link direction, in send order."""

    def __init__(self, spec: LinkSpec):
        self.spec = spec
        self.free_at = -math.inf

    def transmit_sec(self, nbytes: int) -> float:
        return nbytes / self.spec.bytes_per_sec if self.spec.bytes_per_sec > 0 else 0.0

    def deliver_at(self, sent: float, nbytes: int) -> float:
        """When a message of ``nbytes`` sent at ``sent`` (seconds, any clock) reaches the peer."""
        self.free_at = max(sent, self.free_at) + self.transmit_sec(nbytes)
        return self.free_at + self.spec.latency_sec


class DirectLink:
    """No emulation: a message is posted at once, on the sender's thread."""

    def put(self, nbytes: int, post: Post) -> float:
        """Post the message; returns the seconds the caller waited for room on the link (none)."""
        post()
        return 0.0

    def drain(self, timeout: float) -> None:
        """Nothing is held back."""

    def close(self) -> None:
        """No thread to stop."""


class EmulatedLink:
    """A link direction with latency and bandwidth: a thread posts each message at its delivery
    time. See [Note: emulated links]."""

    def __init__(self, spec: LinkSpec, capacity: int, timeout: float, who: str, what: str,
                 on_thread: Callable[[], None] = lambda: None):
        self.model, self.capacity, self.timeout, self.who, self.what = LinkModel(spec), capacity, timeout, who, what
        self.on_thread = on_thread  # runs first on the link's thread (e.g. selects its CUDA device)
        self.queue: deque[tuple[float, Post]] = deque()
        self.busy = False  # the thread is posting a message it took off the queue
        self.stopped = False
        self.error: Optional[BaseException] = None
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, name=f"link-{what}", daemon=True)
        self.thread.start()

    def put(self, nbytes: int, post: Post) -> float:
        """Hold the message for its delivery time; returns the seconds waited for room on the link."""
        waited = 0.0
        with self.cond:
            if len(self.queue) >= self.capacity:
                start = time.perf_counter()
                self._wait_until(lambda: len(self.queue) < self.capacity, "room for another message on")
                waited = time.perf_counter() - start
            self.queue.append((self.model.deliver_at(time.perf_counter(), nbytes), post))
            self.cond.notify_all()
        return waited

    def drain(self, timeout: float) -> None:
        """Wait until every message held has been posted."""
        with self.cond:
            self._wait_until(lambda: not self.queue and not self.busy, "the messages held on", timeout)

    def close(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        self.thread.join(self.timeout)

    def _wait_until(self, ready: Callable[[], bool], waiting_for: str, timeout: Optional[float] = None) -> None:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            if self.error is not None:  # the thread has stopped: nothing held will be delivered
                raise TransportError(f"{self.who}: the emulated link {self.what} failed: "
                                     f"{(str(self.error).splitlines() or [type(self.error).__name__])[0]}")
            if ready():
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise TransportError(f"{self.who} timed out waiting for {waiting_for} the emulated link {self.what} "
                                     f"({len(self.queue)} message(s) held); is the peer receiving?")
            self.cond.wait(min(left, 1.0))

    def _run(self) -> None:
        try:
            self.on_thread()
            while True:
                with self.cond:
                    while not self.queue and not self.stopped:
                        self.cond.wait()
                    if not self.queue:
                        return
                    due, post = self.queue[0]
                    left = due - time.perf_counter()
                    if left > 0:
                        self.cond.wait(left)  # a new message is due no earlier: the head stays first
                        continue
                    self.queue.popleft()
                    self.busy = True
                    self.cond.notify_all()
                post()
                with self.cond:
                    self.busy = False
                    self.cond.notify_all()
        except BaseException as err:  # handed to the sender, which raises it with context
            with self.cond:
                self.error, self.busy = err, False
                self.cond.notify_all()


def make_link(spec: LinkSpec, capacity: int, timeout: float, who: str, what: str,
              on_thread: Callable[[], None] = lambda: None) -> DirectLink | EmulatedLink:
    return EmulatedLink(spec, capacity, timeout, who, what, on_thread) if spec.emulated else DirectLink()
