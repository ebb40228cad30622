"""An emulated network link between neighbouring stages: when each message is delivered.

[Note: emulated links]
Stages on one machine talk over shared memory or loopback in microseconds; between nodes,
racks or sites a message pays a latency and a bandwidth. ``dist.link_latency_ms`` and
``dist.link_bandwidth_mbps`` emulate that in the transport, with no root and no ``tc``: each
edge direction is one link that carries one message at a time, so a message sent at ``sent``
with ``nbytes`` bytes (header included) is delivered at

    transmitted = max(sent, link free) + nbytes / bandwidth      (the link is then free again)
    delivered   = transmitted + latency

The model is deterministic given the send times, and it is the sender's alone: no clock is
shared between processes. The sender posts every message at once, as an unemulated run does,
and its header carries the hold, ``delivered - sent``; the receiver files the message when it
lands and lets no consumer see it until the hold has passed since then (``take`` waits for it,
``has`` and ``take_ready`` count it as not yet arrived). So a consumer sees a message no
earlier than the model says, plus the machine's own transfer time, which an unemulated run
pays too. Holding it on the receiving side needs no thread: the waits happen where a consumer
waits for its message anyway, so an emulated run costs the stages' processors no more than a
plain one. (An earlier link posted each message from a thread of its own at its delivery time;
with it, the MLP's slower stage spent at least 10% more compute per step than in a plain run on
29 of 40 jobs of the benchmark grid, without it on 4 of 40.)
Messages on the wire are bounded (``capacity``): a sender that outruns its link waits until
the oldest in flight is delivered, and that wait counts as send wait, as it would on a real
link.

Off (both zero), ``Link.reserve`` returns at once with no hold: free when off. Collectives (the
whole-model clipping norm's all-reduce, the barrier after an evaluation) use the default
process group and are not emulated.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass

from pipedni.errors import TransportError


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


class Link:
    """The send side of one link direction: how long the receiver holds each message, and room
    on the wire for at most ``capacity`` messages. See [Note: emulated links]."""

    def __init__(self, spec: LinkSpec, capacity: int, timeout: float, who: str, what: str):
        self.model, self.capacity, self.timeout, self.who, self.what = LinkModel(spec), capacity, timeout, who, what
        self.emulated = spec.emulated
        self.in_flight: deque[float] = deque()  # delivery times of the messages not yet delivered, in order

    def reserve(self, nbytes: int) -> tuple[float, float]:
        """Send ``nbytes`` now: (the seconds the receiver holds it after it lands, the seconds
        this sender waited for room on the link)."""
        if not self.emulated:
            return 0.0, 0.0
        now = start = time.perf_counter()
        self._retire(now)
        if len(self.in_flight) >= self.capacity:
            room_at = self.in_flight[len(self.in_flight) - self.capacity]
            if room_at - now > self.timeout:
                raise TransportError(
                    f"{self.who}: the emulated link {self.what} would keep this sender waiting {room_at - now:.0f}s "
                    f"for room ({len(self.in_flight)} messages on the wire), past dist.timeout_sec = "
                    f"{self.timeout:g}; raise dist.link_bandwidth_mbps or dist.timeout_sec")
            time.sleep(max(0.0, room_at - now))
            now = time.perf_counter()
            self._retire(now)
        due = self.model.deliver_at(now, nbytes)
        self.in_flight.append(due)
        return due - now, now - start

    def _retire(self, now: float) -> None:
        while self.in_flight and self.in_flight[0] <= now:
            self.in_flight.popleft()
