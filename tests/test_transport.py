"""Transport: real gloo processes exchanging messages through pipedni.transport.Transport."""

from __future__ import annotations

import time

import pytest
import torch

from pipedni.crossing import TensorSpec
from pipedni.errors import TransportError
from pipedni.transport import SEND_WINDOW, Header, Kind, Transport
from pipedni.transport.wire import NextSize
from helpers import CPU, RankFailed, chain_steps, changing_messages, recv_error, run_distributed, same_values, tuple_messages


def _transport(rank: int, world_size: int, timeout: float = 30.0, queue_size: int = 64) -> Transport:
    return Transport(rank, world_size, CPU, CPU, queue_size=queue_size, timeout=timeout)


def test_header_round_trip():
    header = Header(Kind.GRADIENT, 12345, 7, torch.bfloat16, (3, 4, 5))
    assert Header.decode(header.encode()) == header
    with pytest.raises(TransportError, match="tensors of torch.complex64 cannot be sent between stages"):
        Header(Kind.ACTIVATION, 0, 0, torch.complex64, (2,)).encode()


def test_next_size_guesses_after_three_equal_sizes():
    sizes = NextSize()
    guesses = []
    for nbytes in [4, 4, 4, 4, 8, 4, 4, 4, 0, 0, 0, 0, 32, 28, 32, 28, 32]:
        guesses.append(sizes.guess)
        sizes.update(nbytes)
    # a guess after 3 equal sizes, dropped on a change; never of an empty payload; alternating sizes never guessed
    assert guesses == [None, None, None, 4, 4, None, None, None, 4, None, None, None, None, None, None, None, None]


def _changing_sizes(rank, world_size):
    t = _transport(rank, world_size)
    messages = changing_messages()
    if rank == 0:
        for i, (kind, tensor) in enumerate(messages):
            t.send("next", kind, i, 0, tensor)
        t.close()  # while a guess is posted: the close's filler completes it
        return t.outboxes["next"].bytes_sent
    got = [t.recv("prev", kind, i, 0) for i, (kind, _) in enumerate(messages)]
    equal = all(g.dtype == m.dtype and torch.equal(g, m) for g, (_, m) in zip(got, messages))
    t.close()
    return equal, t.inboxes["prev"].num_guessed


def test_payloads_whose_size_changes_arrive_whole_and_repeated_sizes_are_pre_posted():
    sent_bytes, (equal, guessed) = run_distributed(_changing_sizes, 2)
    assert equal
    sizes, hits, fillers = NextSize(), 0, 0
    for nbytes in [4] + [t.numel() * t.element_size() for _, t in changing_messages()] + [0]:  # warm-up, ..., close
        hits += sizes.guess == nbytes
        fillers += sizes.guess is not None and sizes.guess != nbytes
        sizes.update(nbytes)
    # by hand: the 4th and 5th of each run of 5 training messages (3 runs), the 4th evaluation;
    # fillers for the first evaluation, the first training message after it, the bool and the close
    assert (hits, fillers) == (7, 4)
    assert guessed == hits
    payload = 4 + sum(t.numel() * t.element_size() for _, t in changing_messages())
    assert sent_bytes == payload + 96 + 2400 + 96 + 96  # each filler is the guessed size


def _both_directions(rank, world_size, n):
    t = _transport(rank, world_size)
    direction, kind = ("next", Kind.ACTIVATION) if rank == 0 else ("prev", Kind.GRADIENT)
    other, other_kind = ("next", Kind.GRADIENT) if rank == 0 else ("prev", Kind.ACTIVATION)
    for i in range(n):  # both ranks send all their messages before receiving any
        t.send(direction, kind, i, 0, torch.full((8, 3), float(i + 100 * rank)))
    got = [float(t.recv(other, other_kind, i, 0)[0, 0]) for i in range(n)]
    in_flight = len(t.outboxes[direction].pending)
    t.close()
    return got, t.outboxes[direction].num_sent, t.inboxes[other].num_received, in_flight


def test_both_directions_at_once():
    n = 40  # more than queue_size / 2 in flight per direction
    (got0, sent0, recv0, window0), (got1, sent1, recv1, window1) = run_distributed(_both_directions, 2, n)
    # sends hold their tensors until waited on: only SEND_WINDOW of them, not a whole queue
    assert window0 <= SEND_WINDOW and window1 <= SEND_WINDOW
    assert got0 == [100.0 + i for i in range(n)]
    assert got1 == [float(i) for i in range(n)]
    # every message sent was received (the warm-up and closing messages count on both sides)
    assert sent0 == recv1 == n + 2 and sent1 == recv0 == n + 2


def _out_of_order(rank, world_size):
    t = _transport(rank, world_size)
    if rank == 0:
        for mb in range(10):
            t.send("next", Kind.ACTIVATION, 3, mb, torch.tensor([float(mb)]))
        t.close()
        return None
    order = [9, 0, 5, 1, 8, 2, 7, 3, 6, 4]
    got = [float(t.recv("prev", Kind.ACTIVATION, 3, mb)) for mb in order]
    t.close()
    return order, got


def test_consumer_takes_messages_in_any_order():
    _, (order, got) = run_distributed(_out_of_order, 2)
    assert got == [float(mb) for mb in order]


def _mismatch(rank, world_size):
    t = _transport(rank, world_size)
    if rank == 0:
        t.send("next", Kind.ACTIVATION, 0, 0, torch.zeros(4, 3))
        t.close()
        return None
    try:
        t.recv("prev", Kind.ACTIVATION, 0, 0, expect=TensorSpec((4, 5), torch.float32))
    except TransportError as err:
        t.close()
        return str(err)
    return "no error"


def test_shape_mismatch_names_both_stages():
    _, message = run_distributed(_mismatch, 2)
    assert "stage 1/2 expected activation of step 0 microbatch 0 from stage 0" in message
    assert "[*, 5] float32" in message and "[4, 3] float32" in message


def _timeout(rank, world_size):
    t = _transport(rank, world_size, timeout=1.0)
    if rank == 0:
        time.sleep(3)  # sends nothing: rank 1 must give up after 1 s, not hang
        return None
    return recv_error(t, 7, 2)


def test_timeout_names_stage_direction_and_step():
    _, (message, elapsed) = run_distributed(_timeout, 2)
    assert "stage 1/2 timed out after 1s waiting for activation of step 7 microbatch 2 from stage 0" in message
    assert elapsed < 10


def _large(rank, world_size, numel):
    t = _transport(rank, world_size)
    g = torch.Generator().manual_seed(0)
    payload = torch.randn(numel, generator=g)
    if rank == 0:
        t.send("next", Kind.ACTIVATION, 0, 0, payload.view(1000, -1))
        back = t.recv("next", Kind.GRADIENT, 0, 0)
        t.close()
        return bool(torch.equal(back, payload.view(1000, -1) * 2))
    x = t.recv("prev", Kind.ACTIVATION, 0, 0)
    t.send("prev", Kind.GRADIENT, 0, 0, x * 2)
    t.close()
    return True


def test_large_tensors_round_trip():
    numel = 12_000_000  # 48 MB each way
    assert run_distributed(_large, 2, numel) == [True, True]


def _back_pressure(rank, world_size):
    t = _transport(rank, world_size, queue_size=2)
    if rank == 0:
        for mb in range(12):
            t.send("next", Kind.ACTIVATION, 0, mb, torch.tensor([float(mb)]))
        t.close()
        return t.outboxes["next"].wait_sec
    time.sleep(1.0)  # consumer late: the sender must wait, nothing may be lost
    got = [float(t.recv("prev", Kind.ACTIVATION, 0, mb)) for mb in range(12)]
    peak = len(t.inboxes["prev"].mailbox)
    t.close()
    return got, peak


def test_full_mailbox_applies_back_pressure():
    waited, (got, _) = run_distributed(_back_pressure, 2)
    assert got == [float(mb) for mb in range(12)]
    assert waited > 0.3  # the sender was held back while the receiver's mailbox was full


def _leftover(rank, world_size):
    t = _transport(rank, world_size)
    if rank == 0:
        t.send("next", Kind.ACTIVATION, 0, 0, torch.ones(2))
        t.close()
        return None
    t.close()  # never took the activation


def test_close_reports_unconsumed_messages():
    results = run_distributed(_leftover, 2, allow_failures=True)
    assert isinstance(results[1], RankFailed)
    assert "closed with 1 unconsumed message(s): activation of step 0 microbatch 0 from stage 0" in results[1].text


def _peer_dies(rank, world_size):
    start = time.monotonic()
    try:
        t = _transport(rank, world_size, timeout=60.0)
    except TransportError as err:  # stage 0 may die before stage 1 has taken its warm-up message
        return str(err), time.monotonic() - start
    if rank == 0:
        raise RuntimeError("stage 0 crashed on purpose")
    return recv_error(t, 0, 0)


def test_dead_peer_fails_fast_instead_of_waiting_for_the_timeout():
    """A stage that crashes must end its neighbours at once, not after dist.timeout_sec.
    Regression: under load stage 0 could die while stage 1 still waited for its warm-up
    message; stage 1 then (rightly) failed in the constructor, which the test did not expect."""
    results = run_distributed(_peer_dies, 2, allow_failures=True)
    assert isinstance(results[0], RankFailed)
    message, elapsed = results[1]
    assert "stage 1/2 lost the connection from stage 0" in message
    assert elapsed < 30


def test_four_stage_chain_passes_each_message_once():
    results = run_distributed(_chain, 4)
    assert results[3] == [float(step + 3) for step in range(5)]  # +1 at each of stages 1..3
    assert results[0] == [float(2 * (step + 3)) for step in range(5)]


def _chain(rank, world_size):
    t = _transport(rank, world_size)
    out = chain_steps(t, rank, world_size)
    t.close()
    return out


def test_tuples_arrive_as_tuples_with_dtypes_and_gradient_flags_and_each_part_is_pre_posted():
    """A boundary of a split model carries several tensors; each part has its own header and its
    own size guess, so a repeated tuple is pre-posted part by part like a bare tensor."""
    _, (same, guessed, mismatch) = run_distributed(_tuple_senders, 2)
    assert same
    # by hand, each part's sizes in turn: the first tensors (of every message, bare or not, 48 bytes
    # but the warm-up, the 1-tuple, the empty one and the close) hit twice in the first run of
    # tuples and 5 times from the 4th 48 after the empty tuple; the 2nd and 3rd tensors, sent only
    # in the 10 three-tensor tuples, hit from their 4th on: 7 each
    assert guessed == 21
    assert "as ([*, 4] float32, [*] int64, [*, 2] bfloat16) but stage 0 sent [4, 3] float32" in mismatch


def _tuple_senders(rank, world_size):
    t = _transport(rank, world_size)
    if rank == 0:
        torch.manual_seed(0)
        for i, value in enumerate(tuple_messages()):
            t.send("next", Kind.ACTIVATION, i, 0, value)
        t.send("next", Kind.ACTIVATION, 99, 0, torch.zeros(4, 3))
        t.close()
        return None
    torch.manual_seed(0)
    expected = tuple_messages()
    got = [t.recv("prev", Kind.ACTIVATION, i, 0) for i in range(len(expected))]
    spec = (TensorSpec((3, 4), torch.float32, True), TensorSpec((3,), torch.int64), TensorSpec((3, 2), torch.bfloat16))
    try:
        t.recv("prev", Kind.ACTIVATION, 99, 0, expect=spec)
        mismatch = "no error"
    except TransportError as err:
        mismatch = str(err)
    guessed = t.inboxes["prev"].num_guessed
    t.close()
    return same_values(got, expected), guessed, mismatch


