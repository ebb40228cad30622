"""Schedules as data: every plan is complete, well-ordered, deadlock-free, and has its memory shape."""

import pytest

from pipedni.schedules import (
    LOCKED_PLANS,
    Action,
    DeadlockError,
    format_grid,
    pipeline_actions,
    simulate,
    stage_actions,
    with_fits,
)

PIPELINED = ("naive", "gpipe", "1f1b")
STAGES = range(1, 6)
MICROBATCHES = range(1, 9)
GRID_CASES = [(s, n, m) for s in PIPELINED for n in STAGES for m in MICROBATCHES]

# Copied from the pipedni/schedules/actions.py module docstring: the picture the docs promise.
DOCSTRING_GRID = """\
1f1b, N=3, M=4
tick     0   1   2   3   4   5   6   7   8   9   10  11
stage 0  F0  F1  F2  .   .   B0  F3  B1  .   B2  .   B3
stage 1  .   F0  F1  .   B0  F2  B1  F3  B2  .   B3  .
stage 2  .   .   F0  B0  F1  B1  F2  B2  F3  B3  .   ."""


def index_of(plan: list[Action], kind: str, mb: int) -> int:
    matches = [i for i, a in enumerate(plan) if a == Action(kind, mb)]
    assert len(matches) == 1, f"{kind}{mb} appears {len(matches)} times in {[str(a) for a in plan]}"
    return matches[0]


def outstanding_forwards(plan: list[Action]) -> int:
    """Peak number of microbatches forwarded but not yet backwarded: activations held in memory."""
    live = peak = 0
    for a in plan:
        live += a.kind == "F"
        live -= a.kind == "B"
        peak = max(peak, live)
    return peak


# --------------------------------------------------------------------------- Action


def test_action_prints_as_kind_and_microbatch():
    assert str(Action("F", 3)) == "F3"
    assert str(Action("RECV_B", 0)) == "RECV_B0"
    assert str(Action("STEP")) == "STEP"
    assert Action("STEP").microbatch == -1


# --------------------------------------------------------------------------- plan structure


@pytest.mark.parametrize("schedule,n,m", GRID_CASES)
def test_each_stage_plan_is_complete_and_ordered(schedule, n, m):
    """Every microbatch is forwarded and backwarded once, with its messages right beside the compute."""
    for stage, plan in enumerate(pipeline_actions(schedule, n, m)):
        first, last = stage == 0, stage == n - 1
        where = f"{schedule} N={n} M={m} stage {stage}: {[str(a) for a in plan]}"
        assert sum(a.kind == "F" for a in plan) == m, where
        assert sum(a.kind == "B" for a in plan) == m, where
        assert [a.kind for a in plan].count("STEP") == 1, where
        assert plan[-1] == Action("STEP"), where
        sends_f = sum(a.kind == "SEND_F" for a in plan)
        recvs_f = sum(a.kind == "RECV_F" for a in plan)
        sends_b = sum(a.kind == "SEND_B" for a in plan)
        recvs_b = sum(a.kind == "RECV_B" for a in plan)
        assert (recvs_f, sends_f, recvs_b, sends_b) == (
            0 if first else m,
            0 if last else m,
            0 if last else m,
            0 if first else m,
        ), where
        for mb in range(m):
            f, b = index_of(plan, "F", mb), index_of(plan, "B", mb)
            assert f < b, where
            if not first:
                assert plan[f - 1] == Action("RECV_F", mb), where
                assert plan[b + 1] == Action("SEND_B", mb), where
            if not last:
                assert plan[f + 1] == Action("SEND_F", mb), where
                assert plan[b - 1] == Action("RECV_B", mb), where


@pytest.mark.parametrize("schedule,n,m", GRID_CASES)
def test_simulation_finishes_with_every_compute_on_the_grid(schedule, n, m):
    grid = simulate(pipeline_actions(schedule, n, m))
    assert len(grid) == n
    assert len({len(row) for row in grid}) == 1, "rows have different widths"
    for stage, row in enumerate(grid):
        assert sorted(c for c in row if c.startswith("F")) == sorted(f"F{mb}" for mb in range(m)), (stage, row)
        assert sorted(c for c in row if c.startswith("B")) == sorted(f"B{mb}" for mb in range(m)), (stage, row)
        assert all(c == "." or c[0] in "FB" for c in row), row


@pytest.mark.parametrize("schedule,n,m", GRID_CASES)
def test_timeline_length_with_unit_compute(schedule, n, m):
    """GPipe and 1F1B fill the pipe (2(M+N-1) ticks); naive runs one microbatch at a time (2NM)."""
    ticks = len(simulate(pipeline_actions(schedule, n, m))[0])
    expected = 2 * n * m if schedule == "naive" else 2 * (m + n - 1)
    assert ticks == expected


@pytest.mark.parametrize("n", STAGES)
@pytest.mark.parametrize("m", MICROBATCHES)
def test_1f1b_bounds_activations_by_depth_gpipe_by_microbatches(n, m):
    """The memory property that makes 1F1B worth having: stage s holds at most N - s activations,
    while GPipe holds all M. Same bubble, different memory."""
    for stage in range(n):
        one_f_one_b = outstanding_forwards(stage_actions("1f1b", stage, n, m))
        gpipe = outstanding_forwards(stage_actions("gpipe", stage, n, m))
        naive = outstanding_forwards(stage_actions("naive", stage, n, m))
        assert one_f_one_b <= n - stage
        assert one_f_one_b == min(n - stage, m)
        assert gpipe == m
        assert naive == 1


def test_1f1b_saves_memory_over_gpipe_when_microbatches_exceed_depth():
    n, m = 4, 8
    assert outstanding_forwards(stage_actions("1f1b", 0, n, m)) == 4
    assert outstanding_forwards(stage_actions("gpipe", 0, n, m)) == 8
    assert outstanding_forwards(stage_actions("1f1b", n - 1, n, m)) == 1


# --------------------------------------------------------------------------- single and bad arguments


@pytest.mark.parametrize("m", MICROBATCHES)
def test_single_is_one_forward_one_backward_whatever_m(m):
    assert stage_actions("single", 0, 1, m) == [Action("F", 0), Action("B", 0), Action("STEP")]
    assert simulate(pipeline_actions("single", 1, m)) == [["F0", "B0"]]


@pytest.mark.parametrize("n", [2, 3, 5])
def test_single_refuses_more_than_one_stage(n):
    with pytest.raises(ValueError, match=f"got {n} stages"):
        stage_actions("single", 0, n, 4)


def test_unknown_schedule_lists_the_choices():
    with pytest.raises(ValueError, match="unknown schedule 'pipedream'") as info:
        stage_actions("pipedream", 0, 2, 4)
    for name in LOCKED_PLANS:
        assert name in str(info.value)


@pytest.mark.parametrize("stage", [-1, 3])
def test_stage_out_of_range(stage):
    with pytest.raises(ValueError, match=f"stage {stage} out of range for 3 stages"):
        stage_actions("1f1b", stage, 3, 4)


# --------------------------------------------------------------------------- simulate catches broken plans


def test_waiting_for_a_gradient_before_sending_the_activation_deadlocks():
    """Stage 0 waits for B0's gradient before it has sent F0's activation: both stages wait forever."""
    plans = pipeline_actions("naive", 2, 2)
    s0 = plans[0]
    i, j = s0.index(Action("SEND_F", 0)), s0.index(Action("RECV_B", 0))
    s0[i], s0[j] = s0[j], s0[i]
    with pytest.raises(DeadlockError, match="deadlock") as info:
        simulate(plans)
    message = str(info.value)
    assert "stage 0 at RECV_B0" in message
    assert "stage 1 at RECV_F0" in message


def test_a_dropped_send_deadlocks_the_receiver():
    plans = pipeline_actions("1f1b", 3, 4)
    plans[2].remove(Action("SEND_B", 1))
    with pytest.raises(DeadlockError, match="stage 1 at RECV_B1"):
        simulate(plans)


def test_a_dropped_receive_is_reported_as_an_unreceived_message():
    plans = pipeline_actions("gpipe", 2, 3)
    plans[1].remove(Action("RECV_F", 2))
    with pytest.raises(DeadlockError, match="never received"):
        simulate(plans)


def test_a_duplicate_send_is_reported():
    plans = pipeline_actions("naive", 2, 1)
    i = plans[0].index(Action("SEND_F", 0))
    plans[0].insert(i, Action("SEND_F", 0))
    with pytest.raises(DeadlockError, match="stage 0: SEND_F0 is sent twice"):
        simulate(plans)


def test_sending_past_the_last_stage_is_reported():
    plans = pipeline_actions("naive", 2, 1)
    plans[1].insert(1, Action("SEND_F", 0))
    with pytest.raises(DeadlockError, match="stage 1: SEND_F0 .* to no stage"):
        simulate(plans)


def test_messages_are_not_received_in_the_tick_they_are_sent():
    """Compute takes one tick: stage 1 can run F0 only in the tick after stage 0 ran it."""
    grid = simulate(pipeline_actions("gpipe", 2, 1))
    assert grid == [["F0", ".", ".", "B0"], [".", "F0", "B0", "."]]


# --------------------------------------------------------------------------- clipping and fitting as actions


@pytest.mark.parametrize("schedule,n,m", [(s, n, m) for s in PIPELINED for n in (1, 2, 4) for m in (1, 3)])
def test_whole_model_clipping_is_one_all_reduce_before_the_step(schedule, n, m):
    """The norm all-reduce is an action of every stage's plan, just before STEP, so the
    simulator sees the barrier it is; the plan without it is the same otherwise."""
    plans = pipeline_actions(schedule, n, m, reduce_norm=True)
    for plan, plain in zip(plans, pipeline_actions(schedule, n, m)):
        assert plan[-2:] == [Action("ALL_REDUCE"), Action("STEP")]
        assert plan[:-2] == plain[:-1]
    simulate(plans)


def test_an_all_reduce_missing_on_one_stage_deadlocks_the_others():
    """A collective that one stage never joins leaves every other stage waiting at it."""
    plans = pipeline_actions("1f1b", 3, 2, reduce_norm=True)
    plans[1].remove(Action("ALL_REDUCE"))
    with pytest.raises(DeadlockError, match="stage 0 at ALL_REDUCE"):
        simulate(plans)


def test_fits_follow_each_received_gradient():
    """DNI's warm-up: every gradient a stage receives is fitted before the backward uses it; the
    last stage receives none, so fits nothing."""
    plans = [with_fits(plan) for plan in pipeline_actions("1f1b", 3, 4)]
    for stage, plan in enumerate(plans):
        fits = [a.microbatch for a in plan if a.kind == "FIT"]
        assert fits == ([] if stage == 2 else [0, 1, 2, 3])
        for mb in fits:
            assert index_of(plan, "RECV_B", mb) + 1 == index_of(plan, "FIT", mb) < index_of(plan, "B", mb)
    simulate(plans)
    assert str(Action("FIT", 2)) == "FIT2" and str(Action("ALL_REDUCE")) == "ALL_REDUCE"


# --------------------------------------------------------------------------- format_grid


def test_format_grid_matches_the_module_docstring():
    assert format_grid("1f1b", 3, 4) == DOCSTRING_GRID


def test_format_grid_of_naive_shows_one_microbatch_in_flight():
    text = format_grid("naive", 2, 2)
    assert text.splitlines() == [
        "naive, N=2, M=2",
        "tick     0   1   2   3   4   5   6   7",
        "stage 0  F0  .   .   B0  F1  .   .   B1",
        "stage 1  .   F0  B0  .   .   F1  B1  .",
    ]
