"""What the Captioner hands back: frozen values, no behaviour.

:class:`MusicVectors` is what the encoder made of a clip (reusable for several questions),
:class:`Caption` a generated answer with its :class:`Timings` and, for long clips, one
:class:`Segment` per encoder window. They live apart from the code that computes them so that an
application can import and type against them without loading ONNX Runtime or llama.cpp.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Timings:
    """Where the time went, in milliseconds (``tokens_per_s`` counts generated tokens while decoding)."""

    audio_s: float = 0.0
    encode_ms: float = 0.0
    adapter_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    n_prompt_tokens: int = 0
    n_tokens: int = 0

    @property
    def tokens_per_s(self) -> float:
        return 1000.0 * self.n_tokens / self.decode_ms if self.decode_ms > 0 else 0.0

    def to_dict(self) -> dict[str, float]:
        d = {k: round(v, 3) if isinstance(v, float) else v for k, v in self.__dict__.items()}
        d["tokens_per_s"] = round(self.tokens_per_s, 2)
        return d


@dataclass(frozen=True)
class Segment:
    """The caption of one window of a long clip."""

    start_s: float
    end_s: float
    text: str
    tokens: tuple[int, ...]


@dataclass(frozen=True)
class Caption:
    """A generated answer. ``tokens`` excludes the EOS; ``stop_reason`` says why generation ended:
    ``"eos"``, ``"max_new_tokens"``, ``"cancelled"`` (``cancel()``) or ``"stopped"`` (stop callback)."""

    text: str
    tokens: tuple[int, ...]
    prompt_tokens: tuple[int, ...]
    timings: Timings
    stop_reason: str
    segments: tuple[Segment, ...] = ()


@dataclass(frozen=True, eq=False)
class MusicVectors:
    """What the encoder made of one clip: reuse it to ask several questions without re-encoding.

    ``injection`` holds ``d_l`` for every injected layer, ``(n_inject, n_embd)`` float32.
    """

    injection: np.ndarray
    music_query: np.ndarray
    duration_s: float
    n_frames: int
    encode_ms: float
    adapter_ms: float
    window_bounds_s: tuple[tuple[float, float], ...] = ()
    window_means: tuple[tuple[np.ndarray, int], ...] = field(default=(), repr=False)

    @property
    def key(self) -> str:
        """A digest of what the LLM sees of this clip (the injection vectors, their shape and dtype).

        The KV cache of a prompt is reused only for vectors with the same key, so reuse can never cross
        clips: not between processes (a pickled encoding), not between Captioners, not after a counter
        restarts. Computed from the arrays on every call (about 0.1 ms for LLaMA-7B's 20 x 4096
        floats), never stored, so an unpickled or edited object cannot carry a stale key.
        """
        injection = np.ascontiguousarray(self.injection)
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{injection.dtype.str}{injection.shape}".encode())
        h.update(injection.data)
        return h.hexdigest()
