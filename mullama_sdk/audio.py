"""Audio input as the encoder takes it: one 24 kHz mono clip (:func:`load_audio`), cut into windows.

:func:`load_audio` composes the steps of :mod:`mullama_sdk.audio_decode` (decode, convert to float,
resample to 24 kHz, then downmix to mono; docs/model.md section 1). :func:`window_bounds` plans the encoder
windows of a clip and :func:`iter_windows` yields them, streaming long files block by block so that
memory does not grow with duration. Only numpy, soundfile and soxr are used: this module must never
import torch.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from typing import BinaryIO

import numpy as np
import soundfile
import soxr

from .audio_decode import (
    DECODE_BLOCK_FRAMES,
    MAX_CHANNELS,
    MAX_SAMPLE_RATE_HZ,
    MIN_SAMPLE_RATE_HZ,
    RESAMPLE_QUALITY,
    STREAM_ABOVE_SECONDS,
    check_finite,
    check_range,
    check_sample_rate,
    decode,
    describe_source,
    downmix,
    resample,
    to_float32,
)
from .constants import MAX_WINDOW_SECONDS, MIN_WINDOW_SAMPLES, SAMPLE_RATE_HZ
from .errors import AudioError

__all__ = [
    "DECODE_BLOCK_FRAMES",
    "AudioSource",
    "MAX_CHANNELS",
    "MAX_SAMPLE_RATE_HZ",
    "MIN_SAMPLE_RATE_HZ",
    "STREAM_ABOVE_SECONDS",
    "STREAM_BLOCK_SECONDS",
    "check_sample_rate",
    "decode",
    "downmix",
    "iter_windows",
    "load_audio",
    "resample",
    "seconds",
    "to_float32",
    "too_short_message",
    "window_bounds",
]

#: What :func:`load_audio` accepts: a path, the bytes of a file, a binary file object, or samples.
AudioSource = str | os.PathLike[str] | bytes | bytearray | memoryview | BinaryIO | np.ndarray

#: Input read per block while streaming (files longer than :data:`STREAM_ABOVE_SECONDS`).
STREAM_BLOCK_SECONDS = 10.0


def seconds(n_samples: int) -> float:
    """Duration in seconds of ``n_samples`` samples at :data:`SAMPLE_RATE_HZ`."""
    return n_samples / SAMPLE_RATE_HZ


def too_short_message(n_samples: int, min_samples: int, name: str = "audio") -> str:
    """The one-line reason a clip of ``n_samples`` (at 24 kHz) is refused, in seconds and in samples."""
    return (f"{name} is {seconds(n_samples):.3f} s long ({n_samples} samples at {SAMPLE_RATE_HZ // 1000} kHz); "
            f"at least {min_samples} samples ({seconds(min_samples):.3f} s) are needed")


def load_audio(source: AudioSource, sample_rate: int | None = None) -> np.ndarray:
    """Load audio as the model expects it: float32 mono at :data:`SAMPLE_RATE_HZ`, 1-D.

    Args:
        source: One of
            - a path (``str`` or ``os.PathLike``) to anything libsndfile reads (WAV, FLAC, OGG,
              MP3, AIFF, ...);
            - ``bytes`` / ``bytearray`` / ``memoryview`` holding the contents of such a file;
            - a file object opened in binary mode;
            - a numpy array of samples, 1-D (mono) or 2-D ``(n_frames, n_channels)`` as soundfile
              returns them. Floats are used as they are; int8/int16/int32/uint8 are scaled to
              [-1, 1).
        sample_rate: The rate of ``source`` in Hz; required for arrays, and must be ``None`` for
            files, which carry their own rate.

    Returns:
        A C-contiguous float32 array of shape ``(n_samples,)`` at 24 kHz, not normalised.

    Raises:
        AudioError: the source cannot be decoded, is empty, holds NaN or Inf, has a bad shape,
            dtype or sample rate. The message names the source and what would be valid.
    """
    if isinstance(source, np.ndarray):
        name = describe_source(source)
        if sample_rate is None:
            raise AudioError(
                f"{name}: sample_rate is required with a numpy array, e.g. "
                f"load_audio(samples, sample_rate=44100)"
            )
        rate = check_sample_rate(sample_rate, name)
        frames = to_float32(source, name)
    else:
        name = describe_source(source)
        if sample_rate is not None:
            raise AudioError(
                f"{name}: sample_rate={sample_rate!r} was given with a file, but files carry their "
                f"own sample rate; pass sample_rate only with a numpy array of samples"
            )
        frames, rate = decode(source)
    check_finite(frames, name)
    with np.errstate(over="ignore", invalid="ignore"):  # reported by _check_range
        wave = downmix(resample(frames, rate, name=name))
    check_range(wave, frames, name)
    return wave


def window_bounds(
    n_samples: int,
    *,
    max_window_samples: int = round(MAX_WINDOW_SECONDS * SAMPLE_RATE_HZ),
    min_window_samples: int = MIN_WINDOW_SAMPLES,
) -> list[tuple[int, int]]:
    """Split ``[0, n_samples)`` into the fewest windows of at most ``max_window_samples``.

    The windows are contiguous, cover everything and differ in length by at most one sample, so a
    31 s clip becomes two 15.5 s windows rather than 30 s plus a 1 s tail.

    Args:
        n_samples: Length of the 24 kHz waveform.
        max_window_samples: Longest window the encoder takes.
        min_window_samples: Shortest audio accepted at all (default: one MERT frame, 400 samples).

    Returns:
        ``[(start, stop), ...]`` half-open sample ranges in order.

    Raises:
        AudioError: ``n_samples < min_window_samples``.
        ValueError: invalid window sizes.
    """
    if max_window_samples <= 0 or min_window_samples < 0 or min_window_samples > max_window_samples:
        raise ValueError(
            f"need 0 <= min_window_samples <= max_window_samples and max_window_samples > 0, got "
            f"min_window_samples={min_window_samples}, max_window_samples={max_window_samples}"
        )
    if n_samples < 0:
        raise ValueError(f"n_samples must be >= 0, got {n_samples}")
    if n_samples < min_window_samples or n_samples == 0:
        raise AudioError(too_short_message(n_samples, max(min_window_samples, 1)))
    count = -(-n_samples // max_window_samples)
    base, extra = divmod(n_samples, count)
    bounds = []
    start = 0
    for i in range(count):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def iter_windows(
    source: AudioSource,
    sample_rate: int | None = None,
    *,
    max_window_seconds: float = MAX_WINDOW_SECONDS,
    min_window_samples: int = MIN_WINDOW_SAMPLES,
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield ``(start, stop, window)`` encoder windows (24 kHz mono float32) of a clip, in order.

    Short sources are loaded whole (:func:`load_audio`) and split by :func:`window_bounds`. Files
    (paths, bytes or seekable file objects) longer than :data:`STREAM_ABOVE_SECONDS` are decoded,
    resampled (soxr's streaming resampler) and down-mixed block by block, so memory stays at about one
    window whatever the duration; the window plan is made from the announced length and the last
    window absorbs any few-sample difference (or what is left when the file is shorter than announced).

    ``min_window_samples`` is the shortest clip accepted, counted at 24 kHz after resampling (a bundle's
    own minimum, see :attr:`mullama_sdk.manifest.Manifest.min_window_samples`); shorter clips raise the
    one-line :func:`too_short_message` error, whatever the way in.

    Raises:
        AudioError: as :func:`load_audio`; also for NaN/Inf found while streaming.
    """
    max_n = round(max_window_seconds * SAMPLE_RATE_HZ)
    min_n = int(min_window_samples)
    info = _stream_info(source) if sample_rate is None else None
    if info is None:
        wave = load_audio(source, sample_rate)
        for start, stop in window_bounds(len(wave), max_window_samples=max_n, min_window_samples=min_n):
            yield start, stop, wave[start:stop]
        return
    file, rate, n_frames, channels = info
    expected = int(round(n_frames * SAMPLE_RATE_HZ / rate))
    # window_bounds' plan, computed per window: a corrupt header may announce years of audio.
    n_windows = max(1, -(-expected // max_n))
    base, extra = divmod(expected, n_windows)
    name = describe_source(source)
    stream = None if rate == SAMPLE_RATE_HZ else soxr.ResampleStream(
        rate, SAMPLE_RATE_HZ, channels, dtype="float32", quality=RESAMPLE_QUALITY)
    pending: list[np.ndarray] = []
    n_pending = 0
    emitted = 0
    index = 0
    n_read = 0
    try:
        with soundfile.SoundFile(file) as f:
            block = max(1, int(STREAM_BLOCK_SECONDS * rate))
            while True:
                frames = f.read(block, dtype="float32", always_2d=True)
                last = frames.shape[0] < block
                check_finite(frames, name, offset=n_read)
                n_read += frames.shape[0]
                if stream is not None:
                    frames = stream.resample_chunk(frames, last=last)
                if frames.shape[0]:
                    with np.errstate(over="ignore", invalid="ignore"):
                        pending.append(downmix(frames))
                    check_range(pending[-1], frames, name)
                    n_pending += frames.shape[0]
                # Emit every planned window that is complete; the final one waits for the end of file.
                while index < n_windows - 1 and n_pending >= (size := base + (index < extra)):
                    joined = np.concatenate(pending)
                    yield emitted, emitted + size, joined[:size]
                    pending, n_pending = [joined[size:]], n_pending - size
                    emitted += size
                    index += 1
                if last:
                    break
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise AudioError(f"{name} is truncated or damaged: decoding failed after {n_read} of the {n_frames} "
                         f"frames its header announces ({str(exc).rstrip('.')})") from exc
    tail = np.concatenate(pending) if pending else np.zeros(0, np.float32)
    if len(tail) < min_n and emitted == 0 and expected < min_n:  # too short, as its header says: as window_bounds
        raise AudioError(too_short_message(len(tail), max(min_n, 1)))
    if len(tail) < min_n:
        raise AudioError(f"{name}: the last window decoded to {seconds(len(tail)):.3f} s ({len(tail)} samples), "
                         f"less than {min_n} samples ({seconds(min_n):.3f} s) (the file is shorter than its "
                         f"header says)")
    yield emitted, emitted + len(tail), tail


def _stream_info(source: AudioSource) -> tuple[str | BinaryIO, int, int, int] | None:
    """(file, rate, frames, channels) when ``source`` is a file long enough to stream, else None.

    ``file`` is a path or a file object positioned where ``source`` was (bytes are wrapped).
    """
    if isinstance(source, (str, os.PathLike)):
        file: str | BinaryIO = os.fsdecode(os.fspath(source))
    elif isinstance(source, (bytes, bytearray, memoryview)):
        file = io.BytesIO(source)
    elif hasattr(source, "read") and not isinstance(source, io.TextIOBase):
        file = source
    else:
        return None
    try:
        start = None if isinstance(file, str) else file.tell()
        try:
            with soundfile.SoundFile(file) as f:
                rate, n_frames, channels = f.samplerate, f.frames, f.channels
        finally:
            if start is not None:
                file.seek(start)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError, OSError, AttributeError):
        return None  # load_audio gives the typed error (or reads an unseekable file object whole)
    if n_frames <= 0 or channels <= 0 or rate <= 0:
        return None
    if n_frames / rate <= STREAM_ABOVE_SECONDS:
        return None
    check_sample_rate(rate, describe_source(source))
    return file, rate, n_frames, channels
