"""The schedule registry: one entry per schedule, and nothing else that knows their names."""

import pytest
import torch

from pipedni.config import load_config
from pipedni.errors import ConfigError, LaunchError
from pipedni.errors import TransportError
from pipedni.metrics.records import MetricSpec
from pipedni.schedules import registry
from pipedni.schedules.spec import ScheduleSpec
from pipedni.transport import Kind, NullTransport


def test_every_registered_schedule_is_a_valid_config_value():
    for name in registry.SCHEDULES:
        assert load_config(None, [f"--train.schedule={name}"]).train.schedule == name


def test_an_unknown_schedule_lists_every_registered_one():
    with pytest.raises(ConfigError, match="train.schedule = 'pipedream' is not a schedule") as info:
        registry.check_config(load_config(None, ["--train.schedule=pipedream"]))
    for name in registry.SCHEDULES:
        assert repr(name) in str(info.value)


@pytest.mark.parametrize("name,num_stages,runs", [
    ("1f1b", 1, "single"), ("gpipe", 1, "single"), ("naive", 1, "single"), ("single", 1, "single"),
    ("1f1b", 2, "1f1b"), ("dni", 2, "dni"), ("torch_gpipe", 2, "torch_gpipe"),
])
def test_a_locked_schedule_on_one_stage_runs_as_the_reference(name, num_stages, runs):
    cfg = load_config(None, [f"--train.schedule={name}"])
    assert registry.check_layout(cfg, num_stages).name == runs


def test_single_on_several_processes_names_the_pipelined_choices():
    cfg = load_config(None, ["--train.schedule=single"])
    with pytest.raises(LaunchError, match="runs the whole model in 1 process but 3 were started") as info:
        registry.check_layout(cfg, 3)
    for name in ("naive", "gpipe", "1f1b", "dni", "torch_gpipe", "torch_1f1b"):
        assert name in str(info.value)


def test_decoupled_needs_two_stages():
    with pytest.raises(LaunchError, match="'dni' needs at least 2 stages"):
        registry.check_layout(load_config(None, ["--train.schedule=dni"]), 1)


def test_a_new_schedule_is_one_entry(monkeypatch):
    """What adding a schedule takes: a ScheduleSpec in the registry. The config accepts its name,
    the layout checks apply its bounds and its own check, and its metrics come with it."""
    def check(cfg, num_stages):
        if cfg.train.microbatches % num_stages:
            raise LaunchError(f"toy needs microbatches divisible by {num_stages}")

    toy = ScheduleSpec("toy", "a test schedule", build=lambda ctx: None, min_stages=3, locked=False, check=check,
                       metrics=(MetricSpec("lag", "mean_lag", "ema", "lag", ".1f"),))
    monkeypatch.setitem(registry.SCHEDULES, "toy", toy)
    cfg = load_config(None, ["--train.schedule=toy", "--train.microbatches=4"])
    with pytest.raises(LaunchError, match="'toy' needs at least 3 stages"):
        registry.check_layout(cfg, 2)
    with pytest.raises(LaunchError, match="divisible by 3"):
        registry.check_layout(cfg, 3)
    assert registry.check_layout(cfg, 4) is toy


def test_the_null_transport_has_no_neighbours():
    """One process: an all-reduce over one stage is the identity, counters stay zero, and a
    message to a neighbour that does not exist is a clear error, not a hang."""
    t = NullTransport()
    x = torch.ones(3)
    assert t.all_reduce(x) is x and torch.equal(x, torch.ones(3))
    assert (t.counts(), t.bytes_sent, t.send_wait_sec, t.peak_queued, t.recv_ready("next", Kind.GRADIENT, {0})) == (
        {}, 0, 0.0, 0, [])
    with pytest.raises(TransportError, match="no 'next' neighbour to send activation of step 3 microbatch 1"):
        t.send("next", Kind.ACTIVATION, 3, 1, x)
    with pytest.raises(TransportError, match="no 'prev' neighbour to receive"):
        t.recv("prev", Kind.ACTIVATION, 0, 0)
    t.close()
