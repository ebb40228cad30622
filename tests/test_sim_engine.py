"""The simulator's decoupled streams against what the engine did: a real run's measured timeline,
call by call.

``BoundaryWorker.train_step`` executes ``steps.decoupled_step`` for its state, and
``decoupled_stream`` (pipedni/schedules/streams.py) is the same function for the state the
simulator assumes; the engine names each timed call as the stream names its action
(``action_name``), so a run over gloo with ``run.timeline_steps`` must show, stage by stage and
step by step, the stream's actions in the stream's order. Sends are left out (the transport names them by message, not
by action), and so are calls the stream folds into another action's cost (the weight stash, the
fits of arrived gradients). A trusted dni stage's back-pressure waits depend on timing (a
gradient already there is fitted without one), so its RECV_B are left out on both sides.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from pipedni.config import load_config
from pipedni.engine import Trainer
from pipedni.runtime import Runtime
from pipedni.sim import pipeline_streams
from pipedni.sim.beside import costs_from, read_trace, replay_run, trusted_run
from helpers import run_distributed

ACTION = re.compile(r"^(RECV_F|F|SG|RECV_B|B|STEP)\d*( \(step \d+\))?$")
STEPS, RECORDED = 8, 5  # steps 1-5 recorded: past every stage's first delayed backward


def _train(rank, world_size, run_dir, overrides):
    cfg = load_config(None, [f"--run.dir={run_dir}", "--data.name=synthetic", "--data.synthetic_size=1024",
                             "--data.batch_size=64", "--model.width=32", "--model.depth=3", f"--train.steps={STEPS}",
                             "--train.eval_every=0", "--run.log_every=1000", "--checkpoint.enabled=false",
                             f"--run.timeline_steps={RECORDED}", "--dni.kind=linear", *overrides])
    return Trainer(cfg, Runtime(rank, world_size, rank, world_size, torch.device("cpu"), "gloo")).fit()


def _measured(events, step: int, keep_recv_b: bool) -> list[str]:
    """The actions a stage ran during ``step``; an update's norm and step are one STEP."""
    names = [e.name for e in events if e.step == step and ACTION.match(e.name)]
    names = [n for i, n in enumerate(names) if not (n.startswith("STEP") and i and names[i - 1] == n)]
    return [n for n in names if keep_recv_b or not n.startswith("RECV_B")]


@pytest.mark.parametrize("schedule,boundaries,trusted,recompute", [
    ("mixed", ["dni", "async"], True, False),  # a trusted dni stage upstream of an async one, then the last stage
    ("dni", ["dni", "dni"], False, False),  # every dni stage in the untrusted fallback (dni.min_cosine 1)
    ("mixed", ["async", "locked"], True, True),  # features replay: the delayed forward runs again
])
def test_the_engine_runs_the_simulators_decoupled_stream(tmp_path, schedule, boundaries, trusted, recompute):
    m = 2
    overrides = [f"--train.schedule={schedule}", f"--train.microbatches={m}", f"--dni.microbatches={m}",
                 f"--dni.min_cosine={0.0 if trusted else 1.0}", f"--delayed.weight_stashing={str(not recompute).lower()}"]
    if schedule == "mixed":
        overrides.append(f"--train.boundaries=[{','.join(boundaries)}]")
    run_distributed(_train, 3, str(tmp_path), overrides, timeout=120)
    measured = read_trace(tmp_path)
    assert len(measured) == 3 and trusted_run(tmp_path / "metrics") == trusted
    streams = pipeline_streams(schedule, 3, m, STEPS, boundaries, delay=1, max_staleness=2, trusted=trusted,
                               recompute=recompute)
    for i, (events, stream) in enumerate(zip(measured, streams)):
        keep_recv_b = not (trusted and i < len(boundaries) and boundaries[i] == "dni")
        for t in range(1, 1 + RECORDED):
            expected = [a.name(t) for a in stream[t] if not a.kind.startswith("SEND")]
            expected = [n for n in expected if keep_recv_b or not n.startswith("RECV_B")]
            assert _measured(events, t, keep_recv_b) == expected, (i, t)
    # the delayed backwards really are in the compared steps: stage 1 (async, or dni in its
    # fallback) and stage 0 in the replay case backpropagate step t-1
    delayed = _measured(measured[0 if recompute else 1], 3, True)
    assert "B0 (step 2)" in delayed and ("F0 (step 2)" in delayed) == recompute

    # beside replays the run with its own trust: the same actions again
    costs = costs_from(measured, [1.0, 1.0, 0.0])
    simulated, first, count = replay_run(load_config(Path(tmp_path) / "config.yaml", []), measured, costs, trusted)
    for i, (events, sim) in enumerate(zip(measured, simulated.window(first, count))):
        keep_recv_b = not (trusted and i < len(boundaries) and boundaries[i] == "dni")
        simulated_names = [e.name for e in sim if ACTION.match(e.name) and (keep_recv_b or not e.name.startswith("RECV_B"))]
        assert simulated_names == [n for t in range(first, first + count) for n in _measured(events, t, keep_recv_b)]
