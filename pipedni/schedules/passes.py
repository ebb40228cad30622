"""The passes through the whole pipe that every schedule shares: the start-up shape probe and
the forward-only evaluation. Each is a function of a stage and its transport, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from pipedni.crossing import PROBE_ROWS, Spec, StageShapes, Value, describe_spec, example, input_to, spec_of
from pipedni.errors import PartitionError
from pipedni.precision import fp32
from pipedni.stage import Stage, num_correct
from pipedni.transport import Kind


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    num_samples: int


def probe_shapes(stage: Stage, transport, sample_spec: Spec, num_classes: int) -> StageShapes:
    """Pass a probe of ``PROBE_ROWS`` samples down the pipe: every stage learns what it receives and sends, and
    one that cannot take its neighbour's output (or a last stage whose output is no class
    scores) raises PartitionError at start-up, naming both stages."""
    spec = sample_spec if stage.is_first else spec_of(transport.recv("prev", Kind.SHAPE, 0, 0))
    try:
        out = stage.probe(spec)
    except PartitionError:
        raise
    except Exception as err:  # the user's layers reject the input: name both stages
        source = "the data set" if stage.is_first else f"stage {stage.stage_index - 1}"
        raise PartitionError(
            f"stage {stage.stage_index} cannot take the output of {source}, {describe_spec(spec)}: "
            f"{type(err).__name__}: {str(err).splitlines()[0]}; move the cut (partition.balance)"
        ) from None
    if not stage.is_last:
        transport.send("next", Kind.SHAPE, 0, 0, example(out, PROBE_ROWS, stage.device))
    elif isinstance(out, tuple) or len(out.shape) < 2 or out.shape[-1] != num_classes:
        # [B, C] scores for one label per sample, [B, T, C] for one per position (see loss_fn)
        raise PartitionError(
            f"the last stage (stage {stage.stage_index}) outputs {describe_spec(out)} but the loss needs "
            f"[*, {num_classes}] class scores on the last dimension; end the model with a layer of "
            f"{num_classes} outputs"
        )
    return StageShapes(spec, out)


def evaluate(stage: Stage, transport, shapes: StageShapes, eval_id: int,
             batches: Iterable[tuple[Value, torch.Tensor]]) -> Optional[EvalResult]:
    """Forward-only pass over ``batches`` through the whole pipe; the last stage returns the result.

    Every stage must pass the same batches (each uses the half it needs); the first stage's
    sends run ahead of the consumers, so the pass pipelines on its own.
    """
    stage.module.eval()
    loss_sum, correct, count = 0.0, 0, 0
    try:
        for b, (inputs, targets) in enumerate(batches):
            x = input_to(inputs, stage.device) if stage.is_first else transport.recv("prev", Kind.EVAL, eval_id, b,
                                                                                    shapes.input)
            out = stage.evaluate(x)
            if not stage.is_last:
                transport.send("next", Kind.EVAL, eval_id, b, out)
                continue
            targets = targets.to(stage.device)
            loss_sum += float(stage.loss(fp32(out), targets)) * targets.numel()  # the mean over every label
            correct += num_correct(out, targets)
            count += targets.numel()
    finally:
        stage.module.train()
    transport.settle()
    if not stage.is_last or count == 0:
        return None
    return EvalResult(loss_sum / count, correct / count, count)
