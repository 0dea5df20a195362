"""Audio decoding: any file or array -> float32 frames -> 24 kHz (resampled per channel) -> mono (docs/model.md section 1).

The order is the published model's: resample every channel to :data:`SAMPLE_RATE_HZ` first, then
average the channels. No amplitude normalisation is applied anywhere (MERT's feature extractor has
``do_normalize = false``): a quiet recording stays quiet.

Each step is its own small function (:func:`decode`, :func:`to_float32`, :func:`resample`,
:func:`downmix`) so that the block-wise streaming decoder of :mod:`mullama_sdk.audio` can reuse them
one block at a time; :func:`mullama_sdk.audio.load_audio` is the one-shot composition of them. Only
numpy, soundfile and soxr are used: this module must never import torch.
"""

from __future__ import annotations

import io
import math
import os
from typing import BinaryIO

import numpy as np
import soundfile
import soxr

from .constants import SAMPLE_RATE_HZ
from .errors import AudioError

__all__ = [
    "DECODE_BLOCK_FRAMES",
    "MAX_CHANNELS",
    "MAX_SAMPLE_RATE_HZ",
    "MIN_SAMPLE_RATE_HZ",
    "RESAMPLE_QUALITY",
    "STREAM_ABOVE_SECONDS",
    "check_finite",
    "check_range",
    "check_sample_rate",
    "decode",
    "describe_source",
    "downmix",
    "resample",
    "to_float32",
]

#: Sample rates accepted for input audio (8 kHz telephone audio up to 768 kHz studio formats).
MIN_SAMPLE_RATE_HZ = 1_000
MAX_SAMPLE_RATE_HZ = 768_000

#: A 2-D array with more columns than this is taken to be channels-first by mistake.
MAX_CHANNELS = 64

#: soxr's quality preset; "HQ" is soxr's and python-soxr's default (20-bit precision).
RESAMPLE_QUALITY = "HQ"

# Integer sample formats and the factor that maps them to [-1, 1): (kind, itemsize) -> (offset, scale).
# Powers of two, so float32(x) * scale is exact and equals soundfile's own int -> float conversion.
_INT_FORMATS: dict[tuple[str, int], tuple[int, float]] = {
    ("i", 1): (0, 2.0**-7),
    ("i", 2): (0, 2.0**-15),
    ("i", 4): (0, 2.0**-31),
    ("u", 1): (128, 2.0**-7),
}
_VALID_DTYPES = "float16, float32, float64, int8, int16, int32 or uint8"

#: Frames :func:`decode` reads per block (allocation never depends on what a file header claims).
DECODE_BLOCK_FRAMES = 1 << 18


#: Files longer than this are decoded block by block (memory bounded by one window, not by duration)
#: by :func:`mullama_sdk.audio.iter_windows`; :func:`decode` reads shorter ones whole.
STREAM_ABOVE_SECONDS = 120.0


def decode(
    source: str | os.PathLike[str] | bytes | bytearray | memoryview | BinaryIO,
) -> tuple[np.ndarray, int]:
    """Decode a whole file with libsndfile.

    Returns:
        ``(frames, sample_rate)``: float32 frames of shape ``(n_frames, n_channels)`` (at least one
        frame and one channel) and the file's rate in Hz.

    Raises:
        AudioError: missing file, text-mode file object, undecodable or empty content, bad rate.
    """
    name = describe_source(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if memoryview(source).nbytes == 0:
            raise AudioError(f"{name}: no data (0 bytes); expected the contents of an audio file")
        file: object = io.BytesIO(source)
    elif isinstance(source, (str, os.PathLike)):
        file = os.fspath(source)
        if not isinstance(file, str):  # os.PathLike[bytes]
            file = os.fsdecode(file)
        if not os.path.exists(file):
            raise AudioError(f"audio file {file!r} does not exist")
        if os.path.isdir(file):
            raise AudioError(f"{file!r} is a directory; expected an audio file")
        if os.path.getsize(file) == 0:
            raise AudioError(f"audio file {file!r} is empty (0 bytes)")
    elif isinstance(source, io.TextIOBase):
        raise AudioError(f"{name} is opened in text mode; open audio files in binary mode ('rb')")
    elif hasattr(source, "read"):
        file = source
    else:
        raise AudioError(
            f"cannot read audio from a {type(source).__name__}; expected a path, the bytes of a file, "
            f"a binary file object, or a numpy array with sample_rate"
        )
    n_read = announced = None
    try:
        with soundfile.SoundFile(file) as f:
            rate, announced, n_read = f.samplerate, f.frames, 0
            # Block by block: a corrupt header may announce far more frames than the file holds, and
            # soundfile allocates whatever is announced up front (32 GiB for a 30 kB FLAC seen by the fuzzer).
            blocks = []
            while True:
                block = f.read(DECODE_BLOCK_FRAMES, dtype="float32", always_2d=True)
                n_read += block.shape[0]
                if block.shape[0]:
                    blocks.append(block)
                if block.shape[0] < DECODE_BLOCK_FRAMES:
                    break
            frames = np.concatenate(blocks) if blocks else np.zeros((0, f.channels), np.float32)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        if n_read is not None:  # the header was read: the audio data after it is not decodable
            raise AudioError(
                f"{name} is truncated or damaged: decoding failed after {n_read} of the {announced} frames its "
                f"header announces ({str(exc).rstrip('.')})"
            ) from exc
        formats = ", ".join(sorted(soundfile.available_formats()))
        raise AudioError(
            f"cannot decode {name}: {str(exc).rstrip('.')}. libsndfile {soundfile.__libsndfile_version__} reads "
            f"these formats: {formats}"
        ) from exc
    except MemoryError as exc:
        raise AudioError(f"{name} is too large to decode in memory; captioning streams files longer than "
                         f"{STREAM_ABOVE_SECONDS:g} s block by block") from exc
    check_sample_rate(rate, name)
    if frames.shape[1] == 0:
        raise AudioError(f"{name} has 0 channels")
    if frames.shape[0] == 0:
        raise AudioError(f"{name} contains no audio (0 frames)")
    return frames, rate


def to_float32(samples: np.ndarray, name: str = "audio array") -> np.ndarray:
    """Validate an array of samples and return it as float32 frames ``(n_frames, n_channels)``.

    Floats keep their values; integers are scaled to [-1, 1): int16 / 2**15, int32 / 2**31,
    int8 / 2**7, uint8 (x - 128) / 2**7.

    Raises:
        AudioError: wrong rank, channels-first layout, no samples or channels, unsupported dtype.
    """
    x = np.asarray(samples)
    if x.ndim == 1:
        x = x[:, None]
    elif x.ndim != 2:
        raise AudioError(
            f"{name} is {x.ndim}-D; expected a 1-D array (mono) or a 2-D array (n_frames, n_channels)"
        )
    n_frames, n_channels = x.shape
    if n_channels == 0:
        raise AudioError(f"{name} has 0 channels; expected (n_frames, n_channels) with n_channels >= 1")
    if n_frames == 0:
        raise AudioError(f"{name} is empty (0 frames); expected at least one sample")
    if n_channels > MAX_CHANNELS:
        raise AudioError(
            f"{name} would have {n_channels} channels; arrays must be "
            f"(n_frames, n_channels) as soundfile returns them (at most {MAX_CHANNELS} channels). "
            f"If yours is (n_channels, n_frames), pass `samples.T`"
        )
    kind, size = x.dtype.kind, x.dtype.itemsize
    if kind == "f":
        with np.errstate(over="ignore"):
            out = np.ascontiguousarray(x, dtype=np.float32)
        if size > 4 and np.isinf(out).any() and np.isfinite(x).all():
            raise AudioError(f"{name} holds sample values up to {float(np.abs(x).max()):.3g}, beyond the float32 "
                             f"range; audio samples are expected in [-1, 1]")
        return out
    if (kind, size) in _INT_FORMATS:
        offset, scale = _INT_FORMATS[kind, size]
        out = x.astype(np.float32)  # exact for 8/16-bit; rounds int32 to float32 as soundfile does
        if offset:
            out -= offset
        out *= scale
        return np.ascontiguousarray(out)
    hint = ""
    if kind in "iu":
        hint = (
            " (the scale of a wider integer type is ambiguous: cast to the type the samples were recorded in)"
        )
    raise AudioError(f"{name} has unsupported dtype {x.dtype}; expected {_VALID_DTYPES}{hint}")


def check_sample_rate(sample_rate: object, name: str = "audio") -> int:
    """Return ``sample_rate`` as an int if it is a whole number of Hz in the supported range.

    Raises:
        AudioError: not a number, not whole, or outside
            [:data:`MIN_SAMPLE_RATE_HZ`, :data:`MAX_SAMPLE_RATE_HZ`].
    """
    valid = f"a whole number of Hz from {MIN_SAMPLE_RATE_HZ} to {MAX_SAMPLE_RATE_HZ}, e.g. 44100"
    if isinstance(sample_rate, (bool, np.bool_)) or not isinstance(
        sample_rate, (int, float, np.integer, np.floating)
    ):
        raise AudioError(f"{name}: sample rate {sample_rate!r} is not a number; expected {valid}")
    if not math.isfinite(sample_rate) or sample_rate != int(sample_rate):
        raise AudioError(f"{name}: sample rate {sample_rate!r} Hz is not a whole number; expected {valid}")
    rate = int(sample_rate)
    if not MIN_SAMPLE_RATE_HZ <= rate <= MAX_SAMPLE_RATE_HZ:
        raise AudioError(f"{name}: sample rate {rate} Hz is out of range; expected {valid}")
    return rate


def resample(frames: np.ndarray, sample_rate: int, *, name: str = "audio") -> np.ndarray:
    """Resample float32 frames ``(n_frames, n_channels)`` to :data:`SAMPLE_RATE_HZ`, channel by channel.

    Uses soxr's "HQ" preset. A no-op (no copy) when the rate is already 24 kHz.

    Raises:
        AudioError: the input is so short that nothing is left at 24 kHz.
    """
    if sample_rate == SAMPLE_RATE_HZ:
        return frames
    out = soxr.resample(
        np.ascontiguousarray(frames, dtype=np.float32), sample_rate, SAMPLE_RATE_HZ, quality=RESAMPLE_QUALITY
    )
    if out.shape[0] == 0:
        raise AudioError(
            f"{name}: {frames.shape[0]} frame(s) at {sample_rate} Hz leave no samples at {SAMPLE_RATE_HZ} Hz"
        )
    return out


def downmix(frames: np.ndarray) -> np.ndarray:
    """Average the channels of float32 frames ``(n_frames, n_channels)`` into a 1-D float32 array."""
    if frames.shape[1] == 1:
        return np.ascontiguousarray(frames[:, 0])
    return frames.mean(axis=1, dtype=np.float32)


def check_finite(frames: np.ndarray, name: str, *, offset: int = 0) -> None:
    finite = np.isfinite(frames)
    if not finite.all():
        frame = offset + int(np.argmin(finite.all(axis=1)))
        n_bad = int(finite.size - np.count_nonzero(finite))
        raise AudioError(
            f"{name} contains {n_bad} NaN or infinite sample value(s), the first at frame {frame}; "
            f"audio samples must be finite numbers"
        )


def check_range(wave: np.ndarray, frames: np.ndarray, name: str) -> None:
    """Finite samples so large (|x| ~ 1e38) that resampling or averaging overflowed float32."""
    if not np.isfinite(wave).all():
        raise AudioError(
            f"{name} holds sample values up to {float(np.abs(frames).max()):.3g}, too large to resample or "
            f"average in float32; audio samples are expected in [-1, 1]"
        )


def describe_source(source: object) -> str:
    """A short human name for a source, used in error messages."""
    if isinstance(source, np.ndarray):
        return f"audio array (shape {source.shape}, dtype {source.dtype})"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"audio data ({memoryview(source).nbytes} bytes in memory)"
    if isinstance(source, (str, os.PathLike)):
        return f"audio file {os.fsdecode(os.fspath(source))!r}"
    file_name = getattr(source, "name", None)
    if isinstance(file_name, (str, bytes, os.PathLike)):
        return f"audio file object {os.fsdecode(file_name)!r}"
    return f"audio file object ({type(source).__name__})"
