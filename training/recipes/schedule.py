"""The learning-rate schedule of both stages: linear warm-up, then half-cycle cosine (the published recipe)."""

from __future__ import annotations

import math


class WarmupCosine:
    """LR factor for optimizer step ``s`` (0-based): linear warm-up, then half-cycle cosine to ``min_ratio``.

    ``s < warmup``: ``(s + 1) / warmup`` (the first step already moves). Then
    ``min_ratio + (1 - min_ratio) * (1 + cos(pi * (s - warmup) / (total - warmup))) / 2``.
    """

    def __init__(self, warmup: int, total: int, min_ratio: float) -> None:
        self.warmup, self.total, self.min_ratio = int(warmup), int(total), float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
