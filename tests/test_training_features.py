"""The MERT feature cache: same numbers as the reference, resumable, stale entries recomputed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import training.recipes.features as features
from mullama_sdk.audio import load_audio
from mullama_sdk.constants import SAMPLE_RATE_HZ
from training.recipes.data import SILENCE_KEY, silence
from training.recipes.features import FeatureCache, clip_state_means, load_mert, update_feature_cache

ROOT = Path(__file__).parents[1]
CLIPS = ("music_24k_mono.wav", "music_44k_stereo.wav", "music_44k_stereo.ogg", "music_24k_mono_10s.wav")


@pytest.fixture(scope="module")
def mert(tiny_assets):
    return load_mert(tiny_assets.mert_dir)


def _clips(assets, names=CLIPS):
    out = {n: assets.audio[n] for n in names}
    out[SILENCE_KEY] = None
    return out


def test_features_equal_the_reference_state_means(tiny_assets, reference_model, mert):
    for name in ("music_24k_mono.wav", "music_44k_stereo.wav"):
        got, frames = clip_state_means(mert, tiny_assets.audio[name])
        want, want_frames = reference_model.state_means(load_audio(tiny_assets.audio[name]))
        assert frames == want_frames
        np.testing.assert_array_equal(got, want.detach().numpy())
    # Windowed (two windows of a 10 s clip) = the reference's windows, frame-weighted.
    got, _ = clip_state_means(mert, tiny_assets.audio["music_24k_mono_10s.wav"], max_window_seconds=4.0)
    want, _ = reference_model.state_means(load_audio(tiny_assets.audio["music_24k_mono_10s.wav"]), max_window_seconds=4.0)
    np.testing.assert_array_equal(got, want.detach().numpy())
    got, _ = clip_state_means(mert, silence(), sample_rate=SAMPLE_RATE_HZ)
    np.testing.assert_array_equal(got, reference_model.state_means(silence())[0].detach().numpy())


def test_interrupted_build_resumes(tiny_assets, mert, tmp_path, monkeypatch):
    clips = _clips(tiny_assets)
    full = tmp_path / "full"
    report = update_feature_cache(full, mert, clips, progress=False)
    assert (report.n_computed, report.n_reused) == (5, 0)

    calls = []
    real = features.clip_state_means

    def crash_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(features, "clip_state_means", crash_on_third)
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        update_feature_cache(part, mert, clips, progress=False, index_every_seconds=1e9)
    assert len(json.loads((part / "index.json").read_text())["clips"]) == 2  # saved on the way out
    monkeypatch.setattr(features, "clip_state_means", real)
    report = update_feature_cache(part, mert, clips, progress=False)
    assert (report.n_computed, report.n_reused) == (3, 2)
    a, b = FeatureCache(full), FeatureCache(part)
    for name in clips:
        np.testing.assert_array_equal(a.get(name), b.get(name))
        assert a.n_frames(name) == b.n_frames(name)

    # A kill after a row was written but before the index named it: the row is simply recomputed.
    index = json.loads((part / "index.json").read_text())
    victim = next(k for k, v in index["clips"].items() if v["row"] == max(e["row"] for e in index["clips"].values()))
    del index["clips"][victim]
    (part / "index.json").write_text(json.dumps(index))
    report = update_feature_cache(part, mert, clips, progress=False)
    assert (report.n_computed, report.n_reused) == (1, 4)
    np.testing.assert_array_equal(FeatureCache(part).get(victim), a.get(victim))


def test_changed_audio_or_mert_is_recomputed(tiny_assets, mert, tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    for name in CLIPS[:2]:
        shutil.copy(tiny_assets.audio[name], audio / name)
    clips = {n: audio / n for n in CLIPS[:2]}
    cache = tmp_path / "cache"
    update_feature_cache(cache, mert, clips, progress=False)
    before = np.array(FeatureCache(cache).get(CLIPS[0]))
    shutil.copy(tiny_assets.audio["music_24k_mono_10s.wav"], audio / CLIPS[0])  # same name, new content
    report = update_feature_cache(cache, mert, clips, progress=False)
    assert (report.n_computed, report.n_reused) == (1, 1)
    now = FeatureCache(cache)
    want, _ = clip_state_means(mert, tiny_assets.audio["music_24k_mono_10s.wav"])
    np.testing.assert_array_equal(now.get(CLIPS[0]), want)
    assert not np.array_equal(now.get(CLIPS[0]), before)
    assert len(now.clips) == 2 and (cache / "features.f32").stat().st_size == 2 * 4 * mert.n_states * mert.dim

    other = load_mert(tiny_assets.mert_dir)
    with torch.no_grad():
        other.hubert.encoder.layer_norm.bias.add_(0.1)
    report = update_feature_cache(cache, other, clips, progress=False)
    assert report.n_computed == 2  # another MERT: every entry is stale


def test_features_cli(tiny_assets, tmp_path, capsys):
    from training.cli import main

    args = ["features", "--data", str(ROOT / "training/configs/tiny_musicqa.json"),
            "--audio-dir", str(tiny_assets.root / "audio"), "--mert-dir", str(tiny_assets.mert_dir),
            "--out", str(tmp_path / "cache"), "--no-progress"]
    assert main(args) == 0
    assert "4 clips: 4 computed, 0 reused" in capsys.readouterr().out
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert set(index["clips"]) == {"music_24k_mono.wav", "music_44k_stereo.wav", "music_24k_mono_10s.wav", SILENCE_KEY}
    assert all(len(e["sha256"]) == 64 for k, e in index["clips"].items() if k != SILENCE_KEY)
    assert main(args) == 0
    assert "0 computed, 4 reused" in capsys.readouterr().out
    assert main([*args[:-3], "--out", str(tmp_path / "c2"), "--audio-dir", str(tmp_path)]) == 2
    assert "audio file(s) not found" in capsys.readouterr().err
