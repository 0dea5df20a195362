"""Audio the runtime must take: 44.1 kHz stereo mp3/ogg/flac, arrays, bytes, and long files in bounded memory."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import soundfile as sf

from mullama_sdk.audio import STREAM_ABOVE_SECONDS, iter_windows, load_audio
from mullama_sdk.errors import AudioError


@pytest.fixture(scope="module")
def stereo(tiny_assets):
    data, sr = sf.read(tiny_assets.audio["music_44k_stereo.wav"], dtype="float32", always_2d=True)
    assert sr == 44100 and data.shape[1] == 2
    return data, sr


@pytest.mark.parametrize("fmt,subtype", [("MP3", "MPEG_LAYER_III"), ("OGG", "VORBIS"), ("FLAC", "PCM_16")])
def test_compressed_stereo_inputs(exact_captioner, stereo, tmp_path, fmt, subtype):
    data, sr = stereo
    path = tmp_path / f"clip.{fmt.lower()}"
    sf.write(path, data, sr, format=fmt, subtype=subtype)
    vec = exact_captioner.encode(path)
    ref = exact_captioner.encode(data, sample_rate=sr)
    # Lossy codecs change the samples a little; the music vectors must stay close to the PCM ones.
    cos = np.sum(vec.injection * ref.injection, -1) / (
        np.linalg.norm(vec.injection, axis=-1) * np.linalg.norm(ref.injection, axis=-1))
    assert cos.min() > 0.98, cos
    cap = exact_captioner.caption(path, max_new_tokens=6, temperature=0)
    assert len(cap.tokens) > 0 and cap.timings.audio_s == pytest.approx(len(data) / sr, abs=0.06)


def test_array_bytes_and_path_agree(exact_captioner, tiny_assets, stereo):
    data, sr = stereo
    path = tiny_assets.audio["music_44k_stereo.wav"]
    a = exact_captioner.encode(path).injection
    b = exact_captioner.encode(path.read_bytes()).injection
    c = exact_captioner.encode(data, sample_rate=sr).injection
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    with pytest.raises(AudioError, match="sample_rate"):
        exact_captioner.encode(data)


def test_ten_minute_file_streams_in_bounded_memory(exact_captioner, tmp_path):
    """A 10-minute file: decoded block by block; traced memory stays far below the decoded size."""
    sr, minutes = 24000, 10
    path = tmp_path / "long.wav"
    rng = np.random.default_rng(0)
    with sf.SoundFile(path, "w", samplerate=sr, channels=1, subtype="PCM_16") as f:
        for i in range(minutes * 6):  # 10 s blocks, never the whole file in memory
            t = np.arange(10 * sr) / sr + 10 * i
            f.write((0.3 * np.sin(2 * np.pi * (220 + 20 * (i % 7)) * t) + 0.05 * rng.standard_normal(len(t)))
                    .astype(np.float32))
    assert minutes * 60 > STREAM_ABOVE_SECONDS
    decoded_bytes = minutes * 60 * sr * 4
    tracemalloc.start()
    try:
        vec = exact_captioner.encode(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert vec.duration_s == pytest.approx(600, abs=1e-3)
    assert len(vec.window_bounds_s) == 20  # 30 s windows
    assert peak < decoded_bytes / 4, f"peak {peak / 2**20:.1f} MiB for {decoded_bytes / 2**20:.0f} MiB of audio"
    # Streaming yields exactly the windows of the whole-file path (24 kHz: no resampling involved).
    whole = load_audio(path)
    for start, stop, window in iter_windows(path):
        np.testing.assert_array_equal(window, whole[start:stop])
    cap = exact_captioner.caption(vec, max_new_tokens=4, temperature=0)
    assert cap.timings.audio_s == pytest.approx(600, abs=1e-3)


def test_streamed_resampling_matches_whole_file(tmp_path, monkeypatch):
    """44.1 kHz stereo streamed through soxr's stream resampler ~ the one-shot resampler."""
    import mullama_sdk.audio as audio

    sr = 44100
    rng = np.random.default_rng(1)
    data = (0.2 * rng.standard_normal((sr * 25, 2))).astype(np.float32)
    path = tmp_path / "s.flac"
    sf.write(path, data, sr)
    monkeypatch.setattr(audio, "STREAM_ABOVE_SECONDS", 5.0)
    monkeypatch.setattr(audio, "STREAM_BLOCK_SECONDS", 3.0)
    windows = list(iter_windows(path, max_window_seconds=10.0))
    whole = load_audio(path)
    streamed = np.concatenate([w for _, _, w in windows])
    assert abs(len(streamed) - len(whole)) <= 2
    n = min(len(streamed), len(whole))
    assert np.abs(streamed[:n] - whole[:n]).max() < 1e-3
    assert [b - a for a, b, _ in windows] == [len(w) for _, _, w in windows]


def test_segments_have_times_and_captions(tiny_bundle, tiny_assets):
    from mullama_sdk import Captioner

    clip = tiny_assets.audio["music_24k_mono_10s.wav"]
    with Captioner.from_pretrained(tiny_bundle, quant="f32", encoder_precision="fp32", exact=True,
                                   max_window_seconds=4.0) as cap:
        res = cap.caption(clip, max_new_tokens=5, temperature=0, segments=True)
        whole = cap.caption(clip, max_new_tokens=5, temperature=0)
        first = cap.caption(load_audio(clip)[:80000], sample_rate=24000, max_new_tokens=5, temperature=0)
    assert [(round(s.start_s, 3), round(s.end_s, 3)) for s in res.segments] == [
        (0.0, 3.333), (3.333, 6.667), (6.667, 10.0)]
    assert all(len(s.tokens) == 5 for s in res.segments)
    assert res.tokens == whole.tokens
    assert res.segments[0].tokens == first.tokens  # the first window captioned on its own
