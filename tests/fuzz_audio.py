"""Fuzz target of the audio loader: whatever a user drops on an app gives a result or an AudioError.

The property (:func:`check_bytes`, :func:`check_array`): :func:`mullama_sdk.audio.load_audio` and
:func:`mullama_sdk.audio.iter_windows` either return valid audio (float32, 1-D, finite, not empty; windows
that tile the clip) or raise :class:`mullama_sdk.errors.AudioError`. Anything else - another exception,
a crash of libsndfile, a hang, a memory blow-up - is a finding.

Inputs: valid little files of many formats and codecs (:func:`seed_files`) mutated byte-wise (flips,
truncations, header fields overwritten with boundary values, inserted garbage), random bytes, and random
numpy arrays (dtypes, ranks, byte orders, NaN/Inf, sample rates of every type).

Engines, each meant to run in a child process (a crash or hang of native code must not take the caller
down): ``python -m tests.fuzz_audio hypothesis --max-examples N`` (used by
``tests/test_reliability_fuzz.py``) and ``python -m tests.fuzz_audio atheris [libFuzzer flags]`` (coverage
guided; ``pip install atheris``). Guards in the child: an address-space limit (a huge allocation fails
instead of swapping the machine) and a per-input watchdog (``faulthandler``) that ends the process with
a traceback when one input takes longer than ``--input-timeout`` seconds. Before each input the child
writes it to ``--last-input`` so that a crash or hang can be replayed (``replay PATH``).
"""

from __future__ import annotations

import argparse
import faulthandler
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile

from mullama_sdk.audio import iter_windows, load_audio
from mullama_sdk.errors import AudioError

#: (format, subtype, sample rate, channels) of the seed files: every codec family libsndfile decodes.
SEED_SPECS = (
    ("WAV", "PCM_16", 8000, 1), ("WAV", "PCM_24", 48000, 2), ("WAV", "FLOAT", 44100, 2),
    ("WAV", "PCM_U8", 11025, 1), ("WAV", "IMA_ADPCM", 22050, 2), ("WAV", "MS_ADPCM", 16000, 1),
    ("WAV", "GSM610", 8000, 1), ("WAV", "ULAW", 8000, 1), ("WAVEX", "PCM_32", 96000, 3),
    ("RF64", "PCM_16", 24000, 1), ("W64", "DOUBLE", 32000, 1), ("FLAC", "PCM_16", 44100, 2),
    ("FLAC", "PCM_24", 192000, 1), ("OGG", "VORBIS", 44100, 2), ("OGG", "OPUS", 48000, 1),
    ("MP3", "MPEG_LAYER_III", 44100, 2), ("AIFF", "PCM_16", 22050, 2), ("AIFF", "FLOAT", 8000, 1),
    ("AU", "G721_32", 8000, 1), ("AU", "ALAW", 8000, 1), ("CAF", "ALAC_16", 44100, 2),
    ("VOC", "PCM_16", 8000, 1), ("PAF", "PCM_24", 44100, 1), ("IRCAM", "FLOAT", 16000, 1),
    ("NIST", "PCM_16", 16000, 1), ("SVX", "PCM_16", 8000, 1), ("W64", "IMA_ADPCM", 8000, 1),
)

#: Values that break size and count fields.
BOUNDARY_INTS = (0, 1, 2, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)

_LIMIT_BYTES = 3 << 30  # per-child address space budget for the decoded audio and the interpreter


def seed_files(seconds: float = 0.3) -> dict[str, bytes]:
    """Small valid files, by ``FORMAT-SUBTYPE`` (formats this libsndfile cannot write are skipped)."""
    rng = np.random.default_rng(0)
    seeds = {}
    for fmt, subtype, rate, channels in SEED_SPECS:
        n = max(1, int(seconds * rate))
        t = np.arange(n)[:, None] / rate
        x = (0.4 * np.sin(2 * np.pi * 440 * t * (1 + np.arange(channels))) +
             0.05 * rng.standard_normal((n, channels))).astype(np.float32)
        buf = io.BytesIO()
        try:
            soundfile.write(buf, x, rate, format=fmt, subtype=subtype)
        except (soundfile.LibsndfileError, ValueError, TypeError, RuntimeError):
            continue
        seeds[f"{fmt}-{subtype}"] = buf.getvalue()
    return seeds


def mutate(data: bytes, ops: list[tuple[int, int, bytes]]) -> bytes:
    """Apply byte-level mutations ``(kind, position, payload)`` to ``data``.

    kinds: 0 flip a bit, 1 overwrite with payload, 2 truncate, 3 insert payload, 4 write a boundary int
    (little or big endian, 2 or 4 bytes), 5 delete a span, 6 duplicate a span.
    """
    b = bytearray(data)
    for kind, pos, payload in ops:
        if not b:
            b = bytearray(payload)
            continue
        pos %= len(b) + 1
        k = kind % 7
        if k == 0 and pos < len(b):
            b[pos] ^= 1 << (payload[0] % 8 if payload else 0)
        elif k == 1:
            b[pos:pos + len(payload)] = payload
        elif k == 2:
            del b[pos:]
        elif k == 3:
            b[pos:pos] = payload
        elif k == 4:
            value = BOUNDARY_INTS[(payload[0] if payload else 0) % len(BOUNDARY_INTS)]
            width = 4 if value > 0xFFFF or (payload[1:2] or b"\0")[0] & 1 else 2
            order = "big" if (payload[2:3] or b"\0")[0] & 1 else "little"
            b[pos:pos + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, order)
        elif k == 5:
            del b[pos:pos + 1 + len(payload) * 16]
        elif k == 6:
            span = bytes(b[pos:pos + 1 + len(payload) * 16])
            b[pos:pos] = span
    return bytes(b)


def _check_wave(wave: object, what: str) -> None:
    assert isinstance(wave, np.ndarray), f"{what}: returned {type(wave).__name__}"
    assert wave.dtype == np.float32 and wave.ndim == 1 and wave.size > 0, (what, wave.dtype, wave.shape)
    assert wave.flags.c_contiguous, what
    assert np.isfinite(wave).all(), f"{what}: non-finite samples returned"


def _check_windows(source, sample_rate=None) -> None:
    end = 0
    for start, stop, window in iter_windows(source, sample_rate):
        assert start == end and stop > start and len(window) == stop - start, (start, stop, len(window))
        _check_wave(window, "iter_windows")
        end = stop


def check_bytes(data: bytes, suffix: str = ".wav", tmp_dir: str | None = None) -> str:
    """Run ``data`` through every entry point taking files; return ``"ok"`` or ``"error"`` (AudioError).

    Raises:
        AssertionError / any other exception: the property is violated.
    """
    outcomes = []
    for attempt in ("bytes", "file", "path", "windows"):
        try:
            if attempt == "bytes":
                _check_wave(load_audio(data), "load_audio(bytes)")
            elif attempt == "file":
                _check_wave(load_audio(io.BytesIO(data)), "load_audio(file object)")
            else:
                fd, name = tempfile.mkstemp(suffix=suffix, dir=tmp_dir)
                try:
                    with os.fdopen(fd, "wb") as f:
                        f.write(data)
                    if attempt == "path":
                        _check_wave(load_audio(name), "load_audio(path)")
                    else:
                        _check_windows(name)
                finally:
                    os.unlink(name)
            outcomes.append("ok")
        except AudioError as e:
            assert str(e), "an AudioError without a message"
            outcomes.append("error")
    return "ok" if "ok" in outcomes else "error"


def check_array(samples: object, sample_rate: object) -> str:
    """Run an array (any dtype/shape) and any sample rate through :func:`load_audio`; ``"ok"`` or ``"error"``."""
    outcome = "error"
    for attempt in ("load_audio", "iter_windows"):
        try:
            if attempt == "load_audio":
                _check_wave(load_audio(samples, sample_rate), "load_audio(array)")
            else:
                _check_windows(samples, sample_rate)
            outcome = "ok"
        except AudioError as e:
            assert str(e), "an AudioError without a message"
    return outcome


# ------------------------------------------------------------------------------------------- engines
class _Guard:
    """Address-space limit + per-input watchdog + the current input saved for replay."""

    def __init__(self, last_input: Path | None, input_timeout: float) -> None:
        self.last_input = last_input
        self.input_timeout = input_timeout
        faulthandler.enable()
        try:
            import resource

            soft, hard = resource.getrlimit(resource.RLIMIT_AS)
            limit = _LIMIT_BYTES if hard == resource.RLIM_INFINITY else min(_LIMIT_BYTES, hard)
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
        except (ImportError, ValueError, OSError):  # not on this OS: the parent's timeout still applies
            pass

    def __enter__(self):
        faulthandler.dump_traceback_later(self.input_timeout, exit=True)
        return self

    def save(self, kind: str, payload: bytes) -> None:
        if self.last_input is not None:
            self.last_input.write_bytes(kind.encode() + b"\n" + payload)

    def __exit__(self, *exc) -> None:
        faulthandler.cancel_dump_traceback_later()


def run_hypothesis(max_examples: int, guard: _Guard, derandomize: bool) -> dict[str, int]:
    """Property-based fuzzing of bytes (mutated seeds, raw) and arrays; returns outcome counts."""
    import pickle

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    seeds = seed_files()
    names = sorted(seeds)
    counts = {"bytes_ok": 0, "bytes_error": 0, "array_ok": 0, "array_error": 0}
    tmp_dir = tempfile.mkdtemp(prefix="fuzz_audio_")
    suffixes = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".bin")
    # Half of the mutations hit the first 80 bytes, where the headers' size and count fields are.
    positions = st.one_of(st.integers(0, 80), st.integers(0, 1 << 20))
    ops = st.lists(st.tuples(st.integers(0, 6), positions, st.binary(min_size=0, max_size=12)),
                   min_size=0, max_size=6)
    byte_inputs = st.one_of(
        st.tuples(st.sampled_from(names), ops).map(lambda t: (t[0], mutate(seeds[t[0]], t[1]))),
        st.binary(min_size=0, max_size=2048).map(lambda b: ("random", b)),
        st.tuples(st.sampled_from(names), st.integers(0, 1 << 16)).map(
            lambda t: (t[0] + "-cut", seeds[t[0]][: t[1] % (len(seeds[t[0]]) + 1)])),
    )
    dtypes = st.sampled_from(["float32", "float64", "float16", ">f4", ">f8", "int8", "int16", ">i2", "int32",
                              "uint8", "int64", "uint16", "uint32", "bool", "complex64", "object", "<U3",
                              "datetime64[s]", "V4", "longdouble"])
    shapes = st.lists(st.integers(0, 3000), min_size=0, max_size=3).map(tuple)
    values = st.sampled_from(["zeros", "noise", "nan", "inf", "huge", "float32_max", "tiny"])
    valid_rates = st.one_of(st.sampled_from([8000, 22050, 24000, 44100, 48000, 96000, 192000]),
                            st.integers(1000, 768_000))
    odd_rates = st.one_of(st.integers(-10, 10), st.integers(768_000, 10**7),
                          st.floats(allow_nan=True, allow_infinity=True), st.none(), st.booleans(),
                          st.sampled_from(["44100", b"8000", [44100], np.float32(16000.0), np.int64(48000),
                                           np.float64(44100.5), 10**30]))
    rates = st.one_of(valid_rates, valid_rates, odd_rates)

    def make_array(dtype: str, shape: tuple, fill: str) -> np.ndarray:
        n = int(np.prod(shape)) if shape else 1
        if n > 20_000:
            shape, n = (n % 20_000,), n % 20_000
        rng = np.random.default_rng(n)
        base = {"zeros": np.zeros(n), "noise": rng.standard_normal(n), "nan": np.full(n, np.nan),
                "inf": np.full(n, -np.inf), "huge": np.full(n, 1e300), "tiny": np.full(n, 1e-300),
                "float32_max": np.where(np.arange(n) % 2, 3.3e38, -3.3e38)}[fill]
        try:
            with np.errstate(all="ignore"):
                return base.astype(dtype).reshape(shape)
        except (ValueError, TypeError, OverflowError):
            return np.zeros(shape, dtype=dtype)

    @settings(max_examples=max_examples, deadline=None, database=None, derandomize=derandomize,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(kind=st.integers(0, 3), blob=byte_inputs, suffix=st.sampled_from(suffixes),
           dtype=dtypes, shape=shapes, fill=values, rate=rates)
    def prop(kind, blob, suffix, dtype, shape, fill, rate):
        if kind < 3:
            name, data = blob
            with guard:
                guard.save("bytes", data)
                counts["bytes_" + check_bytes(data, suffix, tmp_dir)] += 1
        else:
            arr = make_array(dtype, shape, fill)
            with guard:
                guard.save("array", pickle.dumps((arr, rate)))  # our own file, replayed by us only
                counts["array_" + check_array(arr, rate)] += 1

    prop()
    return counts


def run_atheris(argv: list[str], guard: _Guard) -> None:
    """Coverage-guided fuzzing with atheris/libFuzzer; the seed files are the starting corpus."""
    import inspect

    import atheris

    import mullama_sdk.audio as audio_module
    import mullama_sdk.audio_decode as decode_module

    # Python-level coverage of the loader and of soundfile's wrapper (libsndfile itself is not instrumented;
    # instrument_all() would take ~20 s for numpy & co.).
    for module in (audio_module, decode_module, soundfile):
        for owner in [module, *[c for c in vars(module).values() if inspect.isclass(c)
                                and c.__module__ == module.__name__]]:
            for obj in list(vars(owner).values()):
                if inspect.isfunction(obj) and obj.__module__ == module.__name__:
                    atheris.instrument_func(obj)

    corpus = Path(tempfile.mkdtemp(prefix="fuzz_audio_corpus_"))
    for name, data in seed_files(seconds=0.05).items():  # small seeds: more executions per second
        (corpus / name).write_bytes(data)
    tmp_dir = tempfile.mkdtemp(prefix="fuzz_audio_")

    def one_input(data: bytes) -> None:
        with guard:
            guard.save("bytes", data)
            check_bytes(data, ".wav", tmp_dir)

    # -keep_seed: the seeds stay in the corpus although Python coverage barely tells them apart.
    atheris.Setup([sys.argv[0], "-keep_seed=1", "-max_len=65536", *argv, str(corpus)], one_input)
    atheris.Fuzz()


def replay(path: Path) -> str:
    """Re-run an input saved by ``--last-input``."""
    import pickle

    kind, _, payload = path.read_bytes().partition(b"\n")
    if kind == b"bytes":
        return check_bytes(payload)
    arr, rate = pickle.loads(payload)  # a file this module wrote itself
    return check_array(arr, rate)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.fuzz_audio", description=__doc__.split("\n\n")[0])
    p.add_argument("engine", choices=("hypothesis", "atheris", "replay"))
    p.add_argument("--max-examples", type=int, default=300)
    p.add_argument("--random", action="store_true", help="hypothesis: a new random seed (default: derandomized)")
    p.add_argument("--input-timeout", type=float, default=20.0, help="seconds one input may take")
    p.add_argument("--last-input", type=Path, default=None, help="write each input here before running it")
    p.add_argument("path", nargs="?", type=Path, help="replay: the saved input")
    args, rest = p.parse_known_args(argv)
    guard = _Guard(args.last_input, args.input_timeout)
    t0 = time.perf_counter()
    if args.engine == "replay":
        print(replay(args.path))
        return 0
    if args.engine == "atheris":
        run_atheris(rest, guard)
        return 0
    counts = run_hypothesis(args.max_examples, guard, derandomize=not args.random)
    total = sum(counts.values())
    print(f"fuzz_audio: {total} inputs in {time.perf_counter() - t0:.1f} s: "
          + ", ".join(f"{k}={v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
