"""What a run reports: step records and totals, the JSONL/summary writer, the console, GPU
telemetry and activation memory."""

from pipedni.metrics.records import MetricSpec, StageTotals, StepStats
from pipedni.metrics.writer import MetricsWriter, build_summary, peak_memory_bytes, write_json_atomic

__all__ = ["MetricSpec", "MetricsWriter", "StageTotals", "StepStats", "build_summary", "peak_memory_bytes",
           "write_json_atomic"]
