"""Step records, per-stage totals and the console: a schedule's own metrics travel generically."""

from pipedni.metrics.console import Console
from pipedni.metrics.records import MetricSpec, StageTotals, StepStats

LAG = MetricSpec("lag", "mean_lag", "ema", "lag", ".1f")
QUEUE = MetricSpec("queue", "max_queue", "max", "queue", "d")


def test_a_step_record_flattens_the_schedules_metrics_and_drops_nones():
    stats = StepStats(7, loss=None, step_sec=0.5, grad_norm=None, extra={"lag": 2.0, "queue": 3})
    record = stats.record()
    assert record["step"] == 7 and record["lag"] == 2.0 and record["queue"] == 3
    assert "loss" not in record and "grad_norm" not in record and "extra" not in record
    assert list(record)[-2:] == ["lag", "queue"]  # after the common fields, as the JSONL has them


def test_totals_fold_each_metric_as_its_spec_says():
    """ema: a moving average with weight 0.05 per step; max: the largest; a step without the
    metric (e.g. the last stage) leaves it alone; a metric never reported is absent."""
    totals = StageTotals(0, metrics=(LAG, QUEUE, MetricSpec("never", "never", "max", "n", "d")))
    for lag, queue in [(4.0, 1), (None, 5), (2.0, 3)]:
        extra = {"queue": queue} if lag is None else {"lag": lag, "queue": queue}
        totals.add(StepStats(0, step_sec=1.0, compute_sec=0.25, extra=extra))
    summary = totals.summary()
    assert summary["mean_lag"] == 0.95 * 4.0 + 0.05 * 2.0
    assert summary["max_queue"] == 5
    assert "never" not in summary and "metrics" not in summary and "extra" not in summary
    assert summary["steps"] == 3 and summary["busy_fraction"] == 0.25


def test_the_console_shows_the_schedules_columns(capsys):
    console = Console(10, metrics=(LAG,), wait_grad_header="backpressure s")
    console.rich.width = 200
    stage = {"stage_index": 0, "num_params": 10, "busy_fraction": 0.5, "wait_input_sec": 0.0, "wait_grad_sec": 1.0,
             "send_wait_sec": 0.0, "peak_memory_bytes": 2**20, "mean_lag": 1.25}
    console.finish({"schedule": "toy", "num_stages": 1, "samples_per_sec": 10.0, "wall_time_sec": 1.0,
                    "stages": [stage, {**stage, "stage_index": 1, "mean_lag": None}], "test_accuracy": None})
    out = capsys.readouterr().out
    assert "backpressure s" in out and "lag" in out and "1.2" in out
