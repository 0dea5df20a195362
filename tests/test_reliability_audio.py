"""Whatever audio a user drops on an app: a correct result or an AudioError naming the problem, through
``load_audio`` and through ``Captioner.encode`` / ``caption``; long files in bounded memory.

(tests/test_audio.py covers the loader's unit behaviour; tests/fuzz_audio.py + test_reliability_fuzz.py
fuzz it.)"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import mullama_sdk.audio as audio_module
from mullama_sdk import AudioError, Captioner
from mullama_sdk.audio import iter_windows, load_audio

ROOT = Path(__file__).resolve().parents[1]
SR = 24_000


@pytest.fixture(scope="module")
def cap(tiny_bundle):
    with Captioner.from_pretrained(tiny_bundle, quant="f32", encoder_precision="fp32", n_threads=2) as c:
        yield c


def _music(seconds: float, rate: int, channels: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate))[:, None] / rate
    tone = 0.3 * np.sin(2 * np.pi * 330 * t * (1 + 0.25 * np.arange(channels)))
    return (tone + 0.03 * rng.standard_normal(tone.shape)).astype(np.float32)


def _encoded(data: np.ndarray, rate: int, fmt: str, subtype: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, data, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def _outcome(fn) -> str:
    """``"ok"`` for a valid result, ``"AudioError"``; anything else fails the test."""
    try:
        result = fn()
    except AudioError as e:
        assert str(e)
        return "AudioError"
    if isinstance(result, np.ndarray):
        assert result.dtype == np.float32 and result.ndim == 1 and result.size and np.isfinite(result).all()
    else:  # MusicVectors or Caption
        vec = getattr(result, "injection", None)
        assert vec is None or np.isfinite(vec).all()
    return "ok"


FORMATS = [("WAV", "PCM_16", "wav"), ("WAV", "PCM_24", "wav"), ("WAV", "FLOAT", "wav"), ("FLAC", "PCM_16", "flac"),
           ("FLAC", "PCM_24", "flac"), ("OGG", "VORBIS", "ogg"), ("MP3", "MPEG_LAYER_III", "mp3")]


@pytest.mark.parametrize("fmt,subtype,ext", FORMATS, ids=[f"{f}-{s}" for f, s, _ in FORMATS])
def test_truncated_files(cap, tmp_path, fmt, subtype, ext):
    """Cut everywhere from the first byte to the last: AudioError, or what is there decodes cleanly."""
    data = _encoded(_music(3.0, 44100, 2), 44100, fmt, subtype)
    cuts = sorted({0, 1, 4, 12, 30, 44, 64, 200, 1000, 4096, len(data) // 10, len(data) // 2, len(data) - 1})
    seen = {}
    for cut in cuts:
        part = data[:cut]
        path = tmp_path / f"cut{cut}.{ext}"
        path.write_bytes(part)
        outcomes = {
            "load_audio(path)": _outcome(lambda p=path: load_audio(p)),
            "load_audio(bytes)": _outcome(lambda b=part: load_audio(b)),
            "encode(path)": _outcome(lambda p=path: cap.encode(p)),
            "encode(file object)": _outcome(lambda b=part: cap.encode(io.BytesIO(b))),
        }
        # The same bytes give the same verdict whatever the way in (the encoder adds the bundle's minimum).
        assert outcomes["load_audio(path)"] == outcomes["load_audio(bytes)"], (cut, outcomes)
        assert outcomes["encode(path)"] == outcomes["encode(file object)"], (cut, outcomes)
        seen[cut] = outcomes["encode(path)"]
    assert seen[0] == seen[1] == "AudioError", seen
    last = tmp_path / f"cut{len(data) - 1}.{ext}"
    if fmt == "FLAC":  # libsndfile rejects a FLAC whose last frame is cut; the error says what happened
        with pytest.raises(AudioError, match=r"truncated or damaged: decoding failed after \d+ of the 132300 frames"):
            load_audio(last)
    else:  # WAV, OGG and MP3 decode what is there
        assert seen[len(data) - 1] == "ok", seen
    assert _outcome(lambda: cap.caption(tmp_path / f"cut{len(data) // 2}.{ext}", max_new_tokens=2)) in (
        "ok", "AudioError")


NOT_AUDIO = {
    "png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8,
    "json": json.dumps({"tracks": list(range(500))}).encode(),
    "utf16 text": "la la la, this is a song\n".encode("utf-16") * 50,
    "zip": b"PK\x03\x04" + b"\0" * 2000,
    "elf": Path(sys.executable).resolve().read_bytes()[:8192],
    "riff but not wave": b"RIFF\x10\x00\x00\x00AVI LIST" + b"\0" * 1000,
    "wav magic only": b"RIFF\xff\xff\xff\xffWAVE",
    "flac magic only": b"fLaC",
    "ogg page header": b"OggS\x00\x02" + b"\0" * 100,
    "id3 tag, no frames": b"ID3\x03\x00\x00\x00\x00\x00\x10" + b"\0" * 16,
    "zeros": b"\0" * 100_000,
}


@pytest.mark.parametrize("name", sorted(NOT_AUDIO))
@pytest.mark.parametrize("ext", ["wav", "mp3", "flac", "ogg"])
def test_non_audio_with_an_audio_extension(cap, tmp_path, name, ext):
    path = tmp_path / f"song.{ext}"
    path.write_bytes(NOT_AUDIO[name])
    for fn in (lambda: load_audio(path), lambda: cap.encode(path), lambda: cap.caption(path, max_new_tokens=2),
               lambda: cap.caption_batch([path], max_new_tokens=2)):
        with pytest.raises(AudioError, match=r"song\.|audio data|0 frames|too short|samples \(.*\) are needed"):
            fn()


def test_empty_inputs(cap, tmp_path):
    path = tmp_path / "empty.mp3"
    path.write_bytes(b"")
    for source, sr in ((path, None), (b"", None), (io.BytesIO(b""), None), (np.zeros(0, np.float32), SR),
                       (np.zeros((0, 2), np.int16), SR)):
        with pytest.raises(AudioError, match="empty|0 bytes|no data|0 frames|cannot decode"):
            cap.encode(source, sample_rate=sr)
        with pytest.raises(AudioError):
            cap.caption(source, sample_rate=sr, max_new_tokens=1)


@pytest.mark.parametrize("n", [1, 2, 240, 399])
def test_too_short_to_encode(cap, tmp_path, n):
    """Below the bundle's minimum (one MERT frame, 400 samples): an AudioError that says the minimum in seconds
    and samples, from arrays and from files."""
    x = _music(1.0, SR, 1)[:n]
    sf.write(tmp_path / "short.wav", x, SR)
    for source, sr in ((x, SR), (tmp_path / "short.wav", None)):
        with pytest.raises(AudioError, match=rf"\({n} samples at 24 kHz\); at least 400 samples \(0\.017 s\) are needed"):
            cap.encode(source, sample_rate=sr)
    assert len(load_audio(x, SR)) == n  # the loader itself takes any non-empty clip


@pytest.mark.parametrize("n", [400, 12_000])
def test_exactly_the_minimum_length(cap, n):
    vec = cap.encode(_music(1.0, SR, 1)[:n], sample_rate=SR)
    assert vec.duration_s == pytest.approx(n / SR) and np.isfinite(vec.injection).all()
    assert vec.n_frames == (n - 400) // 320 + 1


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_samples(cap, tmp_path, bad):
    x = _music(2.0, 44100, 2)
    x[30_000, 1] = bad
    with pytest.raises(AudioError, match=r"NaN or infinite.*frame 30000"):
        cap.encode(x, sample_rate=44100)
    sf.write(tmp_path / "nan.wav", x, 44100, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"nan\.wav.*NaN or infinite.*frame 30000"):
        cap.caption(tmp_path / "nan.wav", max_new_tokens=1)


def test_non_finite_sample_found_while_streaming_names_its_frame(cap, tmp_path, monkeypatch):
    """Streamed files are checked block by block; the frame number counts from the start of the file."""
    monkeypatch.setattr(audio_module, "STREAM_ABOVE_SECONDS", 5.0)
    monkeypatch.setattr(audio_module, "STREAM_BLOCK_SECONDS", 2.0)
    x = _music(10.0, 48000, 1)
    x[7 * 48000 + 123] = np.nan
    sf.write(tmp_path / "long_nan.wav", x, 48000, subtype="FLOAT")
    with pytest.raises(AudioError, match=rf"long_nan\.wav.*frame {7 * 48000 + 123}\b"):
        cap.encode(tmp_path / "long_nan.wav")


def test_huge_finite_samples(cap):
    """Finite but astronomically loud: overflows in resampling/downmix or in the encoder are named."""
    for x, sr in ((np.full((48000, 2), 3.3e38, np.float32), 48000), (np.full(24000, 1e300), SR),
                  (np.full(24000, 3.3e38, np.float32), SR)):
        with pytest.raises(AudioError, match="expected in \\[-1, 1\\]"):
            cap.encode(x, sample_rate=sr)


RATES_CHANNELS = [(8000, 1), (11025, 2), (16000, 1), (22050, 2), (24000, 1), (32000, 2), (44100, 2), (48000, 6),
                  (88200, 2), (96000, 4), (176400, 2), (192000, 8)]


@pytest.mark.parametrize("rate,channels", RATES_CHANNELS)
def test_rates_and_channels_as_arrays_and_files(cap, tmp_path, rate, channels):
    x = _music(1.0, rate, channels)
    ref = cap.encode(x, sample_rate=rate)
    assert ref.duration_s == pytest.approx(1.0, abs=1 / SR) and np.isfinite(ref.injection).all()
    lossless = [("WAV", "PCM_24"), ("WAV", "FLOAT"), ("FLAC", "PCM_24")]
    for fmt, subtype in lossless:
        if not sf.check_format(fmt, subtype) or (fmt == "FLAC" and channels > 8):
            continue
        path = tmp_path / f"x.{fmt.lower()}"
        sf.write(path, x, rate, format=fmt, subtype=subtype)
        vec = cap.encode(path)
        tol = 1e-6 if subtype == "FLOAT" else 2e-4  # 24-bit quantisation
        np.testing.assert_allclose(vec.injection, ref.injection, rtol=tol, atol=tol)
    lossy = [("OGG", "VORBIS")] + ([("MP3", "MPEG_LAYER_III")] if rate <= 48000 and channels <= 2 else [])
    for fmt, subtype in lossy:
        path = tmp_path / f"x.{fmt.lower()}"
        try:
            sf.write(path, x, rate, format=fmt, subtype=subtype)
        except sf.LibsndfileError:  # this encoder does not take the rate / channel count: nothing to read
            continue
        vec = cap.encode(path)
        assert abs(vec.duration_s - 1.0) < 0.1 and np.isfinite(vec.injection).all()


@pytest.mark.parametrize("samples,match", [
    (np.zeros((24000, 2, 2), np.float32), "3-D"),
    (np.zeros((), np.float32), "0-D"),
    (np.zeros((2, 48000), np.float32), r"\.T"),
    (np.zeros(24000, np.int64), "unsupported dtype int64"),
    (np.zeros(24000, np.uint16), "unsupported dtype uint16"),
    (np.zeros(24000, np.complex64), "unsupported dtype complex64"),
    (np.zeros(24000, bool), "unsupported dtype bool"),
    (np.zeros(24000, object), "unsupported dtype object"),
    (np.zeros(24000, "U3"), "unsupported dtype <U3"),
    (np.zeros(24000, "datetime64[s]"), r"unsupported dtype datetime64\[s\]"),
    (np.zeros(24000, [("l", "f4"), ("r", "f4")]), "unsupported dtype"),
])
def test_arrays_of_the_wrong_dtype_or_rank(cap, samples, match):
    with pytest.raises(AudioError, match=match):
        cap.encode(samples, sample_rate=SR)
    with pytest.raises(AudioError, match=match):
        cap.caption_batch([samples], sample_rate=SR)


@pytest.mark.parametrize("samples", [
    np.zeros(24000, ">f4"), np.zeros(24000, ">i2"), np.zeros(24000, np.float16), np.zeros(24000, np.longdouble),
    np.zeros((48000, 2), np.float64)[::2], np.asfortranarray(np.zeros((24000, 2), np.float32)),
], ids=["big-endian f4", "big-endian i2", "float16", "longdouble", "strided", "fortran order"])
def test_unusual_but_valid_arrays(cap, samples):
    vec = cap.encode(samples, sample_rate=SR)
    assert np.isfinite(vec.injection).all()


@pytest.mark.parametrize("rate", [0, -44100, 44100.5, float("nan"), float("inf"), "44100", None, True, 10**9, 999])
def test_bad_sample_rates_with_arrays(cap, rate):
    with pytest.raises(AudioError, match="sample.rate"):
        cap.encode(_music(1.0, 44100, 1), sample_rate=rate)


def test_header_announcing_more_than_the_file_holds(cap, tmp_path):
    """A FLAC whose STREAMINFO claims 2**36 - 1 frames (~18 days at 44.1 kHz) in 500 kB: soundfile used to
    allocate the announced 512 GiB up front (MemoryError); now an AudioError, fast, in little memory."""
    data = bytearray(_encoded(_music(3.0, 44100, 2), 44100, "FLAC", "PCM_16"))
    field = int.from_bytes(data[18:26], "big")  # STREAMINFO: rate(20) channels(3) bits(5) total samples(36)
    data[18:26] = (field | ((1 << 36) - 1)).to_bytes(8, "big")
    lie = bytes(data)
    (tmp_path / "lie.flac").write_bytes(lie)
    for source in (lie, tmp_path / "lie.flac", io.BytesIO(lie)):
        tracemalloc.start()
        t0 = time.perf_counter()
        try:
            assert _outcome(lambda s=source: cap.encode(s)) in ("ok", "AudioError")
            if isinstance(source, io.BytesIO):
                source.seek(0)
            assert _outcome(lambda s=source: load_audio(s)) in ("ok", "AudioError")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 64 * 2**20 and time.perf_counter() - t0 < 10


def test_long_bytes_and_file_objects_are_streamed(cap, tmp_path, monkeypatch):
    """Bytes and seekable file objects of long files take the streaming path too (same windows as the path)."""
    monkeypatch.setattr(audio_module, "STREAM_ABOVE_SECONDS", 5.0)
    monkeypatch.setattr(audio_module, "STREAM_BLOCK_SECONDS", 2.0)
    x = _music(12.0, 44100, 2)
    path = tmp_path / "long.flac"
    sf.write(path, x, 44100, format="FLAC")
    data = path.read_bytes()
    calls = []
    original = audio_module.load_audio
    monkeypatch.setattr(audio_module, "load_audio", lambda *a, **k: calls.append(1) or original(*a, **k))
    by_path = [(a, b, w) for a, b, w in iter_windows(path, max_window_seconds=5.0)]
    with open(path, "rb") as f:
        by_file = list(iter_windows(f, max_window_seconds=5.0))
    by_bytes = list(iter_windows(data, max_window_seconds=5.0))
    assert calls == []  # nothing was decoded whole
    for other in (by_file, by_bytes):
        assert [(a, b) for a, b, _ in other] == [(a, b) for a, b, _ in by_path]
        for (_, _, w1), (_, _, w2) in zip(other, by_path, strict=True):
            np.testing.assert_array_equal(w1, w2)
    np.testing.assert_array_equal(cap.encode(data).injection, cap.encode(path).injection)


_LONG_FILE_PROBE = textwrap.dedent("""
    import json, resource, sys, time, tracemalloc
    import numpy as np, soundfile as sf
    from mullama_sdk import Captioner
    bundle, path, how = sys.argv[1], sys.argv[2], sys.argv[3]
    cap = Captioner.from_pretrained(bundle, quant="f32", encoder_precision="fp32", n_threads=2)
    # Warm-up with one full 30 s window: ONNX Runtime's arena grows to a window's activations once
    # (~100 MiB for the tiny model), whatever the duration of what follows.
    cap.encode(np.zeros(30 * 24000, np.float32), sample_rate=24000)
    import threading
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
    before, samples, done = rss(), [], threading.Event()

    def sample():  # RSS every 5 ms while encoding: its peak is what the host application sees
        while not done.is_set():
            samples.append(rss())
            time.sleep(0.005)
    source = {"path": path, "bytes": None, "file": None}[how]
    if how == "bytes":
        source = open(path, "rb").read()
    elif how == "file":
        source = open(path, "rb")
    sampler = threading.Thread(target=sample)
    sampler.start()
    t0 = time.perf_counter()
    vec = cap.encode(source)
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    peak = max(samples)
    tracemalloc.start()  # a second pass, traced (tracemalloc slows numpy down)
    if how == "file":
        source.seek(0)
    cap.encode(source)
    traced_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    info = sf.info(path)
    print(json.dumps({"duration_s": vec.duration_s, "windows": len(vec.window_bounds_s), "seconds": seconds,
                      "traced_peak": traced_peak, "rss_peak_growth": peak - before,
                      "decoded_bytes": info.frames * info.channels * 4, "finite": bool(np.isfinite(vec.injection).all()),
                      "file_bytes": len(open(path, "rb").read()) if how != "path" else 0}))
""")


def _write_long_flac(path: Path, minutes: float, rate: int = 44100, channels: int = 2) -> None:
    rng = np.random.default_rng(0)
    with sf.SoundFile(path, "w", samplerate=rate, channels=channels, format="FLAC", subtype="PCM_16") as f:
        for i in range(int(minutes * 6)):  # 10 s blocks: the writer never holds the whole file either
            t = np.arange(10 * rate)[:, None] / rate + 10 * i
            block = 0.3 * np.sin(2 * np.pi * (220 + 20 * (i % 7)) * t * (1 + 0.5 * np.arange(channels)))
            f.write((block + 0.02 * rng.standard_normal(block.shape)).astype(np.float32))


def _check_long_file(tiny_bundle, path: Path, minutes: float, how: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _LONG_FILE_PROBE, str(tiny_bundle), str(path), how],
                         capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{minutes:g} min 44.1 kHz stereo FLAC via {how}: {res['seconds']:.1f} s, {res['windows']} windows, "
          f"traced peak {res['traced_peak'] / 2**20:.1f} MiB, RSS peak growth {res['rss_peak_growth'] / 2**20:.1f} MiB, "
          f"decoded size {res['decoded_bytes'] / 2**20:.0f} MiB")
    assert res["duration_s"] == pytest.approx(minutes * 60, abs=0.01) and res["finite"]
    assert res["windows"] == int(minutes * 2)
    # Bounded by a window and a block, not by the duration (the input bytes themselves aside).
    assert res["traced_peak"] < 48 * 2**20
    assert res["rss_peak_growth"] - res["file_bytes"] < 64 * 2**20
    return res


@pytest.mark.parametrize("how", ["path", "bytes"])
def test_ten_minute_stereo_flac_in_bounded_memory(tiny_bundle, tmp_path, how):
    path = tmp_path / "ten.flac"
    _write_long_flac(path, 10)
    _check_long_file(tiny_bundle, path, 10, how)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["path", "file"])
def test_one_hour_stereo_flac_in_bounded_memory(tiny_bundle, tmp_path, how):
    path = tmp_path / "hour.flac"
    _write_long_flac(path, 60)
    _check_long_file(tiny_bundle, path, 60, how)
