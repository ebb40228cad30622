"""What a person sees: live progress on the loss-holding (last) stage, quiet elsewhere."""

from __future__ import annotations

import sys
from typing import Optional

from rich.console import Console as RichConsole
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pipedni.metrics.records import MetricSpec


class NullConsole:
    """Other ranks: every call does nothing."""

    def start(self, total_steps: int) -> None:
        pass

    def update(self, step: int, loss: Optional[float], samples_per_sec: float) -> None:
        pass

    def evaluated(self, step: int, accuracy: float, loss: float) -> None:
        pass

    def finish(self, summary: dict) -> None:
        pass


class Console(NullConsole):
    """A rich progress bar on a terminal; one plain line per ``log_every`` steps otherwise (CI logs)."""

    def __init__(self, log_every: int, metrics: tuple[MetricSpec, ...] = (), wait_grad_header: str = "wait grad s"):
        self.rich = RichConsole(stderr=False)
        self.live = self.rich.is_terminal
        if not self.live:  # logs and pipes: wide enough for the summary table on one line per stage
            self.rich = RichConsole(stderr=False, width=120)
        self.log_every = log_every
        self.metrics, self.wait_grad_header = metrics, wait_grad_header  # the schedule's own columns
        self.progress: Optional[Progress] = None
        self.accuracy = "-"

    def start(self, total_steps: int) -> None:
        self.total = total_steps
        if not self.live:
            return
        self.progress = Progress(
            TextColumn("step"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(), console=self.rich,
        )
        self.task = self.progress.add_task("train", total=total_steps, status="")
        self.progress.start()

    def update(self, step: int, loss: Optional[float], samples_per_sec: float) -> None:
        status = f"loss {loss:.4f}  test acc {self.accuracy}  {samples_per_sec:,.0f} samples/s"
        if self.progress is not None:
            self.progress.update(self.task, completed=step + 1, status=status)
        elif (step + 1) % self.log_every == 0 or step + 1 == self.total:
            print(f"step {step + 1}/{self.total}  {status}", flush=True)

    def evaluated(self, step: int, accuracy: float, loss: float) -> None:
        self.accuracy = f"{accuracy:.2%}"
        message = f"step {step}: test accuracy {accuracy:.2%}, test loss {loss:.4f}"
        if self.progress is not None:
            self.progress.console.print(message)
        else:
            print(message, flush=True)

    def finish(self, summary: dict) -> None:
        if self.progress is not None:
            self.progress.stop()
        table = Table(title=f"{summary['schedule']} on {summary['num_stages']} stage(s): "
                      f"{summary['samples_per_sec']:,.0f} samples/s, {summary['wall_time_sec']:.1f}s")
        columns = ["stage", "params", "busy", "wait in s", self.wait_grad_header, "send s", "peak MiB"]
        for column in columns + [spec.header for spec in self.metrics]:
            table.add_column(column, justify="right")
        for label, s in _rows(summary["stages"]):
            row = [label, f"{s['num_params']:,}", f"{s['busy_fraction']:.0%}",
                   f"{s['wait_input_sec']:.2f}", f"{s['wait_grad_sec']:.2f}", f"{s['send_wait_sec']:.2f}",
                   f"{s['peak_memory_bytes'] / 2**20:,.0f}"]
            table.add_row(*row, *[_fmt(s.get(spec.summary_key), spec.fmt) for spec in self.metrics])
        self.rich.print(table)
        if summary["test_accuracy"] is not None:
            self.rich.print(f"test accuracy {summary['test_accuracy']:.2%}, test loss {summary['test_loss']:.4f}")
        sys.stdout.flush()


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def make_console(is_logging_rank: bool, log_every: int, metrics: tuple[MetricSpec, ...] = (),
                 wait_grad_header: str = "wait grad s") -> NullConsole:
    """The console of the logging rank, with the schedule's own columns; a null object elsewhere."""
    return Console(log_every, metrics, wait_grad_header) if is_logging_rank else NullConsole()


def _rows(stages: list[dict]) -> list[tuple[str, dict]]:
    """One row per stage, or per replica of each stage (``0 r1``: stage 0's replica 1)."""
    return [(f"{s['stage_index']}" + (f" r{r}" if "replicas" in s else ""), each)
            for s in stages for r, each in enumerate(s.get("replicas", [s]))]
