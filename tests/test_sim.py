"""The pipeline simulator against figures computed by hand: bubbles, link costs, decoupled rates."""

import subprocess
import sys

import pytest

from pipedni.bench.__main__ import slug
from pipedni.schedules import DeadlockError, simulate as unit_simulate, pipeline_actions, stage_actions
from pipedni.sim import (PipelineCost, SimAction, StageCost, decoupled_stream, from_profile, replay, simulate,
                         uniform)
from pipedni.sim.__main__ import main
from pipedni.sim.costs import HEADER_BYTES, allreduce_sec, replicated
from pipedni.transport.link import LinkSpec

CASES = [(n, m) for n in (2, 3, 5) for m in (1, 2, 4, 7)]


def unit(num_stages: int, m: int, **kw) -> PipelineCost:
    """Forward 1 and backward 2 per microbatch (costs are per batch), no optimizer."""
    return uniform(num_stages, 1.0 * m, 2.0 * m, **kw)


def uneven(*stages: tuple[float, float, float]) -> PipelineCost:
    """Stages of (forward, backward, predictor) per batch."""
    return PipelineCost(tuple(StageCost(f, b, predictor_sec=p) for f, b, p in stages))


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
@pytest.mark.parametrize("n,m", CASES)
def test_locked_bubble(schedule, n, m):
    """Equal stages: every stage idles (N-1)/(M+N-1) of a step of (M+N-1)(f+b)."""
    result = simulate(schedule, unit(n, m), m, steps=6)
    assert result.step_sec == pytest.approx((m + n - 1) * 3)
    for busy in result.busy_fraction:
        assert busy == pytest.approx(1 - (n - 1) / (m + n - 1))


@pytest.mark.parametrize("schedule", ["naive", "gpipe", "1f1b"])
@pytest.mark.parametrize("n,m", CASES)
def test_unit_costs_match_the_tick_grid(schedule, n, m):
    """Forward = backward = 1 per microbatch: a step takes as long as actions.simulate's grid is wide."""
    result = simulate(schedule, uniform(n, m, m), m, steps=4)
    assert result.step_sec == pytest.approx(len(unit_simulate(pipeline_actions(schedule, n, m))[0]))


def test_naive_step_is_every_stage_in_turn():
    costs = uneven((1.0, 2.0, 0.0), (3.0, 1.5, 0.0), (0.5, 4.0, 0.0))
    for m in (1, 3):
        result = simulate("naive", costs, m, steps=5)
        assert result.step_sec == pytest.approx(1 + 2 + 3 + 1.5 + 0.5 + 4)


@pytest.mark.parametrize("m", [1, 2, 5])
def test_latency_adds_two_per_microbatch(m):
    """Naive on 2 stages waits for each microbatch's activation and its gradient: 2 L each."""
    latency = 0.25
    base = simulate("naive", unit(2, m), m, steps=5).step_sec
    slow = simulate("naive", unit(2, m), m, steps=5, link=LinkSpec(latency_sec=latency)).step_sec
    assert slow - base == pytest.approx(m * 2 * latency)


def test_bandwidth_adds_bytes_over_bandwidth_per_message():
    m, batch_bytes, bandwidth = 4, 8000.0, 1000.0
    costs = unit(2, m, activation_bytes=batch_bytes)
    base = simulate("naive", costs, m, steps=5).step_sec
    slow = simulate("naive", costs, m, steps=5, link=LinkSpec(bytes_per_sec=bandwidth)).step_sec
    assert slow - base == pytest.approx(m * 2 * (batch_bytes / m + HEADER_BYTES) / bandwidth)


@pytest.mark.parametrize("slowest", [0, 1, 2])
@pytest.mark.parametrize("schedule,m", [("dni", 1), ("dni", 3), ("cdni", 2), ("async", 1)])
def test_decoupled_runs_at_the_slowest_stage(schedule, m, slowest):
    """No stage waits for the whole pipe: the pipe goes as fast as its slowest stage's own step."""
    stages = [[2.0, 4.0, 0.5], [2.0, 4.0, 0.5], [2.0, 4.0, 0.0]]
    stages[slowest][1] = 7.0
    if schedule == "async":  # no predictor
        stages = [[f, b, 0.0] for f, b, _ in stages]
    costs = uneven(*map(tuple, stages))
    result = simulate(schedule, costs, m, steps=12, batch_size=60, warmup_steps=4)
    slowest_sec = max(s.step_sec for s in costs.stages)
    assert result.samples_per_sec == pytest.approx(60 / slowest_sec)


def test_async_runs_whole_batches():
    result = simulate("async", unit(3, 4), 4, steps=5)
    assert result.num_microbatches == 1


def test_profile_costs_split_one_to_two():
    """The profile in docs (2 stages, an MLP on CPU) under dni runs at its slower stage's step."""
    profile = {"batch_size": 256, "stages": [
        {"fwd_bwd_sec": 0.043, "optimizer_sec": 0.0018, "predictor_sec": 0.0079},
        {"fwd_bwd_sec": 0.0565, "optimizer_sec": 0.0037, "predictor_sec": 0.0}]}
    costs = from_profile({"profile": profile})
    assert costs.stages[0].forward_sec == pytest.approx(0.043 / 3)
    assert costs.stages[0].backward_sec == pytest.approx(0.043 * 2 / 3)
    result = simulate("dni", costs, 4, steps=10, batch_size=256)
    assert result.samples_per_sec == pytest.approx(256 / (0.0565 + 0.0037))


def test_locked_timeline_names_the_actions_in_order():
    steps, n, m = 3, 3, 2
    result = simulate("1f1b", unit(n, m), m, steps=steps)
    for i, events in enumerate(result.events):
        expected = [str(a) for a in stage_actions("1f1b", i, n, m)] * steps
        assert [e.name for e in events] == expected
        assert [e.step for e in events] == sorted(e.step for e in events)
        assert all(a.start + a.duration == pytest.approx(b.start) for a, b in zip(events, events[1:]))
    expected = {"F": "forward", "B": "backward", "SEND_F": "send", "SEND_B": "send", "RECV_F": "wait for activation",
                "RECV_B": "wait for gradient", "STEP": "optimizer"}
    for e in result.events[1]:
        assert e.category == expected[e.name.rstrip("0123456789")]


def test_all_reduce_ends_together():
    """With the whole model's norm every stage leaves the all-reduce at once, each step."""
    result = simulate("1f1b", unit(3, 2), 2, steps=4, reduce_norm=True)
    for step in range(4):
        ends = {round(e.start + e.duration, 9) for events in result.events for e in events
                if e.name == "ALL_REDUCE" and e.step == step}
        assert len(ends) == 1


def test_dni_stream_back_pressure_and_drain():
    """Stage 0 of 2 under dni: the gradients of step t - max_staleness are awaited at step t, the
    last ones in the drain."""
    stream = list(decoupled_stream(["dni"], 0, 1, steps=4, max_staleness=2))
    assert [str(a.kind) for a in stream[0]] == ["F", "SEND_F", "SG", "B", "STEP"]
    assert stream[2][-1] == SimAction("RECV_B", 0, 0)
    assert stream[-1] == [SimAction("RECV_B", 2, 0), SimAction("RECV_B", 3, 0)]


def test_async_stream_backpropagates_late():
    stream = list(decoupled_stream(["async", "async"], 0, 1, steps=3, delay=1))
    assert not any(a.kind == "B" for a in stream[0] + stream[1])  # d_0 = 2
    assert SimAction("B", 0, 0) in stream[2]
    assert [a.step for a in stream[-1] if a.kind == "STEP"] == [1, 2]


@pytest.mark.parametrize("modes", [["async", "locked", "dni"], ["dni", "async"], ["locked", "dni", "locked"]])
def test_mixed_pipes_finish_with_every_message_received(modes):
    simulate("mixed", unit(len(modes) + 1, 2), 2, steps=6, boundaries=modes)


def test_deadlock_names_who_waits_for_what():
    """Stage 0 waits for a gradient before sending the activation stage 1 waits for."""
    streams = [[[SimAction("F", 0, 0), SimAction("RECV_B", 0, 0), SimAction("SEND_F", 0, 0)], []],
               [[SimAction("RECV_F", 0, 0), SimAction("F", 0, 0), SimAction("SEND_B", 0, 0)], []]]
    with pytest.raises(DeadlockError, match=r"stage 0 at step 0 waits for the gradient of step 0 microbatch 0 "
                                            r"from stage 1.*stage 1 at step 0 waits for the activation"):
        replay(streams, unit(2, 1), 1)


def test_cli_prints_throughput(capsys):
    assert main(["--schedule", "gpipe", "--stages", "3", "--microbatches", "2", "--steps", "5"]) == 0
    out = capsys.readouterr().out
    assert "gpipe M=2" in out and "samples/s" in out


@pytest.mark.parametrize("schedule", ["1f1b", "async", "dni"])
def test_replicas_each_take_their_share_and_wait_for_their_all_reduce(schedule):
    """D replicas on 1/D of the batch: a free all-reduce makes the job D times faster; a ring
    all-reduce of 2 (D-1)/D of the gradients over the link lengthens every update by its time."""
    one = simulate(schedule, unit(4, 4), 4, 30)
    free = simulate(schedule, replicated(unit(4, 4), 2, [0.0] * 4), 4, 30)
    assert free.samples_per_sec == pytest.approx(2 * one.samples_per_sec, rel=1e-9)
    sync = allreduce_sec(1e8, 4, bandwidth_gbps=100.0)  # 100 MB, 4 replicas: 1.5 x 100 MB at 12.5 GB/s
    assert sync == pytest.approx(0.012)
    slow = simulate(schedule, replicated(unit(4, 4), 4, [sync] * 4), 4, 30)
    quarter = simulate(schedule, replicated(unit(4, 4), 4, [0.0] * 4), 4, 30)
    assert slow.samples_per_sec < quarter.samples_per_sec
    assert slow.step_sec >= quarter.step_sec + sync * (1 - 1e-9)  # not overlapped with the backward


def test_cli_predicts_replicas(capsys):
    argv = ["--schedule", "1f1b", "--stages", "4", "--microbatches", "8", "--steps", "10"]
    assert main(argv + ["--data-parallel", "2", "--grad-mb", "100", "--allreduce-gbps", "100"]) == 0
    assert "4 stages x 2 replicas" in capsys.readouterr().out
    assert exit_code(argv + ["--data-parallel", "0"]) == 2


def exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as stop:  # argparse's own checks
        return stop.code


@pytest.mark.parametrize("argv", [["--microbatches", "0"], ["--latency-ms", "-1"], ["--stages", "x"],
                                  ["--schedule", "dni", "--stages", "1"], ["--sweep", "--sweep-stages", "0"]])
def test_cli_bad_input_is_one_line(argv, capsys):
    assert exit_code(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_cli_unknown_schedule_exits_2():
    proc = subprocess.run([sys.executable, "-m", "pipedni.sim", "--schedule", "pipedream"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "pipedream" in proc.stderr


def test_validate_replays_a_bench_run_on_its_own_profile_link_and_bytes():
    """A results.json whose 'measurements' are the simulator's own comes back with no error:
    the profile's microbatched split, the link from the overrides and each stage's bytes
    (stage i sends a_i forward and a_{i-1} back) are all read as the bench wrote them."""
    from pipedni.sim.validate import calibrated, compare, costs_for, inside_rounds, link_of, table

    assert link_of(["--dist.link_latency_ms=30", "--train.steps=5", "--dist.link_bandwidth_mbps=100"]) == \
        LinkSpec.from_config(30, 100)
    split = {"1": {"forward_sec": 0.01, "backward_sec": 0.02}, "4": {"forward_sec": 0.016, "backward_sec": 0.03}}
    stage = {"fwd_bwd_sec": 0.03, "fwd_bwd_together_sec": 0.036, "optimizer_sec": 0.001, "predictor_sec": 0.004,
             "microbatched": split}
    profile = {"stages": [stage, stage, {**stage, "predictor_sec": 0.0}]}
    sent = [{"bytes_sent_per_step": b} for b in (1000, 1000 + 600, 600)]  # a_0 = 1000, a_1 = 600
    results = {"profile": profile, "settings": {"steps": 12, "warmup": 2}, "batch_size": 64,
               "overrides": ["--dist.link_latency_ms=5"], "throughput": []}
    for mode, m in (("1f1b", 4), ("dni", 1), ("single", 1)):
        row = {"label": f"{mode} M={m}", "mode": mode, "microbatches": m, "stages": sent}
        costs = costs_for(results, row, 0.0)
        assert [s.activation_bytes for s in costs.stages] == [1000, 600, 0]
        assert [s.gradient_bytes for s in costs.stages] == [0, 1000, 600]
        assert costs.stages[0].forward_sec == pytest.approx(split[str(m)]["forward_sec"] * 1.2)  # timed together
        if mode != "single":
            rate = simulate(mode, costs, m, 12, LinkSpec(0.005), 64, 2, record=False).samples_per_sec
            row["samples_per_sec"] = {"median": rate, "min": rate, "max": rate}
        results["throughput"].append(row)
    entries = compare(results)
    assert [e["label"] for e in entries] == ["1f1b M=4", "dni M=1"]  # one process is not simulated
    assert all(abs(e["error"]) < 1e-9 and e["latency_ms"] == pytest.approx(5) for e in entries)
    # the summary counts a miss the job's own repeats bracket apart from one they do not
    wide = {**entries[0], "measured_min": entries[0]["measured"] * 0.8, "error": -0.15,
            "simulated": entries[0]["measured"] * 0.85}
    narrow = {**entries[0], "error": -0.2, "simulated": entries[0]["measured"] * 0.8}
    assert [inside_rounds(e) for e in (entries[0], wide, narrow)] == [True, True, False]
    summary = table([entries[0], wide, narrow, {**entries[1], "error": 0.0}]).splitlines()[-2:]
    assert summary[0].endswith("2 within 10%; of the other 2, 1 inside the range their own repeats measured.")
    assert summary[1] == "By mode (within 10%, median error): 1f1b 1/3, median -15.0%; dni 1/1, median +0.0%."

    # calibrated on a run whose stages were busy 50% and 80% of a 0.1 s step (64 samples at 640/s)
    measured = {"samples_per_sec": {"median": 640.0}, "stages": [{"busy_fraction": b} for b in (0.5, 0.8, 0.8)]}
    scaled = calibrated(costs_for(results, results["throughput"][0], 0.0), measured, 64)
    assert [s.step_sec for s in scaled.stages] == pytest.approx([0.05, 0.08, 0.08])
    assert scaled.stages[0].forward_sec / scaled.stages[0].backward_sec == pytest.approx(0.016 / 0.03)


def test_an_untrusted_dni_stage_replays_the_delayed_fallback():
    """While its predictor is untrusted a dni stage trains as async does (the true gradient one
    step late), still paying its predictor: with a free predictor the two run at one rate, and
    its stream backpropagates the step before instead of its own at once, fitting the predictor
    on each true gradient as it arrives."""
    costs = uniform(2, 0.01, 0.02, 0.001, 0.0, 1000)
    untrusted = simulate("dni", costs, 1, 12, LinkSpec(0.005), 64, 2, trusted=False, record=False)
    assert untrusted.samples_per_sec == pytest.approx(simulate("async", costs, 1, 12, LinkSpec(0.005), 64, 2,
                                                               record=False).samples_per_sec)
    step3 = list(decoupled_stream(["dni"], 0, 1, 5, trusted=False))[3]
    assert [a.kind for a in step3] == ["F", "SEND_F", "RECV_B", "SG", "B", "STEP"]
    assert [a.step for a in step3 if a.kind in ("RECV_B", "SG", "B", "STEP")] == [2, 2, 2, 2]


def test_validate_replays_the_clipping_all_reduce_of_a_job_that_clipped(tmp_path):
    """A locked job that clipped by the whole model's norm waits in an all-reduce every step: the
    replay keeps that barrier, read from the job's own config.yaml, and it costs a 1F1B M=1 pipeline
    the overlap of its last stage's update with the first stage's backward and update."""
    from pipedni.config import load_config
    from pipedni.config.load import save_config
    from pipedni.sim.validate import clips

    for label, clip in (("1f1b M=1", 1.0), ("gpipe M=4", 0.0)):
        run = tmp_path / "runs" / slug(label) / "r0"
        run.mkdir(parents=True)
        save_config(load_config(None, [f"--optim.grad_clip={clip}"]), run / "config.yaml")
    assert clips(tmp_path, "1f1b M=1") and not clips(tmp_path, "gpipe M=4") and not clips(None, "1f1b M=1")
    assert not clips(tmp_path, "async")  # no run kept: nothing to read, no barrier
    costs = PipelineCost((StageCost(0.01, 0.02, 0.005), StageCost(0.01, 0.02, 0.05)))  # a slow last update
    free, barrier = (simulate("1f1b", costs, 1, 10, LinkSpec(), 64, 2, reduce_norm=r, record=False) for r in (False, True))
    # free: stage 1's F, B and update (80 ms) bound the step; with the barrier its update waits for stage 0's B
    assert free.step_sec == pytest.approx(0.01 + 0.02 + 0.05)
    assert barrier.step_sec == pytest.approx(0.01 + 0.02 + 0.02 + 0.05)
