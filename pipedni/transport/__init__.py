"""``pipedni.transport``: how neighbouring stages exchange tensors over torch.distributed
point-to-point. transport.py: a stage's ``Transport`` (its edges to the previous and next
stage, one wait with a timeout that names what it waits for); edge.py: one direction's
sending and receiving end; wire.py: the header and the pre-posted payloads; link.py: the
emulated network link between stages (latency, bandwidth)."""

from pipedni.transport.transport import SEND_WINDOW, NullTransport, Transport
from pipedni.transport.wire import Header, Kind

__all__ = ["SEND_WINDOW", "Header", "Kind", "NullTransport", "Transport"]
