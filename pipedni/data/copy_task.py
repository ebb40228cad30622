"""The Copy and Repeat Copy tasks (Graves et al. 2014, arXiv 1410.5401) as endless streams for
truncated BPTT: each batch row is one stream of episodes laid back to back, cut into windows.

One episode with N random ``bits``-bit patterns and R repeats (Copy: R = 1, no count channel):

    step           0 .. N-1     N                       N+1 .. N+R*N        N+R*N+1 (repeat only)
    input          pattern k    delimiter (+ R / 10)    zeros               zeros
    target         -            -                       pattern (k mod N)   end marker

Input channels: ``bits`` pattern bits, the delimiter flag, and (Repeat Copy) the repeat count
R / ``REPEAT_NORM``. Target channels: ``bits`` (+ the end marker for Repeat Copy), then one mask
channel that is 1 on the steps that are scored. The longest dependency spans N + 1 steps (Copy)
or N * R + 1 (Repeat Copy), so a window of T < N + 1 cannot see it with plain BPTT.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

REPEAT_NORM = 10.0  # the repeat-count channel carries R / REPEAT_NORM
EPISODES_PER_DRAW = 8  # a stream draws this many episodes at once (fewer, larger tensor ops)


class CopyStream:
    """Windows of ``batch`` parallel episode streams; ``length`` (N) and ``repeats`` (R) may be
    raised between windows (a curriculum): episodes begun before keep their own."""

    def __init__(self, batch: int, length: int = 1, *, repeats: Optional[int] = None, bits: int = 8, seed: int = 0):
        if length < 1 or (repeats is not None and repeats < 1) or bits < 1:
            raise ValueError(f"CopyStream needs length >= 1, repeats >= 1 and bits >= 1; got "
                             f"length={length}, repeats={repeats}, bits={bits}")
        self.batch, self.length, self.repeats, self.bits = batch, length, repeats, bits
        # one generator per row: a row's stream does not depend on the window size it is read in
        self.generators = [torch.Generator().manual_seed(seed * 100003 + row) for row in range(batch)]
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = [self._empty() for _ in range(batch)]

    @property
    def repeat(self) -> bool:
        return self.repeats is not None

    @property
    def input_size(self) -> int:
        return self.bits + 1 + int(self.repeat)

    @property
    def output_size(self) -> int:
        """Scored channels (the mask channel comes after them in the targets)."""
        return self.bits + int(self.repeat)

    def _empty(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(0, self.input_size), torch.zeros(0, self.output_size + 1)

    def episodes(self, count: int, row: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``count`` episodes of stream ``row`` back to back at the current N and R:
        (inputs [count * L, input_size], targets [count * L, output_size + 1])."""
        n, r = self.length, self.repeats or 1
        patterns = torch.randint(0, 2, (count, n, self.bits), generator=self.generators[row]).float()
        steps = n + 1 + n * r + int(self.repeat)
        inputs = torch.zeros(count, steps, self.input_size)
        targets = torch.zeros(count, steps, self.output_size + 1)
        inputs[:, :n, :self.bits] = patterns
        inputs[:, n, self.bits] = 1.0
        targets[:, n + 1:n + 1 + n * r, :self.bits] = patterns.repeat(1, r, 1)
        targets[:, n + 1:, -1] = 1.0  # scored: every output step (and the end marker)
        if self.repeat:
            inputs[:, n, self.bits + 1] = r / REPEAT_NORM
            targets[:, -1, self.bits] = 1.0  # end marker
        return inputs.reshape(count * steps, -1), targets.reshape(count * steps, -1)

    def window(self, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``steps`` steps of every stream: (inputs [B, steps, in], targets [B, steps, out + 1])."""
        xs, ys = [], []
        for row in range(self.batch):
            x, y = self.pending[row]
            while len(x) < steps:  # whole episodes, EPISODES_PER_DRAW at a time
                ex, ey = self.episodes(EPISODES_PER_DRAW, row)
                x, y = torch.cat([x, ex]), torch.cat([y, ey])
            xs.append(x[:steps])
            ys.append(y[:steps])
            self.pending[row] = (x[steps:], y[steps:])
        return torch.stack(xs), torch.stack(ys)


def bits_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy in bits summed over channels, averaged over the scored steps (0 when
    a window scores none). Targets' last channel is the mask."""
    mask = targets[..., -1]
    per_step = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, targets[..., :-1], reduction="none").sum(-1) / math.log(2)
    return (per_step * mask).sum() / mask.sum().clamp_min(1.0)
