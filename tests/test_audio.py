"""Tests of mullama_sdk.audio: decoding, scaling, resample-then-mono order, errors, windows."""

from __future__ import annotations

import io
import itertools
import subprocess
import sys

import numpy as np
import pytest
import soundfile
import soxr
from hypothesis import given
from hypothesis import strategies as st

from mullama_sdk import audio
from mullama_sdk.audio import load_audio, seconds, window_bounds
from mullama_sdk.constants import SAMPLE_RATE_HZ
from mullama_sdk.errors import AudioError, MullamaError

SR = SAMPLE_RATE_HZ


def tone(sample_rate: int, seconds: float = 1.0, freqs=(440.0,), amp: float = 0.25) -> np.ndarray:
    """float32 frames (n, len(freqs)): one sine per channel."""
    t = np.arange(round(sample_rate * seconds)) / sample_rate
    return np.stack([amp * np.sin(2 * np.pi * f * t) for f in freqs], axis=1).astype(np.float32)


def peak_hz(x: np.ndarray, sample_rate: int = SR) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / sample_rate)[np.argmax(spectrum)])


def by_hand(frames: np.ndarray, sample_rate: int) -> np.ndarray:
    """The spec's order written out: soxr HQ to 24 kHz on all channels, then the channel mean."""
    if sample_rate != SR:
        frames = soxr.resample(frames, sample_rate, SR, quality="HQ")
    return frames.mean(axis=1, dtype=np.float32)


@pytest.fixture
def wav48(tmp_path):
    """A 1 s stereo 48 kHz float WAV and the frames written into it."""
    frames = tone(48_000, freqs=(440.0, 1000.0))
    path = tmp_path / "clip.wav"
    soundfile.write(path, frames, 48_000, subtype="FLOAT")
    return path, frames


# --------------------------------------------------------------------------------------------
# Order and resampling


def test_resample_then_mono_matches_the_spec_bit_for_bit():
    rng = np.random.default_rng(0)
    frames = rng.uniform(-0.5, 0.5, size=(44_100, 2)).astype(np.float32)
    out = load_audio(frames, 44_100)
    # Both steps are linear, so the two orders agree up to rounding; bit equality with the
    # hand-written spec order is what pins the order down.
    np.testing.assert_array_equal(out, by_hand(frames, 44_100))


def test_resampler_sees_all_channels_before_the_downmix(monkeypatch):
    seen = []
    real = soxr.resample

    def spy(x, in_rate, out_rate, quality):
        seen.append((x.shape, x.dtype, in_rate, out_rate, quality))
        return real(x, in_rate, out_rate, quality=quality)

    monkeypatch.setattr(audio.soxr, "resample", spy)
    load_audio(tone(48_000, freqs=(440.0, 660.0, 880.0)), 48_000)
    assert seen == [((48_000, 3), np.dtype(np.float32), 48_000, SR, "HQ")]


@pytest.mark.parametrize("rate", [8_000, 22_050, 44_100, 48_000, 96_000, 192_000])
def test_rates_are_resampled_to_24k_without_normalisation(rate):
    frames = tone(rate, freqs=(440.0,), amp=0.1)
    out = load_audio(frames, rate)
    assert out.dtype == np.float32 and out.ndim == 1 and out.flags.c_contiguous
    assert abs(len(out) - len(frames) * SR / rate) <= 1
    assert peak_hz(out) == pytest.approx(440.0, abs=1.5)
    # amplitude 0.1 stays 0.1 (RMS 0.1/sqrt 2), measured away from the filter's edge effects
    middle = out[len(out) // 4 : 3 * len(out) // 4]
    assert np.sqrt(np.mean(middle**2)) == pytest.approx(0.1 / np.sqrt(2), rel=1e-3)
    np.testing.assert_array_equal(out, by_hand(frames, rate))


def test_24k_input_is_not_resampled():
    frames = tone(SR)[:, 0]
    np.testing.assert_array_equal(load_audio(frames, SR), frames)


def test_integral_float_sample_rate_is_accepted():
    frames = tone(44_100)
    np.testing.assert_array_equal(load_audio(frames, 44_100.0), load_audio(frames, 44_100))
    np.testing.assert_array_equal(load_audio(frames, np.int64(44_100)), load_audio(frames, 44_100))


@pytest.mark.parametrize("n_channels", [1, 2, 8])
def test_channels_are_averaged(n_channels):
    rng = np.random.default_rng(n_channels)
    frames = rng.uniform(-1, 1, size=(SR // 2, n_channels)).astype(np.float32)
    out = load_audio(frames, SR)
    np.testing.assert_allclose(out, frames.mean(axis=1), rtol=0, atol=1e-7)
    out48 = load_audio(rng.uniform(-1, 1, size=(48_000, n_channels)).astype(np.float32), 48_000)
    assert out48.shape == (SR,)


def test_mono_1d_and_2d_agree():
    mono = tone(48_000)[:, 0]
    np.testing.assert_array_equal(load_audio(mono, 48_000), load_audio(mono[:, None], 48_000))


def test_opposite_channels_cancel():
    left = tone(SR)[:, 0]
    out = load_audio(np.stack([left, -left], axis=1), SR)
    np.testing.assert_array_equal(out, np.zeros_like(left))


# --------------------------------------------------------------------------------------------
# Sample formats


@pytest.mark.parametrize(
    ("samples", "expected"),
    [
        (np.array([0, 16_384, -32_768, 32_767], np.int16), [0.0, 0.5, -1.0, 32_767 / 32_768]),
        (np.array([0, 2**30, -(2**31), -(2**29)], np.int32), [0.0, 0.5, -1.0, -0.25]),
        (np.array([128, 192, 0, 255], np.uint8), [0.0, 0.5, -1.0, 127 / 128]),
        (np.array([0, 64, -128, 127], np.int8), [0.0, 0.5, -1.0, 127 / 128]),
        (np.array([0.0, 0.5, -1.0, 1.5], np.float64), [0.0, 0.5, -1.0, 1.5]),
        (np.array([0.0, 0.5, -1.0, 2.0], np.float16), [0.0, 0.5, -1.0, 2.0]),
        (np.array([0, 16_384, -32_768, 32_767], ">i2"), [0.0, 0.5, -1.0, 32_767 / 32_768]),
    ],
    ids=["int16", "int32", "uint8", "int8", "float64", "float16", "int16-big-endian"],
)
def test_sample_formats_are_scaled_to_unit_range(samples, expected):
    out = audio.to_float32(samples)
    assert out.dtype == np.float32 and out.shape == (4, 1)
    np.testing.assert_array_equal(out[:, 0], np.array(expected, np.float32))
    assert load_audio(np.tile(samples, 100), SR).dtype == np.float32


def test_int16_array_equals_the_same_samples_in_a_pcm16_wav(tmp_path):
    samples = (tone(48_000, freqs=(300.0, 500.0)) * 32_767).astype(np.int16)
    path = tmp_path / "pcm16.wav"
    soundfile.write(path, samples, 48_000, subtype="PCM_16")
    np.testing.assert_array_equal(load_audio(path), load_audio(samples, 48_000))


def test_float64_values_are_kept():
    frames = tone(SR).astype(np.float64) * 3.0  # above full scale: no clipping, no normalisation
    np.testing.assert_array_equal(load_audio(frames, SR), frames[:, 0].astype(np.float32))


# --------------------------------------------------------------------------------------------
# Files, bytes, file objects


@pytest.mark.parametrize(("ext", "subtype"), [("wav", "FLOAT"), ("wav", "PCM_24"), ("flac", "PCM_16")])
def test_lossless_files_equal_the_array_path(tmp_path, ext, subtype):
    frames = tone(44_100, freqs=(440.0, 1000.0))
    path = tmp_path / f"clip.{ext}"
    soundfile.write(path, frames, 44_100, subtype=subtype)
    stored, rate = soundfile.read(path, dtype="float32", always_2d=True)
    assert rate == 44_100
    np.testing.assert_array_equal(load_audio(path), load_audio(stored, rate))
    np.testing.assert_array_equal(load_audio(str(path)), load_audio(path))


@pytest.mark.parametrize("fmt", ["OGG", "MP3"])
def test_lossy_files_decode(tmp_path, fmt):
    if fmt not in soundfile.available_formats():
        pytest.skip(f"this libsndfile has no {fmt}")
    frames = tone(48_000, seconds=2.0, freqs=(440.0, 440.0))
    path = tmp_path / f"clip.{fmt.lower()}"
    soundfile.write(path, frames, 48_000, format=fmt)
    out = load_audio(path)
    assert out.dtype == np.float32 and out.ndim == 1
    assert abs(len(out) - 2 * SR) <= 0.05 * SR  # codecs may pad a little
    assert peak_hz(out) == pytest.approx(440.0, abs=2.0)


def test_bytes_bytearray_memoryview_and_file_objects(wav48):
    path, frames = wav48
    expected = load_audio(frames, 48_000)
    data = path.read_bytes()
    for source in (data, bytearray(data), memoryview(data), io.BytesIO(data)):
        np.testing.assert_array_equal(load_audio(source), expected)
    with open(path, "rb") as f:
        np.testing.assert_array_equal(load_audio(f), expected)


# --------------------------------------------------------------------------------------------
# Errors: each names the problem, the source and what would be valid


def expect_audio_error(match: str, source, sample_rate=None) -> AudioError:
    with pytest.raises(AudioError, match=match) as info:
        load_audio(source, sample_rate)
    assert isinstance(info.value, MullamaError) and isinstance(info.value, ValueError)
    return info.value


def test_empty_file(tmp_path):
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    err = expect_audio_error("empty", path)
    assert "empty.wav" in str(err)


def test_random_bytes_named_wav(tmp_path):
    path = tmp_path / "noise.wav"
    path.write_bytes(np.random.default_rng(0).bytes(4000))
    err = expect_audio_error("cannot decode", path)
    message = str(err)
    assert "noise.wav" in message
    assert "FLAC" in message and "WAV" in message and "OGG" in message  # the formats that would work
    assert isinstance(err.__cause__, soundfile.LibsndfileError)


def test_truncated_wav_header(wav48, tmp_path):
    path, _ = wav48
    cut = tmp_path / "cut.wav"
    cut.write_bytes(path.read_bytes()[:30])
    err = expect_audio_error("cannot decode", cut)
    assert "cut.wav" in str(err)


def test_wav_with_header_but_no_samples(wav48, tmp_path):
    path, _ = wav48
    cut = tmp_path / "header_only.wav"
    data = path.read_bytes()
    cut.write_bytes(data[: data.index(b"data") + 8])
    expect_audio_error(r"header_only\.wav.*0 frames", cut)


def test_truncated_wav_data_reads_what_is_there(wav48, tmp_path):
    path, _ = wav48
    cut = tmp_path / "cut_data.wav"
    data = path.read_bytes()
    cut.write_bytes(data[: data.index(b"data") + 8 + 8 * 24_000])  # 24000 stereo float frames
    assert load_audio(cut).shape == (SR // 2,)


def test_zero_frame_wav(tmp_path):
    path = tmp_path / "zero.wav"
    soundfile.write(path, np.zeros((0, 2), np.float32), 48_000)
    expect_audio_error(r"zero\.wav.*0 frames", path)


def test_missing_file_and_directory(tmp_path):
    expect_audio_error(r"nope\.wav.*does not exist", tmp_path / "nope.wav")
    expect_audio_error("is a directory", tmp_path)


def test_empty_bytes_and_text_mode_file(wav48):
    path, _ = wav48
    expect_audio_error("0 bytes", b"")
    with open(path, encoding="latin-1") as f:
        expect_audio_error(r"clip\.wav.*binary mode", f)


def test_unsupported_source_type():
    expect_audio_error("numpy array", [0.0, 0.1, 0.2])


def test_nan_and_inf_are_rejected():
    frames = np.zeros((SR, 2), np.float32)
    frames[3, 1] = np.nan
    expect_audio_error(r"NaN or infinite.*frame 3", frames, SR)
    frames[3, 1] = np.inf
    expect_audio_error("NaN or infinite", frames, SR)


def test_nan_in_a_float_wav_is_rejected(tmp_path):
    frames = np.zeros((1000, 1), np.float32)
    frames[10] = np.nan
    path = tmp_path / "nan.wav"
    soundfile.write(path, frames, 48_000, subtype="FLOAT")
    expect_audio_error(r"nan\.wav.*NaN", path)


@pytest.mark.parametrize(
    ("shape", "match"),
    [((0,), "empty"), ((0, 2), "empty"), ((100, 0), "0 channels"), ((2, 10, 2), "3-D"), ((), "0-D")],
)
def test_bad_array_shapes(shape, match):
    err = expect_audio_error(match, np.zeros(shape, np.float32), SR)
    assert "(n_frames, n_channels)" in str(err) or "at least one sample" in str(err)


def test_channels_first_array_suggests_transpose():
    err = expect_audio_error(r"\.T", np.zeros((2, 48_000), np.float32), 48_000)
    assert "48000 channels" in str(err)


@pytest.mark.parametrize("dtype", [np.bool_, np.complex64, np.int64, np.uint16, object])
def test_unsupported_dtypes(dtype):
    err = expect_audio_error("unsupported dtype", np.zeros(1000, dtype), SR)
    assert str(np.dtype(dtype)) in str(err)
    assert "float32" in str(err) and "int16" in str(err)


def test_array_without_sample_rate():
    expect_audio_error("sample_rate is required", np.zeros(1000, np.float32))


def test_path_with_sample_rate(wav48):
    path, _ = wav48
    err = expect_audio_error("carry their own sample rate", path, 48_000)
    assert "clip.wav" in str(err)


@pytest.mark.parametrize(
    ("rate", "match"),
    [
        (0, "out of range"),
        (-44_100, "out of range"),
        (500, "out of range"),
        (1_000_000, "out of range"),
        (44_100.5, "not a whole number"),
        (float("nan"), "not a whole number"),
        ("44100", "not a number"),
        (True, "not a number"),
    ],
)
def test_bad_sample_rates(rate, match):
    err = expect_audio_error(match, np.zeros(1000, np.float32), rate)
    assert "1000" in str(err) and "768000" in str(err)


def test_too_short_to_resample():
    expect_audio_error("no samples at 24000 Hz", np.zeros(2, np.float32), 192_000)


# --------------------------------------------------------------------------------------------
# Windows


def test_window_examples():
    max_w, min_w = 30 * SR, SR // 2
    assert window_bounds(30 * SR, max_window_samples=max_w, min_window_samples=min_w) == [(0, 30 * SR)]
    assert window_bounds(31 * SR, max_window_samples=max_w, min_window_samples=min_w) == [
        (0, 372_000),
        (372_000, 744_000),
    ]  # two 15.5 s windows, no 1 s tail
    assert window_bounds(60 * SR + 1, max_window_samples=max_w, min_window_samples=min_w) == [
        (0, 480_001),
        (480_001, 960_001),
        (960_001, 1_440_001),
    ]
    assert window_bounds(min_w, max_window_samples=max_w, min_window_samples=min_w) == [(0, min_w)]


def test_window_defaults_come_from_the_constants():
    assert window_bounds(31 * SR) == [(0, 372_000), (372_000, 744_000)]
    # The default minimum is one MERT frame (400 samples at 24 kHz), stated in seconds and samples.
    assert window_bounds(400) == [(0, 400)] and window_bounds(1200) == [(0, 1200)]
    with pytest.raises(AudioError) as err:
        window_bounds(399)
    assert str(err.value) == "audio is 0.017 s long (399 samples at 24 kHz); at least 400 samples (0.017 s) are needed"
    with pytest.raises(AudioError) as err:
        window_bounds(round(0.01 * SR))
    assert str(err.value) == "audio is 0.010 s long (240 samples at 24 kHz); at least 400 samples (0.017 s) are needed"


def test_too_short_for_a_window():
    with pytest.raises(AudioError, match=r"^audio is 0\.000 s long \(0 samples at 24 kHz\); at least 12000 samples "
                                         r"\(0\.500 s\) are needed$"):
        window_bounds(0, max_window_samples=30 * SR, min_window_samples=SR // 2)
    with pytest.raises(AudioError, match=r"\(0 samples at 24 kHz\); at least 1 samples"):  # min 0: still not empty
        window_bounds(0, max_window_samples=30 * SR, min_window_samples=0)


@pytest.mark.parametrize(("max_w", "min_w"), [(0, 0), (10, 20), (10, -1)])
def test_invalid_window_sizes(max_w, min_w):
    with pytest.raises(ValueError, match="max_window_samples"):
        window_bounds(100, max_window_samples=max_w, min_window_samples=min_w)


@given(
    max_w=st.integers(min_value=1, max_value=10**7),
    count=st.integers(min_value=1, max_value=200),
    fill=st.floats(min_value=0.0, max_value=1.0),
    min_w=st.integers(min_value=0, max_value=10**7),
)
def test_window_properties(max_w, count, fill, min_w):
    # n spans every count of windows up to 200 (a bounded run time), anywhere within its range
    n = (count - 1) * max_w + 1 + round(fill * (max_w - 1))
    min_w = min(min_w, max_w, n)
    bounds = window_bounds(n, max_window_samples=max_w, min_window_samples=min_w)
    lengths = [stop - start for start, stop in bounds]
    assert bounds[0][0] == 0 and bounds[-1][1] == n  # covers exactly
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))  # contiguous
    assert max(lengths) <= max_w
    assert len(bounds) == count == -(-n // max_w)  # the fewest windows that fit
    assert max(lengths) - min(lengths) <= 1 and min(lengths) >= 1


def test_seconds():
    assert seconds(SR) == 1.0
    assert seconds(SR * 3 // 2) == 1.5


def test_audio_module_does_not_import_torch():
    code = "import sys, mullama_sdk, mullama_sdk.audio; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
