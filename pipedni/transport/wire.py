"""What one message is on the wire: its kind, the header that precedes its payload, and the
payload size the receiver guesses before the header arrives.

A header is a fixed-size int64 tensor (kind, step, microbatch, dtype, wire dtype, part, parts,
flags, hold, shape; the hold is an emulated link's: see [Note: emulated links] in link.py), so
the receiver can allocate the payload before it arrives and check it against what it expects.
The payload travels as raw bytes (a uint8 view of the tensor), so a buffer posted before its
header only needs the right size. A message of several tensors (a boundary that carries
several: see [Note: what crosses a boundary] in split/stages.py) is its parts one after the
other, each with its own header; its flags say it is a tuple (of one tensor, or of none: one
empty part), and whether each tensor needs a gradient.

[Note: pre-posted payloads]
A point-to-point send on gloo or NCCL moves its data only once the matching receive is posted.
A receiver that posts the payload's receive only after its header arrives adds a round trip
through the receiver thread to every message (0.16-0.19 ms on this machine's gloo, measured by
scripts/transport_bench.py before and after). torch's pipelining avoids it
by fixing every shape at start-up; our transport knows no schedule, so it guesses instead: both
ends of a direction keep the same ``NextSize`` per part over the payload sizes sent so far, and once
``REPEATS_TO_GUESS`` payloads in a row had one size, the receiver posts the next header's
receive and a payload receive of that size together. The sender knows the same guess. When its
payload has that size it sends header and payload as before, and the payload lands in the
posted buffer; when it does not (a different kind or batch, the closing message), it first
sends a filler of the guessed size to complete the posted receive, then the payload as usual.
Messages are matched in order on each direction's own group (NCCL has no tags), so both ends
always agree on what comes next. A training run sends one size per direction, and misses only
where sizes change (into and out of an evaluation, a last partial batch, the close); uneven
microbatches that alternate sizes never repeat long enough to be guessed, and pay the round
trip as before, not a filler each.

A guessed payload of up to ``COMBINED_MAX`` bytes shares one buffer with its header: the
receiver posts a single receive of header and guess together, and the sender sends its header
and payload (or the filler) copied into one buffer, so a guessed message is one point-to-point
operation instead of two (each costs the two processes' communication threads a wake-up:
0.1-0.2 ms on this machine; docs/benchmarks.md, "The transport's cost per message"). Larger payloads keep a receive of their own:
copying them would cost more than the operation saved.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from pipedni.errors import TransportError

MAX_DIMS = 8
HEADER_LEN = 10 + MAX_DIMS
HEADER_BYTES = HEADER_LEN * 8
COMBINED_MAX = 1 << 20  # a guessed payload up to this many bytes travels in its header's buffer: see the note
REPEATS_TO_GUESS = 3  # equal payload sizes in a row before the next one is guessed: see the note
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8, torch.bool]
DTYPE_INDEX = {dtype: i for i, dtype in enumerate(DTYPES)}
ZEROS = (0,) * MAX_DIMS


class Kind(enum.IntEnum):
    ACTIVATION = 0
    GRADIENT = 1
    EVAL = 2
    SHAPE = 3
    WARMUP = 4
    CLOSE = 5


@dataclass(frozen=True)
class Header:
    kind: Kind
    step: int
    microbatch: int
    dtype: torch.dtype  # the tensor's own, which the receiver gets
    shape: tuple[int, ...]
    wire_dtype: Optional[torch.dtype] = None  # the payload's on the wire (None: the tensor's own)
    part: int = 0  # this tensor's place in its message
    num_parts: int = 1  # the message's tensors (0: an empty tuple, sent as one empty part)
    grouped: bool = False  # the message is a tuple (else one bare tensor)
    requires_grad: bool = False  # the receiver gets the tensor as one that needs a gradient
    hold_us: int = 0  # microseconds the receiver holds the message after it lands (an emulated link)

    def __post_init__(self) -> None:  # a sender's header fails here, before anything is sent or counted
        if len(self.shape) > MAX_DIMS:
            raise TransportError(f"tensor of {len(self.shape)} dims exceeds the transport's {MAX_DIMS}")
        for dtype in (self.dtype, self.wire_dtype or self.dtype):
            if dtype not in DTYPE_INDEX:
                raise TransportError(f"tensors of {dtype} cannot be sent between stages; the transport "
                                     f"carries {', '.join(str(d).replace('torch.', '') for d in DTYPES)}")

    def values(self) -> list[int]:
        """The header as its ``HEADER_LEN`` integers."""
        flags = int(self.grouped) | int(self.requires_grad) << 1
        return [int(self.kind), self.step, self.microbatch, DTYPE_INDEX[self.dtype],
                DTYPE_INDEX[self.wire_dtype or self.dtype], self.part, self.num_parts, flags, self.hold_us,
                len(self.shape), *self.shape, *ZEROS[len(self.shape):]]

    def encode(self) -> torch.Tensor:
        return torch.from_numpy(np.array(self.values(), dtype=np.int64))

    @staticmethod
    def decode(t: torch.Tensor | np.ndarray) -> "Header":
        """The header in ``t``: its integers, or its bytes (a received buffer)."""
        v = (t.view(torch.int64) if isinstance(t, torch.Tensor) else t.view(np.int64)).tolist()
        dtype, wire = DTYPES[v[3]], DTYPES[v[4]]
        return Header(Kind(v[0]), v[1], v[2], dtype, tuple(v[10 : 10 + v[9]]), None if wire == dtype else wire,
                      v[5], v[6], bool(v[7] & 1), bool(v[7] & 2), v[8])

    @property
    def last_part(self) -> bool:
        return self.part >= self.num_parts - 1

    @property
    def payload_dtype(self) -> torch.dtype:
        return self.wire_dtype or self.dtype

    @property
    def hold_sec(self) -> float:
        return self.hold_us / 1e6

    @property
    def nbytes(self) -> int:
        """The payload's bytes on the wire (none for the closing message)."""
        return 0 if self.kind == Kind.CLOSE else math.prod(self.shape) * self.payload_dtype.itemsize

    def describe(self) -> str:
        return f"{list(self.shape)} {str(self.dtype).replace('torch.', '')}"


def describe_message(kind: Kind, step: int, microbatch: int) -> str:
    return f"{kind.name.lower()} of step {step} microbatch {microbatch}"


class NextSize:
    """The payload size of a direction's next message, guessed from the sizes before it; sender
    and receiver each keep one and update it with every message. See [Note: pre-posted payloads]."""

    def __init__(self) -> None:
        self.guess: Optional[int] = None  # bytes, or None: no guess (post the payload after its header)
        self._last, self._run = -1, 0

    def update(self, nbytes: int) -> None:
        self._run = self._run + 1 if nbytes == self._last else 1
        self._last = nbytes
        self.guess = nbytes if nbytes > 0 and self._run >= REPEATS_TO_GUESS else None


def combined(guess: Optional[int]) -> bool:
    """Whether a message posted with this payload guess travels in one buffer with its header."""
    return guess is not None and guess <= COMBINED_MAX


def next_size(sizes: list[NextSize], part: int) -> NextSize:
    """The guess for a message's ``part``-th tensor: each position in a message keeps its own."""
    while len(sizes) <= part:
        sizes.append(NextSize())
    return sizes[part]


# [Note: host buffers]
# On a CPU wire a message's buffers are numpy arrays shared with the tensors gloo sends and
# receives: packing a header and payload, or viewing a received payload, is then a few numpy
# operations rather than a dozen torch calls (each costs microseconds of dispatch; on a 1 KiB
# message they were most of what pipedni added to torch's own isend/irecv: docs/benchmarks.md,
# "The transport's cost per message"). A CUDA wire keeps torch's operations on the device.


def as_bytes(t: torch.Tensor) -> torch.Tensor | np.ndarray:
    """A contiguous tensor's bytes, flat: a numpy view on the CPU (bf16 through int16, which numpy has)."""
    if t.device.type != "cpu":
        return t.reshape(-1).view(torch.uint8)
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().reshape(-1).view(np.uint8)


def packed(header: Header, data: Optional[torch.Tensor | np.ndarray], device: torch.device) -> torch.Tensor:
    """One buffer holding ``header`` and then ``data``'s bytes (from ``as_bytes``, or none)."""
    if device.type != "cpu":
        encoded = header.encode().to(device).view(torch.uint8)
        return encoded if data is None else torch.cat([encoded, data])
    buf = np.empty(HEADER_BYTES + (0 if data is None else data.size), dtype=np.uint8)
    buf[:HEADER_BYTES].view(np.int64)[:] = header.values()
    if data is not None:
        buf[HEADER_BYTES:] = data
    return torch.from_numpy(buf)


def wire_buffer(nbytes: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | np.ndarray]:
    """A receive buffer of ``nbytes``: the tensor to post, and the view to read it by."""
    if device.type != "cpu":
        t = torch.empty(nbytes, dtype=torch.uint8, device=device)
        return t, t
    buf = np.empty(nbytes, dtype=np.uint8)
    return torch.from_numpy(buf), buf


def payload_of(data: torch.Tensor | np.ndarray, header: Header) -> torch.Tensor:
    """The received bytes ``data`` (a ``wire_buffer`` view) as the payload tensor ``header`` describes."""
    dtype = header.payload_dtype
    if isinstance(data, torch.Tensor):
        return data.view(dtype).view(header.shape)
    if dtype == torch.bfloat16:
        return torch.from_numpy(data.view(np.int16).reshape(header.shape)).view(torch.bfloat16)
    return torch.from_numpy(data.view(NUMPY_DTYPES[dtype]).reshape(header.shape))


NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64,
                torch.int64: np.int64, torch.int32: np.int32, torch.uint8: np.uint8, torch.bool: np.bool_}
