"""Short audio down to one MERT frame (400 samples at 24 kHz, 1/60 s): one-shot samples (drum hits, stabs of
50-500 ms) are encoded exactly and captioned; shorter clips get a one-line AudioError in seconds and samples; a
bundle's own stated minimum is honoured (older bundles say 0.5 s)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import mullama_sdk.audio as audio_module
from mullama_sdk import AudioError, BundleError, Captioner
from mullama_sdk.audio import iter_windows, load_audio
from mullama_sdk.constants import MIN_WINDOW_SAMPLES, SAMPLE_RATE_HZ
from mullama_sdk.manifest import MANIFEST_NAME, load_manifest, parse_manifest

ROOT = Path(__file__).resolve().parents[1]
SR = SAMPLE_RATE_HZ
DEMO_BUNDLE = ROOT / "examples" / "demo_bundle"
TOO_SHORT_10MS = "audio is 0.010 s long (240 samples at 24 kHz); at least 400 samples (0.017 s) are needed"


def _hit(n: int, rate: int = SR, channels: int = 1, seed: int = 0) -> np.ndarray:
    """A drum-hit-like one-shot of ``n`` frames: a decaying noise burst over a low tone."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)[:, None] / rate
    x = np.exp(-t / 0.015) * (0.5 * rng.standard_normal((n, channels)) + 0.4 * np.sin(2 * np.pi * 90 * t))
    x = x.astype(np.float32)
    return x[:, 0] if channels == 1 else x


def _frames(n_samples: int) -> int:
    return (n_samples - MIN_WINDOW_SAMPLES) // 320 + 1


# ------------------------------------------------------------------------------------- the minimum
def test_minimum_is_the_receptive_field_of_merts_conv_stack(reference_model):
    """400 samples = one frame of the conv feature encoder (kernels 10,3,3,3,3,2,2, strides 5,2,2,2,2,2,2)."""
    from export.graphs import ENCODER_GRAPH
    from export.trt import waveform_profile

    cfg = reference_model.mert.hubert.config
    field, hop = 1, 1
    for k, s in zip(reversed(cfg.conv_kernel), reversed(cfg.conv_stride), strict=True):
        field = (field - 1) * s + k
        hop *= s
    assert (field, hop) == (MIN_WINDOW_SAMPLES, 320) == (400, 320)
    assert ENCODER_GRAPH.dynamic["n_samples"].min == MIN_WINDOW_SAMPLES
    assert waveform_profile().min == MIN_WINDOW_SAMPLES
    extract = reference_model.mert.hubert.feature_extractor
    with torch.no_grad():
        for n in (400, 719, 720, 1200, 24_000):
            assert extract(torch.zeros(1, n)).shape[-1] == _frames(n), n
        with pytest.raises(RuntimeError):  # one sample less and the last conv has nothing to slide over
            extract(torch.zeros(1, 399))


def test_positional_conv_of_a_single_frame(reference_model):
    """HuBERT's positional conv (kernel K, padding K//2, groups, weight norm) on one frame sees only its centre
    tap: pos = act(W[:, :, K//2] h + b) per group. Computed by hand in float64 against the module."""
    hub = reference_model.mert.hubert
    pos = hub.encoder.pos_conv_embed
    with torch.no_grad():
        h = hub.feature_projection(hub.feature_extractor(torch.from_numpy(_hit(400))[None]).transpose(1, 2))
        h = h[0] if isinstance(h, tuple) else h
        got = pos(h)[0, 0].double().numpy()
        conv = pos.conv
        w, b = conv.weight.double().numpy(), conv.bias.double().numpy()
    assert h.shape[1] == 1
    k, groups = w.shape[-1], conv.groups
    per = w.shape[0] // groups
    x = h[0, 0].double().numpy()
    lin = np.concatenate([w[g * per:(g + 1) * per, :, k // 2] @ x[g * per:(g + 1) * per] for g in range(groups)]) + b
    act = hub.config.feat_extract_activation
    assert act == "gelu"
    want = torch.nn.functional.gelu(torch.from_numpy(lin)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_torch_reference_on_one_frame_equals_hubert(reference_model):
    """The reference's own state walk equals transformers' HubertModel forward on 400 and 1200 samples."""
    mert = reference_model.mert
    for n in (400, 1200):
        wave = torch.from_numpy(_hit(n, seed=n))[None]
        with torch.no_grad():
            states = mert.hidden_states(wave)
            ref = mert.hubert(wave, output_hidden_states=True)
            means, frames = mert(wave)
        assert frames == _frames(n) and all(s.shape[1] == frames for s in states)
        torch.testing.assert_close(states[-1], ref.last_hidden_state)
        for i, s in enumerate(states[:-1]):
            torch.testing.assert_close(s, ref.hidden_states[i])
        assert torch.isfinite(means).all()
    means, frames = reference_model.state_means(_hit(400))
    assert frames == 1 and torch.isfinite(means).all()
    with pytest.raises(AudioError, match=r"\(399 samples at 24 kHz\); at least 400 samples"):
        reference_model.state_means(_hit(399))


# ------------------------------------------------------------------------------------- resampling
@pytest.mark.parametrize("rate", [8000, 11025, 22050, 44100, 48000, 96000, 192000])
def test_short_clips_resample_and_every_way_in_agrees(rate, tmp_path, monkeypatch):
    """The minimum is counted at 24 kHz after resampling (soxr, one shot). For a source at another rate the
    shortest clip accepted is the one that resamples to 400 samples; arrays, files and the streaming decoder
    (forced on here) give the same windows and the same verdict."""
    n50 = round(0.05 * rate)
    assert abs(len(load_audio(_hit(n50, rate, 2), rate)) - 1200) <= 1  # 50 ms stays 50 ms
    # The shortest source accepted: soxr's output length is n * 24000 / rate, rounded.
    lengths = {n: len(load_audio(np.zeros(n, np.float32), rate)) for n in range(rate // SR + 1, round(0.02 * rate))}
    shortest = min(n for n, m in lengths.items() if m >= MIN_WINDOW_SAMPLES)
    assert abs(shortest * SR / rate - MIN_WINDOW_SAMPLES) <= 0.5 + SR / rate
    assert lengths[shortest - 1] < MIN_WINDOW_SAMPLES
    for n in (shortest - 1, shortest, n50):
        x = _hit(n, rate, 2, seed=n)
        path = tmp_path / f"clip{n}.wav"
        sf.write(path, x, rate, subtype="FLOAT")
        outcomes = []
        for stream_above in (audio_module.STREAM_ABOVE_SECONDS, 0.0):
            monkeypatch.setattr(audio_module, "STREAM_ABOVE_SECONDS", stream_above)
            for source, sr in ((x, rate), (path, None), (path.read_bytes(), None)):
                try:
                    outcomes.append(list(iter_windows(source, sr)))
                except AudioError as e:
                    outcomes.append(str(e))
        first, m = outcomes[0], len(load_audio(x, rate))
        if n < shortest:
            assert first == f"audio is {m / SR:.3f} s long ({m} samples at 24 kHz); at least 400 " \
                            f"samples (0.017 s) are needed"
            assert all(o == first for o in outcomes), outcomes
        else:
            assert m >= MIN_WINDOW_SAMPLES and [(a, b) for a, b, _ in first] == [(0, m)]
            for o in outcomes[1:]:
                assert [(a, b) for a, b, _ in o] == [(0, m)]
                np.testing.assert_array_equal(o[0][2], first[0][2])


# ------------------------------------------------------------------------------------- manifest
def test_new_bundle_states_the_400_sample_minimum_exactly(tiny_bundle):
    from export.verify import check_windows

    raw = json.loads((tiny_bundle / MANIFEST_NAME).read_text())
    audio = raw["audio"]
    assert audio["min_window_samples"] == 400 and isinstance(audio["min_window_samples"], int)
    assert audio["min_window_seconds"] == 400 / 24000 and round(audio["min_window_seconds"] * 24000) == 400
    m = load_manifest(tiny_bundle)
    assert (m.min_window_samples, m.min_window_seconds) == (400, 400 / 24000)
    # Every exported bundle is verified on short input too: 400 samples and a 50 ms clip, every precision.
    lengths = [len(w) for w in check_windows()]
    assert {400, 1200} <= set(lengths)
    for p in ("fp32", "fp16", "int8"):
        row = m.verification[f"encoder/{p}"]
        assert row["passed"] and row["note"] == f"{len(lengths)} inputs", row


def _raw(tiny_bundle) -> dict:
    return json.loads((tiny_bundle / MANIFEST_NAME).read_text())


@pytest.mark.parametrize(("audio", "samples", "seconds"), [
    ({"min_window_seconds": 0.5}, 12_000, 0.5),                                   # bundles before the change
    ({"min_window_samples": 400}, 400, 400 / 24000),                              # samples only
    ({"min_window_samples": 400, "min_window_seconds": 400 / 24000}, 400, 400 / 24000),
    ({"min_window_samples": 400, "min_window_seconds": 0.01667}, 400, 0.01667),   # rounds to the same sample
    ({"min_window_samples": 1200, "min_window_seconds": 0.05}, 1200, 0.05),
])
def test_manifest_minimum_forms(tiny_bundle, audio, samples, seconds):
    raw = _raw(tiny_bundle)
    raw["audio"] = {"sample_rate": 24000, "max_window_seconds": 30.0, **audio}
    m = parse_manifest(raw)
    assert (m.min_window_samples, m.min_window_seconds) == (samples, seconds)


@pytest.mark.parametrize(("audio", "match"), [
    ({"min_window_samples": 400, "min_window_seconds": 0.5}, r"min_window_samples 400 and min_window_seconds 0\.5 "
                                                             r"disagree \(at 24000 Hz 0\.5 s is 12000 samples\)"),
    ({"min_window_samples": 400.0}, "'min_window_samples' has type float"),
    ({"min_window_samples": True}, "'min_window_samples' has type bool"),
    ({"min_window_samples": -1}, "min_window_samples must be >= 0"),
    ({"min_window_seconds": -0.5}, "min_window_seconds must be a number >= 0"),
    ({"min_window_seconds": float("nan")}, "min_window_seconds must be a number >= 0"),
    ({"min_window_samples": 720_001}, "window"),
    ({}, "missing field 'min_window_seconds'"),
])
def test_manifest_minimum_errors(tiny_bundle, audio, match):
    raw = _raw(tiny_bundle)
    raw["audio"] = {"sample_rate": 24000, "max_window_seconds": 30.0, **audio}
    with pytest.raises(BundleError, match=match):
        parse_manifest(raw)


# ------------------------------------------------------------------------------------- runtime
def test_50_ms_one_shot_is_captioned_like_the_reference(exact_captioner, reference_model, tmp_path):
    """A 50 ms stereo hit at 44.1 kHz: 1200 samples at 24 kHz, 3 frames, the reference's vectors and tokens."""
    path = tmp_path / "hit.wav"
    sf.write(path, _hit(2205, 44100, 2), 44100)
    vec = exact_captioner.encode(path)
    assert vec.n_frames == 3 and vec.duration_s == pytest.approx(0.05) and vec.window_bounds_s == ((0.0, 0.05),)
    with torch.no_grad():
        means, frames = reference_model.state_means(load_audio(path))
        a = reference_model.music_query(means)
        d = reference_model.injection_vectors(a).numpy()
    assert frames == 3
    np.testing.assert_allclose(vec.injection, d, rtol=1e-4, atol=1e-5 * np.abs(d).max())
    got = exact_captioner.caption(path, max_new_tokens=16, temperature=0)
    ref = reference_model.generate(path, None, max_new_tokens=16, temperature=0)
    assert list(got.tokens) == ref.tokens and len(got.tokens) >= 1
    assert got.timings.audio_s == pytest.approx(0.05)


def test_exactly_400_samples_work_and_399_do_not(exact_captioner, tmp_path):
    x = _hit(400, seed=3)
    sf.write(tmp_path / "400.wav", x, SR, subtype="FLOAT")
    sf.write(tmp_path / "399.wav", x[:399], SR, subtype="FLOAT")
    by_array = exact_captioner.encode(x, sample_rate=SR)
    by_file = exact_captioner.encode(tmp_path / "400.wav")
    assert by_array.n_frames == by_file.n_frames == 1 and by_array.duration_s == 400 / SR
    np.testing.assert_array_equal(by_array.injection, by_file.injection)
    assert np.isfinite(by_array.injection).all()
    assert exact_captioner.min_window_samples == 400
    message = "audio is 0.017 s long (399 samples at 24 kHz); at least 400 samples (0.017 s) are needed"
    for source, sr in ((x[:399], SR), (tmp_path / "399.wav", None)):
        with pytest.raises(AudioError) as err:
            exact_captioner.encode(source, sample_rate=sr)
        assert str(err.value) == message
        with pytest.raises(AudioError, match=r"^audio is 0\.017 s long \(399 samples"):
            exact_captioner.caption(source, sample_rate=sr, max_new_tokens=2)


def test_10_ms_gets_the_one_line_error(exact_captioner):
    with pytest.raises(AudioError) as err:
        exact_captioner.encode(_hit(240), sample_rate=SR)
    assert str(err.value) == TOO_SHORT_10MS
    with pytest.raises(AudioError) as err:  # 10 ms at 48 kHz: the same 240 samples after resampling
        exact_captioner.caption(_hit(480, 48000, 2), sample_rate=48000, max_new_tokens=2)
    assert str(err.value) == TOO_SHORT_10MS


def test_an_older_bundle_keeps_its_own_minimum(tiny_bundle, tmp_path):
    """A manifest saying min_window_seconds 0.5 (and nothing about samples) is an encoder exported and verified
    for >= 0.5 s only: the runtime keeps refusing shorter clips, with the same clear error."""
    old = tmp_path / "old"
    shutil.copytree(tiny_bundle, old)
    raw = json.loads((old / MANIFEST_NAME).read_text())
    del raw["audio"]["min_window_samples"]
    raw["audio"]["min_window_seconds"] = 0.5
    (old / MANIFEST_NAME).write_text(json.dumps(raw, indent=2))
    with Captioner.from_pretrained(old, quant="f32", encoder_precision="fp32", n_threads=2) as cap:
        assert cap.min_window_samples == 12_000
        with pytest.raises(AudioError) as err:
            cap.encode(_hit(1200), sample_rate=SR)
        assert str(err.value) == ("audio is 0.050 s long (1200 samples at 24 kHz); at least 12000 samples "
                                  "(0.500 s) are needed")
        with pytest.raises(AudioError, match=r"\(11999 samples at 24 kHz\); at least 12000 samples"):
            cap.encode(_hit(11_999), sample_rate=SR)
        assert cap.encode(_hit(12_000), sample_rate=SR).n_frames == _frames(12_000)


def test_demo_bundle_honours_its_stated_minimum():
    """The committed demo bundle, whatever minimum it states (0.5 s until it is re-exported, 400 samples
    after): a 50 ms clip is refused with the clear error exactly when the bundle says it is too short."""
    minimum = load_manifest(DEMO_BUNDLE).min_window_samples
    assert minimum >= MIN_WINDOW_SAMPLES
    hit = _hit(1200)
    with Captioner.from_pretrained(DEMO_BUNDLE, n_threads=2) as cap:
        assert cap.min_window_samples == minimum
        if len(hit) < minimum:
            with pytest.raises(AudioError) as err:
                cap.caption(hit, sample_rate=SR, max_new_tokens=2)
            assert str(err.value) == (f"audio is 0.050 s long (1200 samples at 24 kHz); at least {minimum} "
                                      f"samples ({minimum / SR:.3f} s) are needed")
        else:
            assert cap.caption(hit, sample_rate=SR, max_new_tokens=2, temperature=0).timings.n_tokens >= 1
        with pytest.raises(AudioError, match=rf"\({minimum - 1} samples at 24 kHz\); at least {minimum} samples"):
            cap.encode(_hit(minimum - 1), sample_rate=SR)
        assert cap.encode(_hit(minimum), sample_rate=SR).n_frames == _frames(minimum)


# ------------------------------------------------------------------------------------- command line
def _caption_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mullama_sdk", "caption", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_cli_captions_a_50_ms_file(tiny_bundle, tmp_path):
    path = tmp_path / "stab.wav"
    sf.write(path, _hit(2400, 48000, 2), 48000)
    r = _caption_cli(str(path), "--bundle", str(tiny_bundle), "--quant", "f32", "--encoder-precision", "fp32",
                     "--max-new-tokens", "4", "--temperature", "0", "--json")
    assert r.returncode == 0, r.stderr
    (line,) = r.stdout.splitlines()
    rec = json.loads(line)
    assert rec["file"] == str(path) and len(rec["tokens"]) >= 1
    assert rec["timings"]["audio_s"] == pytest.approx(0.05)


def test_cli_10_ms_file_is_a_one_line_error(tiny_bundle, tmp_path):
    path = tmp_path / "click.wav"
    sf.write(path, _hit(240), SR)
    r = _caption_cli(str(path), "--bundle", str(tiny_bundle), "--quant", "f32", "--encoder-precision", "fp32",
                     "--max-new-tokens", "4")
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr.splitlines() == [f"mullama: error: {path}: {TOO_SHORT_10MS}"], r.stderr
