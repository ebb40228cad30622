"""Emulated links and the wire dtype: the delivery model, the holds that keep it, and real runs."""

from __future__ import annotations

import json
import time

import pytest
import torch

from pipedni.config import load_config
from pipedni.engine import Trainer, check_layout
from pipedni.errors import ConfigError, LaunchError, TransportError
from pipedni.runtime import Runtime
from pipedni.transport import Kind, Transport
from pipedni.transport.link import Link, LinkModel, LinkSpec
from pipedni.transport.wire import HEADER_LEN
from helpers import run_distributed

CPU = torch.device("cpu")


def test_delivery_times_of_a_scripted_message_sequence():
    """delivered = max(sent, link free) + bytes / bandwidth + latency, one message at a time."""
    link = LinkModel(LinkSpec.from_config(latency_ms=10, bandwidth_mbps=8))  # 1e6 bytes/s
    assert link.deliver_at(0.0, 1000) == pytest.approx(0.011)  # 1 ms on the wire + 10 ms
    assert link.deliver_at(0.0, 2000) == pytest.approx(0.013)  # queued behind the first: free at 1 ms
    assert link.deliver_at(0.0025, 500) == pytest.approx(0.0135)  # free at 3 ms
    assert link.deliver_at(1.0, 0) == pytest.approx(1.010)  # an idle link: latency alone
    latency_only = LinkModel(LinkSpec(latency_sec=0.03))
    assert [latency_only.deliver_at(t, 10**9) for t in (0.0, 0.0, 0.5)] == pytest.approx([0.03, 0.03, 0.53])
    assert not LinkSpec.from_config(0, 0).emulated and LinkSpec.from_config(0, 100).emulated
    assert LinkSpec.from_config(30, 1000).describe() == "30 ms one way, 1000 Mbit/s"


def test_a_link_holds_each_message_for_its_delivery_time_and_bounds_the_wire():
    """The hold stamped on each message is its delivery time less its send time; a sender with
    ``capacity`` messages on the wire waits for the oldest; off, nothing is held or waited."""
    link = Link(LinkSpec(latency_sec=0.05, bytes_per_sec=1e5), capacity=8, timeout=5.0, who="s", what="to 1")
    first = time.perf_counter()
    for i in range(4):  # 1000 bytes: 10 ms on the wire each, queued behind each other
        sent = time.perf_counter()
        hold, waited = link.reserve(1000)
        assert waited == 0.0
        assert sent - first + hold == pytest.approx(0.05 + (i + 1) * 0.01, abs=2e-3)
    assert Link(LinkSpec(), capacity=1, timeout=1.0, who="s", what="to 1").reserve(10**9) == (0.0, 0.0)

    full = Link(LinkSpec(latency_sec=0.2), capacity=2, timeout=5.0, who="s", what="to 1")
    assert full.reserve(10)[1] == 0.0 and full.reserve(10)[1] == 0.0
    hold, waited = full.reserve(10)
    assert waited > 0.1 and hold == pytest.approx(0.2, abs=1e-3)  # room once the first was delivered
    slow = Link(LinkSpec(bytes_per_sec=1e3), capacity=1, timeout=1.0, who="stage 0/2", what="to stage 1")
    slow.reserve(10_000)  # 10 s on the wire
    with pytest.raises(TransportError, match="stage 0/2: the emulated link to stage 1 would keep this sender "
                                             "waiting 10s .* raise dist.link_bandwidth_mbps or dist.timeout_sec"):
        slow.reserve(10)


def _round_trips(rank, world_size, latency, n):
    """Rank 0 sends an activation (bf16 on the wire), rank 1 returns it as the gradient. Rank 1
    also times, from each gradient it sends, until the next activation counts as arrived."""
    t = Transport(rank, world_size, CPU, CPU, timeout=30.0, link=LinkSpec(latency), wire_dtype=torch.bfloat16)
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4) / 8  # exact in bfloat16
    times, got, sent_at = [], [], 0.0
    for i in range(n):
        if rank == 0:
            start = time.perf_counter()
            t.send("next", Kind.ACTIVATION, i, 0, x)
            t.send("next", Kind.ACTIVATION, i, 1, torch.tensor([7, 2**40]))  # integers travel as they are
            g = t.recv("next", Kind.GRADIENT, i, 0)
            got.append((str(g.dtype), g.tolist()))
            times.append(time.perf_counter() - start)
        else:
            if i:
                while not t.arrived("prev", Kind.ACTIVATION, i, 1):
                    time.sleep(1e-4)
                times.append(time.perf_counter() - sent_at)
            y = t.recv("prev", Kind.ACTIVATION, i, 0)
            v = t.recv("prev", Kind.ACTIVATION, i, 1)
            got.append((str(v.dtype), v.tolist()))
            t.send("prev", Kind.GRADIENT, i, 0, y)
            sent_at = time.perf_counter()
    sent = t.bytes_sent
    t.close()
    return times, got, sent


def test_transport_round_trip_pays_the_latency_both_ways_and_restores_the_dtype():
    latency, n = 0.04, 4
    (times, back, sent0), (turns, ints, sent1) = run_distributed(_round_trips, 2, latency, n)
    assert min(times) >= 2 * latency  # an activation one way, its gradient the other
    assert len(turns) == n - 1 and min(turns) >= 2 * latency  # held messages do not count as arrived
    x = (torch.arange(12, dtype=torch.float32).reshape(3, 4) / 8).tolist()
    assert back == [("torch.float32", x)] * n
    assert ints == [("torch.int64", [7, 2**40])] * n
    assert sent0 == 2 + n * (12 * 2 + 2 * 8)  # a bf16 warm-up token, bf16 activations, int64 side tensors
    assert sent1 == 2 + n * 12 * 2


def _train(rank, world_size, run_dir, overrides):
    cfg = load_config(None, [f"--run.dir={run_dir}", "--data.name=synthetic", "--data.synthetic_size=512",
                             "--data.batch_size=64", "--model.width=64", "--model.depth=2", "--train.steps=6",
                             "--train.eval_every=0", "--run.log_every=1000", "--checkpoint.enabled=false",
                             *overrides])
    return Trainer(cfg, Runtime(rank, world_size, rank, world_size, CPU, "gloo")).fit()


def test_a_run_over_a_slow_link_takes_the_time_the_link_model_says(tmp_path):
    """Naive model parallelism waits for every message: each of M microbatches sends its
    activation one way and its gradient back, so a step takes at least M x 2 x (latency +
    bytes / bandwidth), and little more than that on top of its own compute. The wire dtype
    halves the bytes. Clipping by the whole model's norm adds an all-reduce, which waits for the
    other stage: the last stage's wait there is timed as a wait for gradients, not as compute."""
    latency_ms, mbps, m = 30.0, 40.0, 2
    overrides = ["--train.schedule=naive", f"--train.microbatches={m}", f"--dist.link_latency_ms={latency_ms}",
                 f"--dist.link_bandwidth_mbps={mbps}", "--dist.wire_dtype=bfloat16", "--run.timeline_steps=2",
                 "--optim.grad_clip=1.0"]
    summary = run_distributed(_train, 2, str(tmp_path), overrides)[1]
    first, last = summary["stages"]
    message_bytes = 32 * 64 * 2  # a microbatch's [32, 64] activation (and its gradient) in bfloat16
    assert first["bytes_sent_per_step"] == last["bytes_sent_per_step"] == m * message_bytes
    header_bytes = HEADER_LEN * 8
    one_way = latency_ms / 1e3 + (message_bytes + header_bytes) * 8 / (mbps * 1e6)
    floor = m * 2 * one_way
    for stage in (first, last):
        step_sec = stage["step_sec"] / stage["steps"]
        assert floor <= step_sec < floor + 0.5 * floor + stage["compute_sec"] / stage["steps"], (step_sec, floor)
    assert summary["test_accuracy"] is not None

    # the timeline shows it: stage 0 waits for each gradient at least a round trip, for 2 steps
    trace = json.loads((tmp_path / "timeline.json").read_text())["traceEvents"]
    rows = {i: [e for e in trace if e["ph"] == "X" and e["tid"] == i] for i in (0, 1)}
    assert [e["name"] for e in rows[0] if e["cat"] != "send"] == ["F0", "RECV_B0", "B0", "F1", "RECV_B1", "B1",
                                                                  "ALL_REDUCE", "ALL_REDUCE", "STEP"] * 2
    assert {e["args"]["step"] for e in rows[0]} == {1, 2}  # the steps after the first
    assert [e["name"] for e in rows[1] if e["cat"] == "send"] == ["send gradient 0", "send gradient 1"] * 2
    for e in rows[0]:
        if e["cat"] == "wait for gradient" and e["name"] != "ALL_REDUCE":
            assert e["dur"] >= 2 * one_way * 1e6
    # stage 1 reaches the all-reduce as its last gradient leaves: it waits at least a one-way trip
    reduce_waits = [e for e in rows[1] if e["name"] == "ALL_REDUCE" and e["cat"] == "wait for gradient"]
    assert len(reduce_waits) == 2 and all(e["dur"] >= 0.8 * one_way * 1e6 for e in reduce_waits)
    assert last["wait_grad_sec"] / last["steps"] >= 0.8 * one_way > last["compute_sec"] / last["steps"]
    assert (tmp_path / "timeline.png").stat().st_size > 0

    # the simulator replays the same steps on their own costs: the same calls in the same order
    from pipedni.sim.beside import costs_from, main as beside, read_trace, replay_run

    measured = read_trace(tmp_path)
    costs = costs_from(measured, [first["bytes_sent_per_step"], last["bytes_sent_per_step"]])
    assert costs.stages[0].activation_bytes == costs.stages[1].gradient_bytes == m * message_bytes
    simulated, begin, count = replay_run(load_config(tmp_path / "config.yaml", []), measured, costs)
    for real, sim in zip(measured, simulated.window(begin, count)):
        names = [e.name for e in real if e.category != "send"]  # ALL_REDUCE: the norm, then the wait
        assert [n for i, n in enumerate(names) if not i or n != names[i - 1]] == [e.name for e in sim
                                                                                  if e.category != "send"]
    assert beside([str(tmp_path)]) == 0 and (tmp_path / "timeline_beside.png").stat().st_size > 0


def test_bad_link_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"dist.link_latency_ms = -5.0; must be >= 0"):
        load_config(None, ["--dist.link_latency_ms=-5"])
    with pytest.raises(ConfigError, match=r"dist.link_bandwidth_mbps = nan; must be >= 0"):
        load_config(None, ["--dist.link_bandwidth_mbps=nan"])
    with pytest.raises(ConfigError, match="dist.wire_dtype"):
        load_config(None, ["--dist.wire_dtype=int8"])
    with pytest.raises(ConfigError, match=r"run.timeline_steps = -1; must be >= 0"):
        load_config(None, ["--run.timeline_steps=-1"])
    one = Runtime(0, 1, 0, 1, CPU, "none")
    with pytest.raises(LaunchError, match="dist.link_latency_ms = 10 .* one process has none"):
        check_layout(load_config(None, ["--dist.link_latency_ms=10"]), one)
