"""A measured timeline: what each stage did when during a few training steps, written as a
Chrome/Perfetto trace (``timeline.json``) and a picture (``timeline.png``).

With ``run.timeline_steps = N`` every stage records, for the N training steps after its first
(which pays one-off costs), each call its step timer makes (forward, backward, predictor,
optimizer, the waits for an activation or a gradient) and each send, with its start and end.
Recording is a flag test per call when off. Times are wall-clock (``time.time``, anchored to
``perf_counter`` for resolution), so the stages of one machine line up exactly and those of
several machines as well as their clocks agree. The last stage gathers every stage's events
at the end and writes both files; open ``timeline.json`` in https://ui.perfetto.dev or
chrome://tracing.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

# What a timed call is, by the name of the function the step timer ran.
CATEGORY = {
    "forward": "forward", "run": "forward", "input_forward": "forward",
    "backward": "backward", "input_grad": "backward",
    "step": "optimizer", "grad_norm": "optimizer",
    "predict": "predictor", "fit": "predictor", "fit_ready": "predictor",
    "stash": "weights",
}
WAITS = {"wait_input": "wait for activation", "wait_grad": "wait for gradient"}
COLORS = {"forward": "#4c72b0", "backward": "#dd8452", "optimizer": "#55a868", "predictor": "#c44e52",
          "weights": "#8172b3", "send": "#937860", "wait for activation": "#dddddd",
          "wait for gradient": "#bbbbbb", "other": "#64b5cd"}


@dataclass(frozen=True)
class Event:
    name: str  # what ran: the function, or the locked action ("F3", "B3")
    category: str  # a key of COLORS
    start: float  # wall-clock seconds
    duration: float
    step: int


def category_of(bucket: str, fn: Callable) -> str:
    if bucket in WAITS:
        return WAITS[bucket]
    return CATEGORY.get(getattr(fn, "__name__", ""), "other")


class Timeline:
    """This stage's events during ``num_steps`` training steps after its first."""

    def __init__(self, stage_index: int, num_steps: int):
        self.stage_index, self.num_steps = stage_index, num_steps
        self.events: list[Event] = []
        self.recording = False
        self.step = -1
        self.first: Optional[int] = None
        self.wall_at_zero = time.time() - time.perf_counter()

    def begin_step(self, step: int) -> None:
        if self.first is None:
            self.first = step + 1
        self.step = step
        self.recording = self.first <= step < self.first + self.num_steps

    def end_step(self) -> None:
        self.recording = False

    def record(self, name: str, category: str, start: float, end: float) -> None:
        """A call that ran from ``start`` to ``end`` (``perf_counter`` seconds), if recording."""
        if self.recording:
            self.events.append(Event(name, category, self.wall_at_zero + start, end - start, self.step))


class NullTimeline:
    """No timeline (``run.timeline_steps = 0``): nothing is recorded."""

    events: list[Event] = []
    recording = False

    def begin_step(self, step: int) -> None:
        pass

    def end_step(self) -> None:
        pass

    def record(self, name: str, category: str, start: float, end: float) -> None:
        pass


def make_timeline(stage_index: int, num_steps: int) -> Timeline | NullTimeline:
    return Timeline(stage_index, num_steps) if num_steps > 0 else NullTimeline()


def chrome_trace(per_stage: list[list[Event]]) -> dict:
    """The Trace Event Format: one thread row per stage, times in microseconds from the first event."""
    origin = min((e.start for events in per_stage for e in events), default=0.0)
    trace = [{"ph": "M", "name": "thread_name", "pid": 0, "tid": i, "args": {"name": f"stage {i}"}}
             for i in range(len(per_stage))]
    for i, events in enumerate(per_stage):
        trace += [{"ph": "X", "name": e.name, "cat": e.category, "pid": 0, "tid": i,
                   "ts": round((e.start - origin) * 1e6, 1), "dur": round(e.duration * 1e6, 1),
                   "args": {"step": e.step}} for e in events]
    return {"traceEvents": trace, "displayTimeUnit": "ms"}


def _pyplot():
    """matplotlib's pyplot for files, or None (with a hint) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("pictures skipped: pip install 'pipedni[plot]' (matplotlib) to draw them; the JSON traces are written",
              file=sys.stderr)
        return None
    return plt


def _draw_on(ax, per_stage: list[list[Event]], title: str, seen: set) -> None:
    """A bar per call on one row per stage, times from the first call in ms."""
    origin = min((e.start for events in per_stage for e in events), default=0.0)
    for i, events in enumerate(per_stage):
        for e in events:
            ax.broken_barh([((e.start - origin) * 1e3, max(e.duration * 1e3, 0.05))], (i - 0.4, 0.8),
                           color=COLORS.get(e.category, COLORS["other"]), edgecolor="white", linewidth=0.4,
                           label=None if e.category in seen else e.category)
            seen.add(e.category)
    ax.set_yticks(range(len(per_stage)), [f"stage {i}" for i in range(len(per_stage))])
    ax.set_ylim(len(per_stage) - 0.5, -0.5)
    ax.set_title(title, fontsize=10)


def draw(per_stage: list[list[Event]], path: Path, title: str, beside: Optional[list[list[Event]]] = None,
         beside_title: str = "") -> bool:
    """The timeline as a picture; ``beside``: a second one under it on the same time scale (the
    simulator's for the same run). False without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return False
    panels = [(per_stage, title)] + ([(beside, beside_title)] if beside is not None else [])
    rows = sum(len(p) for p, _ in panels)
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 0.6 * rows + 1.6 * len(panels)), sharex=True,
                             squeeze=False)
    seen: set = set()
    for ax, (events, name) in zip(axes[:, 0], panels):
        _draw_on(ax, events, name, seen)
    axes[-1, 0].set_xlabel("ms")
    handles = {label: h for ax in axes[:, 0] for h, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(len(handles), 7), frameon=False)
    fig.tight_layout(rect=(0, 0.5 / fig.get_figheight(), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(per_stage: list[list[Event]], run_dir: Path, title: str) -> None:
    """timeline.json and timeline.png in ``run_dir`` (nothing when no stage recorded anything)."""
    if not any(per_stage):
        return
    tmp = run_dir / "timeline.json.tmp"
    tmp.write_text(json.dumps(chrome_trace(per_stage)))
    tmp.replace(run_dir / "timeline.json")
    draw(per_stage, run_dir / "timeline.png", title)
