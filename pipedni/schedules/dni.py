"""The DNI schedule: every stage updates at once from a synthetic gradient (backward unlocking).

One step of stage i (see "The DNI step" in docs/design.md):

    x_t = batch t's inputs (first stage) or the activation of step t from stage i-1
    h_t = f_i(x_t);  send h_t to stage i+1 (non-blocking)
    backward: the loss (last stage) or the synthetic gradient sg_i(h_t, y_t) (others)
    send x_t.grad to stage i-1, tagged t: its regression target (bootstrapped unless from the last stage)
    optimizer step
    remember (t, h_t, y_t); fit sg_i on every gradient that has already arrived

Nothing waits for a gradient unless the oldest stored step is ``dni.max_staleness`` steps old:
then the stage blocks on it (back-pressure, bounded memory). Until its predictor agrees with
the true gradients (``dni.min_cosine``) a stage learns from them one step late instead, as
``async`` (decoupled.py, [Note: the untrusted fallback]).
Each non-last stage receives exactly one gradient per microbatch of every step, so ``finish``
knows what is owed. The first ``dni.warmup_steps`` steps run locked 1F1B whose plan fits the
predictor on each true gradient before its backward uses it (a ``FIT`` action).

[Note: DNI microbatches]
With ``dni.microbatches = M`` a stage runs the forward and the synthetic backward of each
microbatch before starting the next, and steps its optimizer once per batch: the same update
as one whole-batch pass (the predictor works per sample, the last stage weights each loss by
its share), but only one microbatch's activations are alive at a time. A locked pipeline
cannot do this: GPipe keeps all M microbatches for the backward pass that comes later, 1F1B up
to N - i of them. Each microbatch also travels on its own, so the next stage starts sooner.
"""

from __future__ import annotations

from typing import Optional

import torch

from pipedni.config import Config
from pipedni.errors import LaunchError
from pipedni.metrics.records import StepStats
from pipedni.schedules.decoupled import DNI_METRICS, BoundaryWorker, dni_copies
from pipedni.schedules.executor import LockedExecutor
from pipedni.schedules.modes import BoundaryMode, check_synthetic_inputs, every_boundary
from pipedni.schedules.spec import ScheduleSpec, Variant, WorkerContext
from pipedni.schedules.worker import Microbatch


class DNIWorker(BoundaryWorker):
    """``train.schedule: dni``: every boundary dni, in ``dni.microbatches`` pieces (the decoupled
    step is ``BoundaryWorker``'s); the warm-up runs the whole pipe as locked 1F1B."""

    def __init__(self, ctx: WorkerContext):
        super().__init__(ctx, ["dni"] * (ctx.stage.num_stages - 1), ctx.cfg.dni.microbatches)
        self.warmup = LockedExecutor(ctx, "1f1b", ctx.cfg.train.microbatches, whole_model_norm=False,
                                     fit=self._fit_true_gradient)
        self.warmup_steps = ctx.cfg.dni.warmup_steps  # every stage's, the last included (check_dni)

    def _fit_true_gradient(self, h: torch.Tensor, piece: Microbatch, grad: torch.Tensor) -> None:
        """Warm-up's FIT action: the exact gradient of ``h``, before the backward uses it."""
        self.gradients.fit(h, self.gradients.labels(piece.targets), grad, staleness=0)

    def train_step(self, step: int, inputs: Optional[torch.Tensor], targets: torch.Tensor) -> StepStats:
        if step >= self.warmup_steps:
            return super().train_step(step, inputs, targets)
        if self.gradients is not None:
            self.gradients.begin(step)
        stats = self.warmup.run(step, inputs, targets)
        self.tied.reset()  # the locked warm-up kept the copies equal
        if self.gradients is not None:
            self.gradients.write(stats)
        return stats


def check_dni(cfg: Config, num_stages: int) -> None:
    """The whole pipe warms up together under ``dni``: one warm-up length for every boundary; and
    synthetic inputs fit the layout."""
    check_synthetic_inputs(cfg, ["dni"] * (num_stages - 1))
    for i in range(num_stages - 1):
        steps = cfg.dni.for_boundary(i).warmup_steps
        if steps != cfg.dni.warmup_steps:
            raise LaunchError(f"dni.boundaries[{i}].warmup_steps = {steps} differs from dni.warmup_steps = "
                              f"{cfg.dni.warmup_steps}, but train.schedule: dni warms the whole pipe up together; "
                              "use train.schedule: mixed with train.boundaries for a warm-up per boundary")


def every_predictor(cfg: Config, num_stages: int) -> tuple[int, ...]:
    return tuple(range(num_stages - 1))


# The bench's and the simulator's modes: plain DNI, cDNI (predictors see the labels) and cDNI with
# synthetic inputs (forward unlocking), each at its defaults otherwise.
VARIANTS = (
    Variant("dni", ("--dni.condition_on_labels=false", "--dni.synthetic_inputs=false")),
    Variant("cdni", ("--dni.condition_on_labels=true", "--dni.synthetic_inputs=false")),
    Variant("unlock", ("--dni.condition_on_labels=true", "--dni.synthetic_inputs=true"), default=False,
            simulated=False),
)
SPEC = ScheduleSpec("dni", "DNI: every stage updates at once from a synthetic gradient (dni.* settings)",
                    build=DNIWorker, min_stages=2, locked=False, check=check_dni, metrics=DNI_METRICS,
                    predictor_boundaries=every_predictor, copies_weights=dni_copies,
                    wait_grad_header="backpressure s", microbatch_key="dni.microbatches",
                    boundary_modes=every_boundary(BoundaryMode.DNI), synthetic_gradients=True, variants=VARIANTS)
