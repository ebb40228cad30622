"""The benchmark: every schedule on the same stages, data, batch and loss, as real torchrun jobs.

``python -m pipedni.bench CONFIG --stages N --modes LIST --out DIR`` (see docs/benchmarks.md).
plan.py turns modes into jobs, profile.py times each stage alone (the ideal pipeline limit),
runner.py launches jobs and reads their outputs, report.py writes tables, files, plots and docs.
"""
