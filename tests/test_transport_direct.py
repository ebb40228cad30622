"""Transport, received on the consumer's own thread as a locked schedule's stages receive
(``direct_receive``, [Note: who receives] in pipedni/transport/transport.py): the same contracts as
test_transport.py's, each scenario in one launch of three stages to keep the suite short."""

from __future__ import annotations

import threading
import time

import torch

from pipedni.crossing import TensorSpec
from pipedni.errors import TransportError
from pipedni.transport import Kind, Transport
from pipedni.transport.wire import COMBINED_MAX
from helpers import CPU, RankFailed, chain_steps, changing_messages, recv_error, run_distributed, same_values, tuple_messages


def _direct_contracts(rank, world_size):
    t = Transport(rank, world_size, CPU, CPU, timeout=30.0, direct_receive=True)
    threads = [th.name for th in threading.enumerate() if th.name.startswith("recv-from")]
    chain = chain_steps(t, rank, world_size)
    if rank == 2:
        t.close()
        return chain, threads
    out = {"chain": chain, "threads": threads}
    if rank == 0:
        for i, (kind, tensor) in enumerate(changing_messages()):
            t.send("next", kind, 100 + i, 0, tensor)
        for mb in range(10):
            t.send("next", Kind.ACTIVATION, 3, mb, torch.tensor([float(mb)]))
        torch.manual_seed(0)
        for i, value in enumerate(tuple_messages()):
            t.send("next", Kind.ACTIVATION, 200 + i, 0, value)
        t.send("next", Kind.ACTIVATION, 299, 0, torch.zeros(4, 3))
        for i, tensor in enumerate(_past_combined()):
            t.send("next", Kind.ACTIVATION, 250 + i, 0, tensor)
        big = torch.randn(12_000_000, generator=torch.Generator().manual_seed(0)).view(1000, -1)
        t.send("next", Kind.ACTIVATION, 300, 0, big)
        out["big"] = bool(torch.equal(t.recv("next", Kind.GRADIENT, 300, 0), big * 2))
    else:
        messages = changing_messages()
        got = [t.recv("prev", kind, 100 + i, 0) for i, (kind, _) in enumerate(messages)]
        out["changing"] = all(g.dtype == m.dtype and torch.equal(g, m) for g, (_, m) in zip(got, messages))
        order = [9, 0, 5, 1, 8, 2, 7, 3, 6, 4]
        out["order"] = [float(t.recv("prev", Kind.ACTIVATION, 3, mb)) for mb in order] == [float(mb) for mb in order]
        torch.manual_seed(0)
        expected = tuple_messages()
        out["tuples"] = same_values([t.recv("prev", Kind.ACTIVATION, 200 + i, 0) for i in range(len(expected))],
                                     expected)
        try:
            t.recv("prev", Kind.ACTIVATION, 299, 0, expect=TensorSpec((4, 5), torch.float32))
        except TransportError as err:
            out["mismatch"] = str(err)
        expected = _past_combined()
        got = [t.recv("prev", Kind.ACTIVATION, 250 + i, 0) for i in range(len(expected))]
        out["past_combined"] = same_values(got, expected)
        x = t.recv("prev", Kind.ACTIVATION, 300, 0)
        t.send("prev", Kind.GRADIENT, 300, 0, x * 2)
        out["guessed"] = t.inboxes["prev"].num_guessed
    # both ways at once: every send posted before any receive, more than SEND_WINDOW, none waits
    direction, kind, other, other_kind = (("next", Kind.ACTIVATION, "next", Kind.GRADIENT) if rank == 0 else
                                          ("prev", Kind.GRADIENT, "prev", Kind.ACTIVATION))
    for i in range(40):
        t.send(direction, kind, 400 + i, 0, torch.full((8, 3), float(i + 100 * rank)))
    out["in_flight"] = len(t.outboxes[direction].pending)
    out["both"] = [float(t.recv(other, other_kind, 400 + i, 0)[0, 0]) for i in range(40)]
    t.settle()
    out["settled"] = len(t.outboxes[direction].pending)
    if rank == 0:
        t.send("next", Kind.ACTIVATION, 500, 0, torch.ones(2))  # never taken: close must say so
    try:
        t.close()
    except TransportError as err:
        out["closing"] = str(err)
    return out


def _past_combined() -> list[torch.Tensor]:
    """Payloads larger than COMBINED_MAX, repeated until guessed (a receive of their own beside the
    header's), then a small one (its filler is that large)."""
    return [torch.arange(COMBINED_MAX // 2, dtype=torch.float32) + i for i in range(5)] + [torch.ones(3)]


def test_direct_receive_keeps_every_contract_without_a_thread():
    first, second, (last_chain, last_threads) = run_distributed(_direct_contracts, 3)
    assert first["threads"] == second["threads"] == last_threads == []
    assert last_chain == [float(step + 2) for step in range(5)]  # +1 at each of stages 1..2
    assert first["chain"] == [float(2 * (step + 2)) for step in range(5)]
    assert second["changing"] and second["order"] and second["tuples"] and second["past_combined"] and first["big"]
    assert "stage 1/3 expected activation of step 299 microbatch 0 from stage 0" in second["mismatch"]
    assert second["guessed"] > 20  # repeated sizes still land in buffers posted with their headers
    # sends never wait for a receiver that is not receiving: all 40 in flight until settled
    assert first["in_flight"] >= 40 and second["in_flight"] >= 40
    assert first["settled"] == second["settled"] == 0
    assert first["both"] == [100.0 + i for i in range(40)] and second["both"] == [float(i) for i in range(40)]
    assert "closing" not in first
    assert "closed with 1 unconsumed message(s): activation of step 500 microbatch 0 from stage 0" in second["closing"]


def _direct_timeout(rank, world_size):
    t = Transport(rank, world_size, CPU, CPU, timeout=1.0, direct_receive=True)
    if rank == 0:
        t.send("next", Kind.ACTIVATION, 8, 0, torch.ones(3))  # not the one awaited: filed while waiting
        time.sleep(3)  # sends nothing more: rank 1 must give up after 1 s, not hang
        return None
    return recv_error(t, 7, 2), t.inboxes["prev"].pending()


def test_direct_receive_files_other_messages_while_it_waits_and_times_out():
    _, ((message, elapsed), pending) = run_distributed(_direct_timeout, 2)
    assert ("stage 1/2 timed out after 1s waiting for activation of step 7 microbatch 2 from stage 0 "
            "(1 other message(s) queued)") in message
    assert elapsed < 10
    assert pending == ["activation of step 8 microbatch 0"]


def _direct_peer_dies(rank, world_size):
    start = time.monotonic()
    try:
        t = Transport(rank, world_size, CPU, CPU, timeout=60.0, direct_receive=True)
    except TransportError as err:
        return str(err), time.monotonic() - start
    if rank == 0:
        raise RuntimeError("stage 0 crashed on purpose")
    return recv_error(t, 0, 0)


def test_direct_receive_fails_fast_when_the_peer_dies():
    results = run_distributed(_direct_peer_dies, 2, allow_failures=True)
    assert isinstance(results[0], RankFailed)
    message, elapsed = results[1]
    assert "stage 1/2 lost the connection from stage 0" in message
    assert elapsed < 30
