"""A schedule defined outside pipedni is one module and one registry line ("Adding a schedule" in
docs/design.md). Registered, it runs in the engine (two gloo processes, equal to one process
parameter by parameter, as every locked schedule must), in the simulator and in the bench, with
nothing else in pipedni told of it."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipedni.bench.plan import plan_jobs
from pipedni.engine import Trainer
from pipedni.errors import ConfigError
from pipedni.export import merge_checkpoints
from pipedni.schedules import backward_actions, forward_actions, registry
from pipedni.schedules.locked import locked_schedule
from pipedni.schedules.streams import simulated_modes
from pipedni.sim import simulate, uniform

from helpers import assert_same_parameters, gloo_runtime, make_config, run_distributed, train_single


def last_in_first_out(stage: int, n: int, m: int) -> list:
    """GPipe with the backwards in the reverse order of the forwards: the last microbatch in is
    the first one back, so the last stage needs no stored activation between its F and its B."""
    return ([a for mb in range(m) for a in forward_actions(stage, n, mb)]
            + [a for mb in reversed(range(m)) for a in backward_actions(stage, n, mb)])


TOY = locked_schedule("gpipe_lifo", "GPipe whose backwards run last in, first out", plan=last_in_first_out)


@pytest.fixture
def registered():
    registry.register(TOY)
    yield TOY
    del registry.SCHEDULES[TOY.name], registry.MODES[TOY.name]


def _train_toy(rank: int, world_size: int, run_dir: str) -> dict:
    registry.register(TOY)  # every process registers it, as a user's module would
    trainer = Trainer(make_config(Path(run_dir), TOY.name, 4), gloo_runtime(rank, world_size))
    summary = trainer.fit()
    trainer.close()
    return summary


def test_a_registered_schedule_runs_in_the_engine_the_simulator_and_the_bench(tmp_path, registered):
    expected, _ = train_single(tmp_path / "single")
    summaries = run_distributed(_train_toy, 2, str(tmp_path / "toy"))
    assert summaries[-1]["schedule"] == TOY.name and summaries[-1]["num_stages"] == 2
    assert_same_parameters(merge_checkpoints(tmp_path / "toy"), expected, TOY.name)

    assert TOY.name in simulated_modes()
    costs = uniform(3, 0.010, 0.020, activation_bytes=1000)
    toy, gpipe = (simulate(name, costs, 4, steps=6, record=False) for name in (TOY.name, "gpipe"))
    assert toy.step_sec == pytest.approx(gpipe.step_sec)  # GPipe's bubble, mirrored

    jobs = plan_jobs([TOY.name], 2, [1, 4], 32)
    assert [(job.label, job.schedule) for job in jobs] == [(f"{TOY.name} M=1", TOY.name), (f"{TOY.name} M=4", TOY.name)]


def test_a_taken_name_is_refused(registered):
    with pytest.raises(ConfigError, match="schedule 'gpipe_lifo': the name 'gpipe_lifo' is taken; choose another"):
        registry.register(TOY)
    with pytest.raises(ConfigError, match="the name '1f1b' is taken"):
        registry.register(locked_schedule("1f1b", "a second 1f1b", plan=last_in_first_out))
