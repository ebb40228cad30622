"""The benchmark command: planning, a real tiny end-to-end run, its files and its docs section."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipedni.bench.plan import BASELINE, DEFAULT_MODES, parse_boundaries, parse_counts, parse_modes, plan_jobs
from pipedni.bench.report import update_docs
from pipedni.bench.runner import command, set_target
from pipedni.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
TINY = ["--model.depth=2", "--model.width=32", "--data.name=synthetic", "--data.synthetic_size=2048",
        "--data.batch_size=32", "--data.eval_batch_size=256", "--dni.kind=linear", "--optim.name=adam",
        "--optim.lr=0.001"]


def bench(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "pipedni.bench", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_plan_sweeps_microbatches_and_leaves_out_what_torch_cannot_run():
    jobs = plan_jobs(["single", "naive", "gpipe", "torch_gpipe", "torch_1f1b", "cdni"], 4, [1, 3, 4], batch_size=12)
    labels = [job.label for job in jobs]
    assert labels[0] == BASELINE and labels[-1] == "cdni M=4" and "naive" in labels
    assert "gpipe M=3" in labels and "torch_gpipe M=3" in labels  # 12 divides into 3
    assert "torch_1f1b M=1" not in labels and "torch_1f1b M=3" not in labels  # M < 4 stages
    assert "torch_1f1b M=4" in labels
    cdni = jobs[-1]  # dni sweeps its own microbatches (dni.microbatches), conditioned on labels
    assert cdni.schedule == "dni" and {"--dni.condition_on_labels=true", "--dni.microbatches=4"} <= set(cdni.args())
    gpipe = jobs[labels.index("gpipe M=3")]
    assert "--train.microbatches=3" in gpipe.args() and gpipe.nproc == 4
    assert all(job.threads == 1 for job in jobs if job.mode != "single")


def test_a_replicated_plan_starts_stages_x_replicas_and_splits_each_replicas_share():
    """dist.data_parallel = 2: each job starts 2 copies of its pipeline; a replica's share of 12
    samples is 6, which 4 microbatches do not divide evenly for torch's schedules."""
    jobs = plan_jobs(["single", "gpipe", "torch_gpipe"], 2, [3, 4, 8], batch_size=12, replicas=2)
    labels = [job.label for job in jobs]
    assert "gpipe M=4" in labels and "gpipe M=8" not in labels  # 8 microbatches of a 6-sample share: none
    assert "torch_gpipe M=3" in labels and "torch_gpipe M=4" not in labels
    gpipe = jobs[labels.index("gpipe M=4")]
    assert command(gpipe, "c.yaml", Path("run"), [])[:4] == [sys.executable, "-m", "pipedni.launch",
                                                             "--nproc_per_node=4"]
    assert command(jobs[0], "c.yaml", Path("run"), [])[3] == "--nproc_per_node=2"  # the reference, replicated


def test_mixed_runs_its_boundaries_and_only_when_asked():
    boundaries = parse_boundaries("locked, dni,locked", ["1f1b", "mixed"], 4)
    jobs = plan_jobs(["mixed"], 4, [2], batch_size=12, boundaries=tuple(boundaries))
    assert [job.label for job in jobs] == ["mixed M=2"]
    assert {"--train.schedule=mixed", "--train.boundaries=[locked,dni,locked]", "--train.microbatches=2"} <= set(jobs[0].args())
    assert "mixed" not in DEFAULT_MODES  # nothing to mix without --boundaries
    with pytest.raises(ConfigError, match="needs 3 of locked, dni, async for --stages 4"):
        parse_boundaries("locked,dni", ["mixed"], 4)
    with pytest.raises(ConfigError, match="read only by the mixed mode"):
        parse_boundaries("dni", ["1f1b"], 2)


def test_plan_inputs_are_checked():
    with pytest.raises(ConfigError, match="unknown zb; choose from single"):
        parse_modes("1f1b,zb")
    with pytest.raises(ConfigError, match="--microbatches '0,2'"):
        parse_counts("0,2", "--microbatches")


@pytest.mark.slow
def test_a_bad_mode_or_config_value_is_one_line_and_exit_2():
    proc = bench("configs/bench_mlp_fashion.yaml", "--modes=fast", timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "--modes 'fast'" in proc.stderr
    proc = bench("configs/bench_mlp_fashion.yaml", "--train.nope=1", timeout=60)
    assert proc.returncode == 2 and "unknown key" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_missing_data_stops_the_benchmark_with_the_fix(tmp_path):
    proc = bench("configs/bench_mlp_fashion.yaml", "--data.name=mnist", f"--data.root={tmp_path}",
                 f"--out={tmp_path / 'out'}", timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "per-stage profile failed" in proc.stderr and "python -m pipedni.data fetch mnist" in proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)  # a whole bench (profile, 6 jobs, 8 budget runs), then the grid's report over it
def test_tiny_end_to_end_run_writes_every_figure(tmp_path, capsys):
    out = tmp_path / "out"
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nHand-written analysis stays.\n")
    proc = bench("configs/bench_mlp_fashion.yaml", "--stages=2", "--modes=single,1f1b,torch_1f1b,dni",
                 "--microbatches=2", "--repeats=2", "--steps=8", "--warmup=2", "--budget=2", "--budget-repeats=2",
                 f"--out={out}", f"--docs={docs}", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    rows = {row["label"]: row for row in results["throughput"]}
    assert BASELINE in rows and {"1f1b M=2", "torch_1f1b M=2", "dni M=2"} <= rows.keys()
    for row in rows.values():
        speed = row["samples_per_sec"]
        assert len(speed["values"]) == 2 and speed["min"] <= speed["median"] <= speed["max"]
        assert row["ratio_to_ideal"] > 0
        assert all(0 < stage["busy_fraction"] <= 1 and stage["peak_activation_bytes"] > 0 for stage in row["stages"])
    # torch's schedule sends what ours sends: M activations forward, M gradients back, per step
    ours, torch_ = rows["1f1b M=2"]["stages"], rows["torch_1f1b M=2"]["stages"]
    assert [s["bytes_sent_per_step"] for s in ours] == [s["bytes_sent_per_step"] for s in torch_]
    assert ours[0]["bytes_sent_per_step"] == 2 * 16 * 32 * 4  # 2 microbatches of 16 x 32 floats
    assert len(results["profile"]["stages"]) == 2 and results["profile"]["ideal_samples_per_sec"]["median"] > 0
    curves = {entry["label"]: entry for entry in results["accuracy"]}
    assert {BASELINE, "1f1b M=2", "torch_1f1b M=2", "dni M=2"} <= curves.keys()
    for entry in curves.values():
        assert len(entry["curves"]) == len(entry["time_to_target_runs"]) == 2  # interleaved runs, each its own
        for curve in entry["curves"]:
            seconds = [p["train_sec"] for p in curve]
            assert seconds == sorted(seconds) and seconds[-1] >= 2.0
    assert results["target_accuracy"] is not None
    assert (out / "throughput.csv").read_text().startswith("job,samples/s")
    assert (out / "accuracy.csv").read_text().count("\n") > 4
    text = docs.read_text()
    assert "Hand-written analysis stays." in text and "bench_mlp_fashion: 2 stages, batch 32" in text
    update_docs(docs, [results])  # regenerating replaces the section instead of adding one
    assert docs.read_text().count("<!-- bench:bench_mlp_fashion:begin -->") == 1

    # the link grid's report reads cells like this one (no new jobs: the cells reuse its results)
    grid = tmp_path / "grid"
    later = dict(results, machine=dict(results["machine"], commit="abc1234"))  # a cell added at a later commit
    for cell, cell_results in (("lat0_bw0", results), ("lat10_bw100", later)):
        (grid / cell).mkdir(parents=True)
        (grid / cell / "results.json").write_text(json.dumps(cell_results))
    from pipedni.bench import grid as link_grid  # in this process: two more interpreters cost 15 s

    assert link_grid.main(["configs/bench_mlp_fashion.yaml", "--report", "--latencies=0,10", "--bandwidths=0,100",
                           f"--out={grid}", f"--docs={docs}"]) == 0
    cells = json.loads((grid / "grid.json").read_text())["cells"]
    assert [(c["latency_ms"], c["bandwidth_mbps"]) for c in cells] == [(0, 0), (10, 100)]
    assert cells[0]["locked"]["label"] == max(["1f1b M=2", "torch_1f1b M=2"],
                                              key=lambda label: rows[label]["samples_per_sec"]["median"])
    assert cells[0]["decoupled"]["dni"]["label"] == "dni M=2"
    assert cells[0]["decoupled"]["dni"]["time_to_target_sec"] == curves["dni M=2"]["time_to_target_sec"]
    table = (grid / "grid.md").read_text()
    assert "| 10 ms | 100 Mbit/s |" in table and (grid / "grid.png").stat().st_size > 0
    assert "commit, date |" in table and f"| {results['machine']['commit']}, " in table and "| abc1234, " in table
    assert docs.read_text().count("<!-- grid:bench_mlp_fashion:begin -->") == 1
    assert link_grid.main(["configs/bench_mlp_fashion.yaml", "--report", "--latencies=10", "--bandwidths=100",
                           f"--out={grid}", f"--docs={docs}", "--name=slow"]) == 0  # a second grid beside the first
    text = docs.read_text()
    assert text.count("<!-- grid:bench_mlp_fashion:begin -->") == 1 and text.count("<!-- grid:slow:begin -->") == 1
    with pytest.raises(SystemExit) as exit_:
        link_grid.main(["configs/bench_mlp_fashion.yaml", "--latencies=-1", f"--out={grid}"])
    assert exit_.value.code == 2 and "must be >= 0" in capsys.readouterr().err


def test_time_to_target_is_the_median_over_runs():
    """A run that never gets there counts as the slowest; the default target is the lowest
    median final accuracy of a locked pipeline; a results.json from before repeats still reads."""
    def curve(*accuracies: float) -> list[dict]:
        return [{"train_sec": i + 1.0, "samples": 32 * (i + 1), "accuracy": a} for i, a in enumerate(accuracies)]

    results = {"accuracy": [
        {"label": "1f1b M=1", "mode": "1f1b", "curves": [curve(.5, .7, .8), curve(.4, .5, .6), curve(.5, .8, .9)]},
        {"label": "dni M=1", "mode": "dni", "curves": [curve(.8, .9, .9), curve(.1, .2, .3), curve(.1, .2, .3)]},
        {"label": "async", "mode": "async", "curve": curve(.3, .6, .85)},
    ]}
    set_target(results)
    assert results["target_accuracy"] == 0.8
    locked, dni, old = results["accuracy"]
    assert locked["time_to_target_runs"] == [3.0, None, 2.0] and locked["time_to_target_sec"] == 3.0
    assert dni["time_to_target_runs"] == [1.0, None, None] and dni["time_to_target_sec"] is None
    assert old["time_to_target_sec"] == 3.0


def test_a_grid_cell_compares_time_to_target_with_the_locked_job_that_got_there_first():
    """The locked job of most samples/s need not reach the target first (on the LM at 0 ms, 1F1B
    M=4 ran fastest but GPipe M=8 got there 13 s sooner): the time table takes the soonest."""
    from pipedni.bench.grid import markdown, summarize_cell

    def row(label: str, mode: str, rate: float) -> dict:
        return {"label": label, "mode": mode, "microbatches": 1, "samples_per_sec": {"median": rate, "min": rate, "max": rate}}

    results = {"throughput": [row("1f1b M=4", "1f1b", 380), row("gpipe M=8", "gpipe", 337), row("async", "async", 474)],
               "accuracy": [{"label": "1f1b M=4", "time_to_target_sec": 42.1},
                            {"label": "gpipe M=8", "time_to_target_sec": 29.3},
                            {"label": "async", "time_to_target_sec": 24.5}],
               "target_accuracy": 0.39, "machine": {"commit": "abc", "date": "d", "cpu": "cpu", "cores": 2, "torch": "t"}}
    cell = summarize_cell(results, 0, 1000)
    assert cell["locked"]["label"] == "1f1b M=4" and cell["locked_soonest"]["label"] == "gpipe M=8"
    grid = {"cells": [cell], "machine": results["machine"], "command": "c",
            "settings": {"repeats": 2, "steps": 20, "warmup": 4, "budget": 40, "budget_repeats": 2}}
    assert "| 0 ms | 1 Gbit/s | 0.39 | 29.3 s (gpipe M=8) | 24.5 s |" in markdown(grid)


@pytest.mark.slow
@pytest.mark.timeout(400)  # four bench runs (a profile and one job each), then the simulator over them
def test_an_interleaved_grid_runs_every_cell_in_each_round_and_merges_the_rounds(tmp_path, capsys):
    """--interleave: round r runs one repeat of every cell, in an order rotated by r; each cell's
    results.json is then its rounds' figures as one bench run's repeats, and the simulator
    reads the jobs' runs from the first round ([Note: interleaved cells])."""
    from pipedni.bench import grid as link_grid
    from pipedni.sim import validate

    with pytest.raises(SystemExit) as exit_:  # time to accuracy is not interleaved: say so before any job
        link_grid.main(["configs/bench_mlp_fashion.yaml", "--interleave", f"--out={tmp_path}"])
    assert exit_.value.code == 2 and "add --budget 0" in capsys.readouterr().err

    out = tmp_path / "grid"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "pipedni.bench.grid", "configs/bench_mlp_fashion.yaml", "--interleave",
                           "--latencies=0,5", "--bandwidths=0", f"--out={out}", "--modes=1f1b", "--microbatches=2",
                           "--repeats=2", "--steps=6", "--warmup=2", "--budget=0", "--optim.grad_clip=1.0", *TINY],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=380)
    assert proc.returncode == 0, proc.stderr[-3000:]
    order = [line.split(" -> ")[1] for line in proc.stdout.splitlines() if line.startswith("== cell")]
    assert order == [str(out / "lat0_bw0" / "round0"), str(out / "lat5_bw0" / "round0"),
                     str(out / "lat5_bw0" / "round1"), str(out / "lat0_bw0" / "round1")]
    for cell in ("lat0_bw0", "lat5_bw0"):
        merged = json.loads((out / cell / "results.json").read_text())
        rounds = [json.loads((out / cell / f"round{r}" / "results.json").read_text()) for r in (0, 1)]
        assert merged["settings"]["repeats"] == 2 and len(merged["throughput"]) == 1
        speed = merged["throughput"][0]["samples_per_sec"]
        assert speed["values"] == [r["throughput"][0]["samples_per_sec"]["median"] for r in rounds]
        assert merged["profile"]["ideal_samples_per_sec"]["values"] == [
            r["profile"]["ideal_samples_per_sec"]["median"] for r in rounds]
    assert "round of its own" in (out / "grid.md").read_text()
    # the simulator finds the jobs' runs in the first round: the clipping all-reduce comes from their config
    assert validate.clips(out / "lat5_bw0", "1f1b M=2")
    assert validate.main([str(out / "lat5_bw0"), f"--calibrate={out / 'lat0_bw0'}"]) == 0
    assert "| 5 ms | unlimited | 1f1b M=2 |" in capsys.readouterr().out
