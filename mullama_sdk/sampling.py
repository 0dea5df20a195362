"""Next-token selection exactly as docs/model.md section 4 defines it, in numpy.

The torch reference and the llama.cpp runtime both pick tokens through :class:`Sampler`, so given
the same logits and seed they choose the same tokens: sampling is never a source of disagreement
between the stages we compare.
"""

from __future__ import annotations

import numpy as np


def check_sampling(temperature: float, top_p: float, error: type[ValueError] = ValueError) -> None:
    """Raise ``error`` naming the valid range unless ``temperature`` >= 0 and ``top_p`` in (0, 1].

    Shared by :class:`Sampler` and :class:`mullama_sdk.options.GenerationOptions`, which passes the
    SDK's typed :class:`~mullama_sdk.errors.OptionError`.
    """
    if not np.isfinite(temperature) or temperature < 0:
        raise error(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if not np.isfinite(top_p) or not 0.0 < top_p <= 1.0:
        raise error(f"top_p must be in (0, 1], got {top_p!r}")


class Sampler:
    """Greedy, temperature and top-p (nucleus) sampling with its own seeded random stream.

    Args:
        temperature: 0 means greedy (argmax, first index on ties); otherwise logits are divided
            by it before the softmax.
        top_p: Keep the smallest prefix of the probabilities sorted in descending order whose
            cumulative mass *before* each kept token is <= ``top_p``; renormalise. 1.0 keeps all.
        seed: Seed of the random stream; ``None`` draws one from the OS.

    Raises:
        ValueError: temperature < 0, or top_p outside (0, 1].
    """

    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> None:
        check_sampling(temperature, top_p)
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self._rng = np.random.Generator(np.random.PCG64(seed))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """The distribution :meth:`pick` draws from (float64, sums to 1); for tests and debugging."""
        z = np.asarray(logits, dtype=np.float64).reshape(-1)
        if self.greedy:
            return np.eye(len(z))[int(np.argmax(z))]
        # Subtract the max before dividing: a tiny temperature then sends the rest to -inf, not NaN.
        p = np.exp((z - z.max()) / self.temperature)
        p /= p.sum()
        order = np.argsort(-p, kind="stable")
        sorted_p = p[order]
        mass_before = np.cumsum(sorted_p) - sorted_p
        sorted_p[mass_before > self.top_p] = 0.0
        out = np.zeros_like(p)
        out[order] = sorted_p / sorted_p.sum()
        return out

    def pick(self, logits: np.ndarray) -> int:
        """Return the next token id for one row of logits (shape ``(n_vocab,)``)."""
        logits = np.asarray(logits).reshape(-1)
        if self.greedy:
            return int(np.argmax(logits))
        p = self.probabilities(logits)
        u = self._rng.random()
        idx = int(np.searchsorted(np.cumsum(p), u, side="right"))
        # u < 1 and the cumsum ends at ~1, but rounding may leave it a hair below u.
        return min(idx, int(np.flatnonzero(p)[-1]))
