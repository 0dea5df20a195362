"""Audio -> music vectors: the encoder interface both backends implement, and the clip-level math on top.

A backend (:class:`~mullama_sdk.encoder_ort.OnnxMusicEncoder`,
:class:`~mullama_sdk.encoder_trt.TensorRTMusicEncoder`) only runs graphs: MERT on one window, the adapter
on one set of state means. What a *clip* is made of lives here, once for both: the clip is cut into
encoder windows, each window's per-state time-means are combined weighted by its frame count (so a
clip split in two windows averages like one long pass would), the adapter turns the mean into the
vectors the LLM is conditioned on, and non-finite vectors are diagnosed (bad audio or bad weights).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol, runtime_checkable

import numpy as np

from mullama_sdk.audio import iter_windows
from mullama_sdk.errors import AudioError, BundleError
from mullama_sdk.results import MusicVectors

#: Above this sample magnitude a non-finite encoder output is blamed on the audio, below on the weights.
SANE_PEAK = 1e3


@runtime_checkable
class MusicEncoder(Protocol):
    """The encoder + adapter of a bundle, on some backend. Implementations must be thread-safe.

    Graph interfaces (fixed by the export, see :mod:`mullama_sdk.manifest`): the encoder maps a
    waveform ``(1, n)`` to ``state_means (n_states, mert_dim)`` and ``n_frames``; the adapter maps
    state means to ``injection (n_inject, n_embd)`` and ``music_query (n_embd,)``.
    """

    def window_means(self, window: np.ndarray) -> tuple[np.ndarray, int]:
        """Per-state time-means ``(n_states, mert_dim)`` float64 of one window (mono f32 at 24 kHz) and
        its frame count."""
        ...

    def adapt(self, state_means: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(injection (n_inject, n_embd), music_query (n_embd,))`` float32 for frame-weighted means."""
        ...

    def close(self) -> None:
        """Free the backend's sessions or engines (idempotent); later calls raise."""
        ...


def frame_weighted_mean(per_window: list[tuple[np.ndarray, int]]) -> tuple[np.ndarray, int]:
    """The clip's state means from its windows' ``(means, n_frames)``: each window counts by its frames.

    Returns the means and the clip's total frame count.
    """
    total_frames = sum(n for _, n in per_window)
    return sum(m * n for m, n in per_window) / total_frames, total_frames


def check_finite_vectors(injection: np.ndarray, music_query: np.ndarray, peak: float) -> None:
    """Say whose fault non-finite music vectors are: the audio's (samples far outside [-1, 1]) or the
    bundle's (damaged encoder or adapter weights).

    Raises:
        AudioError: NaN/Inf from audio whose samples reach above :data:`SANE_PEAK`.
        BundleError: NaN/Inf from ordinary audio.
    """
    if np.isfinite(injection).all() and np.isfinite(music_query).all():
        return
    if peak > SANE_PEAK:
        raise AudioError(f"the encoder overflowed on audio with sample values up to {peak:.3g}; "
                         "audio samples are expected in [-1, 1]")
    raise BundleError("the encoder produced non-finite music vectors (NaN/Inf) from ordinary audio: the "
                      "bundle's encoder or adapter weights are damaged (load it with "
                      "verify_checksums=True, or re-export it)")


def encode_clip(encoder: MusicEncoder, audio: Any, sample_rate: int | None, *, rate_hz: int,
                max_window_seconds: float, min_window_samples: int, keep_windows: bool = False,
                cancelled: Callable[[], bool] | None = None) -> MusicVectors | None:
    """Run ``encoder`` over one clip (window by window, frame-weighted mean) and its adapter.

    Args:
        audio, sample_rate: As :func:`mullama_sdk.audio.iter_windows` takes them.
        rate_hz: The bundle's sample rate (window bounds are reported in seconds).
        keep_windows: Keep every window's means (for :func:`window_vectors`).
        cancelled: Checked before each window; ``None`` is returned once it says True.
    """
    t0 = time.perf_counter()
    bounds, per_window, peak = [], [], 0.0
    # Windows arrive one by one (long files are streamed), so memory does not grow with duration.
    for start, stop, window in iter_windows(audio, sample_rate, max_window_seconds=max_window_seconds,
                                            min_window_samples=min_window_samples):
        if cancelled is not None and cancelled():
            return None
        bounds.append((start, stop))
        peak = max(peak, float(np.abs(window).max()))
        per_window.append(encoder.window_means(window))
    t1 = time.perf_counter()
    means, total_frames = frame_weighted_mean(per_window)
    injection, query = encoder.adapt(means)
    check_finite_vectors(injection, query, peak)
    t2 = time.perf_counter()
    n_samples = bounds[-1][1]
    return MusicVectors(
        injection=injection, music_query=query, duration_s=n_samples / rate_hz, n_frames=total_frames,
        encode_ms=1000 * (t1 - t0), adapter_ms=1000 * (t2 - t1),
        window_bounds_s=tuple((a / rate_hz, b / rate_hz) for a, b in bounds),
        window_means=tuple(per_window) if keep_windows else (),
    )


def window_vectors(encoder: MusicEncoder, clip: MusicVectors) -> Iterator[tuple[float, float, MusicVectors]]:
    """``(start_s, end_s, vectors)`` of every window of ``clip`` on its own: the adapter re-run on that
    window's means alone (``clip`` must come from ``encode_clip(..., keep_windows=True)``). Lazy: each
    window is adapted only when asked for."""
    for (start, end), (means, frames) in zip(clip.window_bounds_s, clip.window_means, strict=True):
        t0 = time.perf_counter()
        injection, query = encoder.adapt(means)
        yield start, end, MusicVectors(injection, query, end - start, frames, 0.0, 1000 * (time.perf_counter() - t0))
