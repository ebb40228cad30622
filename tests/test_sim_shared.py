"""Stages sharing fewer cores than there are stages, and messages whose receipt takes a share of
a processor: hand-computed sharing, and the calibration that fits a stage's own cost and the
messages' back out of its contended, measured time."""

import json
import tempfile
from pathlib import Path

import pytest

from pipedni.sim import PipelineCost, SimAction, StageCost, replay, simulate, uniform
from pipedni.sim.__main__ import main
from pipedni.sim.validate import calibration_job, calibrated, compare, costs_for
from pipedni.transport.link import LinkSpec

SCHEDULES = ["naive", "gpipe", "1f1b", "dni", "cdni", "async"]


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("n", [2, 3, 4])
def test_a_core_per_stage_is_the_independent_replay(schedule, n):
    """With as many cores as stages nobody shares: every event at the same time as without cores,
    links, message costs and predictors included."""
    costs = uniform(n, 0.004, 0.008, 0.001, 0.002, 1e5, message_sec=1e-4)
    link = LinkSpec(latency_sec=0.003, bytes_per_sec=1e8)
    alone = simulate(schedule, costs, 4, 8, link)
    for cores in (n, n + 3):
        shared = simulate(schedule, costs, 4, 8, link, cores=cores)
        assert shared.step_end_sec == alone.step_end_sec
        assert [[(e.name, e.start, e.duration) for e in s] for s in shared.events] == \
            [[(e.name, e.start, e.duration) for e in s] for s in alone.events]


def test_two_stages_on_one_core_share_it_by_halves():
    """Stage 0 computes 1 s, stage 1 3 s, from t = 0 on one core: both go at half speed until
    stage 0 ends at 2 s, then stage 1 alone finishes its last 1 s at 4 s."""
    costs = PipelineCost((StageCost(1.0, 0.0), StageCost(3.0, 0.0)))
    streams = [[[SimAction("F", 0, 0)]], [[SimAction("F", 0, 0)]]]
    traces = replay(streams, costs, 1, cores=1)
    assert [t.step_end_sec for t in traces] == [[pytest.approx(2.0)], [pytest.approx(4.0)]]
    assert [t.busy_sec for t in traces] == [[pytest.approx(2.0)], [pytest.approx(4.0)]]  # wall, as measured


@pytest.mark.parametrize("schedule", ["gpipe", "dni"])
def test_the_shared_replay_with_a_processor_per_stage_is_the_independent_replay(schedule):
    """cores = 0 on the one clock (what receiving costs need) gives the independent replay's times."""
    from pipedni.sim.shared import SharedReplay
    from pipedni.schedules.streams import pipeline_streams

    costs = uniform(3, 0.004, 0.008, 0.001, 0.002, 1e5, message_sec=1e-4)
    streams = pipeline_streams(schedule, 3, 4, 8)
    alone = replay(streams, costs, 4, LinkSpec(latency_sec=0.003, bytes_per_sec=1e8))
    shared = SharedReplay(streams, costs, 4, LinkSpec(latency_sec=0.003, bytes_per_sec=1e8), cores=0).run()
    assert [t.step_end_sec for t in shared] == [pytest.approx(t.step_end_sec, abs=1e-9) for t in alone]


@pytest.mark.parametrize("cores,ends", [(1, (2.0, 3.5)), (0, (1.0, 2.5)), (2, (1.0, 2.0))])
def test_receiving_a_message_shares_the_receivers_processor(cores, ends):
    """Stage 0 computes 1 s and sends; stage 1 computes 2 s, then takes the message, whose
    receipt costs 0.5 s of processor.
    One core: both compute at half speed until stage 0 sends at 2 s; the receipt and stage 1's
    last 1 s then share the core: the receipt ends at 3 s, stage 1's work at 3.5 s (3 s if
    receiving were free).
    A processor per stage (0): the receipt starts at 1 s on stage 1's processor, beside its
    compute, both at half speed until 2 s; stage 1's last 0.5 s ends at 2.5 s.
    Two cores shared by all: stage 0 sends at 1 s; the receipt and stage 1 each have a core."""
    costs = PipelineCost((StageCost(1.0, 0.0), StageCost(2.0, 0.0)), receive_sec=0.5)
    streams = [[[SimAction("F", 0, 0), SimAction("SEND_F", 0, 0)]],
               [[SimAction("F", 0, 0), SimAction("RECV_F", 0, 0)]]]
    traces = replay(streams, costs, 1, cores=cores)
    assert [t.step_end_sec[0] for t in traces] == [pytest.approx(end) for end in ends]
    assert traces[1].busy_sec == [pytest.approx(ends[1])]  # the receipt slowed its compute: wall time


def test_a_message_is_received_after_the_one_before_it():
    """One direction's messages are received in order, one at a time: three sent at once on a
    free link, each 0.5 s to receive on an idle receiver, are taken at 0.5, 1 and 1.5 s."""
    costs = PipelineCost((StageCost(0.0, 0.0), StageCost(0.0, 0.0)), receive_sec=0.5)
    streams = [[[SimAction("SEND_F", 0, mb) for mb in range(3)]],
               [[SimAction("RECV_F", 0, mb) for mb in range(3)]]]
    traces = replay(streams, costs, 3, cores=0)
    assert traces[1].step_end_sec == [pytest.approx(1.5)]
    waits = [e for e in traces[1].events if e.name.startswith("RECV")]
    assert [e.start + e.duration for e in waits] == [pytest.approx(t) for t in (0.5, 1.0, 1.5)]


@pytest.mark.parametrize("n,cores", [(3, 1), (3, 2), (4, 2), (4, 3)])
def test_decoupled_stages_split_the_cores_evenly(n, cores):
    """Async stages never wait for each other once running, so every stage computes all the
    time and n equal stages on c cores each take n / c times their own step."""
    costs = uniform(n, 0.01, 0.02, 0.002)
    result = simulate("async", costs, 1, 30, batch_size=64, warmup_steps=10, cores=cores)
    assert result.step_sec == pytest.approx(costs.stages[0].step_sec * n / cores, rel=0.03)


@pytest.mark.parametrize("n", [3, 4])
def test_one_core_does_all_the_work_of_a_step_in_turn(n):
    """On one core a decoupled pipe's step takes every stage's work added up (the last stage has
    no predictor): the core is never idle and never does two things at once."""
    costs = uniform(n, 0.01, 0.02, 0.002, 0.004, message_sec=0.0005)
    result = simulate("dni", costs, 1, 30, batch_size=64, warmup_steps=10, cores=1)
    sends = 2 * (n - 1) * costs.message_sec
    assert result.step_sec == pytest.approx(sum(s.step_sec for s in costs.stages) + sends, rel=0.03)


def test_a_locked_pipeline_at_one_microbatch_never_shares():
    """GPipe at M=1 computes on one stage at a time (F0 F1 F2 B2 B1 B0), so one core costs it
    nothing while the stages' updates, which run together, are free."""
    costs = uniform(3, 0.01, 0.02)
    assert simulate("gpipe", costs, 1, 6, cores=1).step_sec == pytest.approx(simulate("gpipe", costs, 1, 6).step_sec)
    with_updates = uniform(3, 0.01, 0.02, 0.003)
    assert simulate("gpipe", with_updates, 1, 6, cores=1).step_sec > simulate("gpipe", with_updates, 1, 6).step_sec


def _bench_row(mode: str, m: int, costs, link: LinkSpec, cores: int, batch: int = 64) -> dict:
    """A bench results row 'measured' by the simulator itself on shared cores."""
    sim = simulate(mode, costs, m, 16, link, batch, 4, record=False, cores=cores)
    rate = sim.samples_per_sec
    return {"label": f"{mode} M={m}", "mode": mode, "microbatches": m,
            "samples_per_sec": {"median": rate, "min": rate, "max": rate},
            "stages": [{"busy_fraction": b, "bytes_sent_per_step": 0} for b in sim.busy_fraction]}


@pytest.mark.parametrize("mode,m", [("1f1b", 4), ("gpipe", 8), ("async", 1)])
def test_calibration_on_shared_cores_finds_each_stages_own_cost(mode, m):
    """A job 'measured' with known costs on 2 cores for 3 stages: its busy times include what
    each stage lost to the others, and calibration from wrong costs recovers the true ones;
    then the same job behind a 20 ms link, validated from the 0 ms cell, has no error."""
    true = PipelineCost(tuple(StageCost(0.010 * k, 0.020 * k, 0.002 * k) for k in (1.0, 1.6, 0.7)))
    calib_row = _bench_row(mode, m, true, LinkSpec(), cores=2)
    stage = {"fwd_bwd_sec": 0.05, "fwd_bwd_together_sec": 0.05, "optimizer_sec": 0.001}  # wrong on purpose
    profile = {"stages": [stage] * 3}
    calibration = {"profile": profile, "settings": {"steps": 16, "warmup": 4}, "batch_size": 64,
                   "overrides": [], "throughput": [calib_row], "machine": {"cores": 2}}
    replay_job = calibration_job(calibration, calib_row, None, 2)
    fitted = calibrated(costs_for(calibration, calib_row, 0.0), calib_row, 64, replay_job)
    for got, want in zip(fitted.stages, true.stages):
        assert got.step_sec == pytest.approx(want.step_sec, rel=0.05)  # busy walls pin costs loosely
    link = LinkSpec.from_config(20, 0)
    cell = {**calibration, "overrides": ["--dist.link_latency_ms=20"],
            "throughput": [_bench_row(mode, m, true, link, cores=2)]}
    entries = compare(cell, 0.0, calibration, calibration_dir=None)
    assert abs(entries[0]["error"]) < 0.03
    unshared = compare(cell, 0.0, calibration, cores=0)  # the same fit without sharing misses
    assert abs(unshared[0]["error"]) > abs(entries[0]["error"])


def test_cli_cores(capsys):
    assert main(["--schedule", "async", "--stages", "4", "--cores", "2", "--steps", "12"]) == 0
    assert "on 2 shared cores" in capsys.readouterr().out
    assert main(["--cores", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --cores = -1") and err.count("\n") == 1


def _write_cell(directory: str, true: PipelineCost) -> None:
    """A bench cell in ``directory`` 'measured' by the simulator on ``true`` costs (2 cores), its
    profile wrong on purpose: gpipe M=4, 1f1b M=8 and async."""
    stage = {"fwd_bwd_sec": 0.03, "fwd_bwd_together_sec": 0.03, "optimizer_sec": 0.002}
    rows = [_bench_row(mode, m, true, LinkSpec(), cores=2) for mode, m in (("gpipe", 4), ("1f1b", 8), ("async", 1))]
    cell = {"profile": {"stages": [stage] * true.num_stages}, "settings": {"steps": 16, "warmup": 4},
            "batch_size": 64, "overrides": [], "throughput": rows, "machine": {"cores": 2}}
    (Path(directory) / "results.json").write_text(json.dumps(cell))


def test_message_cost_is_fitted_on_the_calibration_cell(capsys):
    """A cell 'measured' by the simulator with 0.75 ms per message: --message-ms fit finds 0.75
    (the compute is fitted to each job's busy time; what is left of the step is messages)."""
    from pipedni.sim.validate import main as validate

    with tempfile.TemporaryDirectory() as tmp:
        _write_cell(tmp, uniform(3, 0.010, 0.020, 0.002, message_sec=0.00075))
        assert validate([tmp, "--calibrate", tmp, "--message-ms", "fit"]) == 0
    out = capsys.readouterr().out
    assert "0.75 ms" in out.splitlines()[0]
    assert validate([tmp, "--message-ms", "fit"]) == 2  # fit needs a cell to fit on
    assert "'fit' with --calibrate" in capsys.readouterr().err


def test_the_senders_and_the_receivers_costs_are_fitted_together(capsys):
    """Two stages on two cores, 'measured' with 0.5 ms per message to send and 1 ms to receive:
    the locked jobs pay both on their path, async pays the receipt in the cores its stages
    share with it, so --message-ms fit --receive-ms fit tells them apart and finds both."""
    import dataclasses

    from pipedni.sim.validate import main as validate

    with tempfile.TemporaryDirectory() as tmp:
        _write_cell(tmp, dataclasses.replace(uniform(2, 0.010, 0.020, 0.002, message_sec=0.0005), receive_sec=0.001))
        assert validate([tmp, "--calibrate", tmp, "--message-ms", "fit", "--receive-ms", "fit"]) == 0
        first = capsys.readouterr().out.splitlines()[0]
        assert "0.5 ms to send, 1 ms to receive" in first, first
        assert validate([tmp, "--calibrate", tmp, "--receive-ms", "-1"]) == 2
        assert capsys.readouterr().err.startswith("error: --receive-ms = '-1'")


@pytest.mark.parametrize("mode,m", [("gpipe", 4), ("async", 1)])
def test_a_cell_on_a_slower_machine_is_replayed_at_its_own_profiles_speed(mode, m):
    """The machine ran 1.3x slower in the validated cell than in the calibration cell: its
    profile and its jobs alike. With --speed cell the replay takes the machine's speed from the
    cell's own profile and the engine's overhead from the calibration, and has no error; taking
    the calibration's compute as it was (the default) misses by more than 10%."""
    true = PipelineCost(tuple(StageCost(0.010 * k, 0.020 * k, 0.002 * k) for k in (1.0, 1.6, 0.7)))
    slow = PipelineCost(tuple(StageCost(s.forward_sec * 1.3, s.backward_sec * 1.3, s.optimizer_sec * 1.3)
                              for s in true.stages))
    stage = {"fwd_bwd_sec": 0.02, "fwd_bwd_together_sec": 0.02, "optimizer_sec": 0.002}  # the engine's overhead: 1.5x
    calibration = {"profile": {"stages": [stage] * 3}, "settings": {"steps": 16, "warmup": 4}, "batch_size": 64,
                   "overrides": [], "throughput": [_bench_row(mode, m, true, LinkSpec(), cores=2)],
                   "machine": {"cores": 2}}
    slow_stage = {key: value * 1.3 for key, value in stage.items()}
    cell = {**calibration, "profile": {"stages": [slow_stage] * 3}, "overrides": ["--dist.link_latency_ms=20"],
            "throughput": [_bench_row(mode, m, slow, LinkSpec.from_config(20, 0), cores=2)]}
    assert abs(compare(cell, 0.0, calibration, speed="cell")[0]["error"]) < 0.03
    assert compare(cell, 0.0, calibration)[0]["error"] > 0.10
