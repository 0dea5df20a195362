"""The runtime (ONNX Runtime + llama.cpp + hook) equals the torch reference, token for token.

Exact settings (f32 GGUF, fp32 graphs, no flash attention, F32 KV cache) on the tiny model.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mullama_sdk.audio import load_audio

ROOT = Path(__file__).parents[1]
QUESTIONS = [None, "What do you hear in the audio?", "What is the tempo?  Answer briefly.\nThanks"]


def _clips(assets):
    return [assets.audio[n] for n in ("music_24k_mono.wav", "music_44k_stereo.flac", "music_24k_mono_10s.wav")]


@pytest.mark.parametrize("question", QUESTIONS)
def test_greedy_tokens_equal_reference(exact_captioner, reference_model, tiny_assets, question):
    for clip in _clips(tiny_assets):
        ref = reference_model.generate(clip, question, max_new_tokens=48, temperature=0)
        got = exact_captioner.caption(clip, question=question, max_new_tokens=48, temperature=0)
        assert list(got.prompt_tokens) == ref.prompt_tokens
        assert list(got.tokens) == ref.tokens, f"{clip.name} / {question!r}"
        assert got.text == ref.text


def test_music_vectors_equal_reference(exact_captioner, reference_model, tiny_assets):
    for clip in _clips(tiny_assets):
        vec = exact_captioner.encode(clip)
        with torch.no_grad():
            means, frames = reference_model.state_means(load_audio(clip))
            a = reference_model.music_query(means)
            d = reference_model.injection_vectors(a).numpy()
        assert vec.n_frames == frames
        np.testing.assert_allclose(vec.injection, d, rtol=1e-4, atol=1e-5 * np.abs(d).max())
        np.testing.assert_allclose(vec.music_query, a[0].numpy(), rtol=1e-4, atol=1e-5)


def test_hooked_logits_equal_reference(exact_captioner, reference_model, tiny_assets):
    """The llama.cpp stage alone: hook vectors from torch, logits of every prompt position."""
    from mullama_sdk.llm import LlamaContext

    clip = tiny_assets.audio["music_24k_mono.wav"]
    with torch.no_grad():
        a = reference_model.music_query(reference_model.state_means(load_audio(clip))[0])
        d = reference_model.injection_vectors(a).numpy()
        prompt = reference_model.tokenizer.encode_prompt("Describe the audio in detail")
        ref = reference_model.logits(prompt, a).numpy()
        plain = reference_model.logits(prompt, None).numpy()
    cap = exact_captioner
    hook = cap._hook
    ctx = LlamaContext(cap._model, hook, n_ctx=128, exact=True)
    try:
        hook.set_clip_vectors(0, (list(cap.manifest.inject_layers), d))
        hook.use_single_clip(0)
        got = np.stack(ctx.decode(prompt, range(len(prompt)), [0] * len(prompt), [True] * len(prompt)))
    finally:
        ctx.close()
    assert np.abs(got - ref).max() <= 1e-4
    assert np.abs(ref - plain).max() > 1e-2, "the music must move the logits, or this test proves nothing"


def test_batch_equals_single_clip_results(exact_captioner, tiny_assets):
    clips = _clips(tiny_assets)
    questions = [None, "What is the tempo?", None]
    single = [exact_captioner.caption(c, question=q, max_new_tokens=24, temperature=0)
              for c, q in zip(clips, questions, strict=True)]
    batch = exact_captioner.caption_batch(clips, questions=questions, max_new_tokens=24, temperature=0)
    assert [b.tokens for b in batch] == [s.tokens for s in single]
    assert len({b.tokens for b in batch}) > 1, "different clips must give different captions"
    # More clips than batch_size (3): split into two llama.cpp batches.
    many = exact_captioner.caption_batch(clips + clips[:2], max_new_tokens=8, temperature=0)
    for m, c in zip(many, clips + clips[:2], strict=True):
        assert m.tokens == exact_captioner.caption(c, max_new_tokens=8, temperature=0).tokens


def test_sampling_is_seeded_and_batch_consistent(exact_captioner, tiny_assets):
    clip = tiny_assets.audio["music_24k_mono.wav"]
    a = exact_captioner.caption(clip, temperature=0.8, top_p=0.9, seed=11, max_new_tokens=16)
    b = exact_captioner.caption(clip, temperature=0.8, top_p=0.9, seed=11, max_new_tokens=16)
    c = exact_captioner.caption(clip, temperature=0.8, top_p=0.9, seed=12, max_new_tokens=16)
    assert a.tokens == b.tokens and a.tokens != c.tokens
    (batched,) = exact_captioner.caption_batch([clip], temperature=0.8, top_p=0.9, seed=11, max_new_tokens=16)
    assert batched.tokens == a.tokens


def test_questions_on_one_clip_reuse_vectors_and_kv(exact_captioner, tiny_assets):
    clip = tiny_assets.audio["music_44k_stereo.wav"]
    vec = exact_captioner.encode(clip)
    asked = [exact_captioner.ask(vec, q, max_new_tokens=12, temperature=0).tokens
             for q in ("Describe the audio", "What is the tempo?", "Describe the audio")]
    fresh = [exact_captioner.ask(clip, q, max_new_tokens=12, temperature=0).tokens
             for q in ("Describe the audio", "What is the tempo?", "Describe the audio")]
    assert asked == fresh
    assert asked[0] == asked[2]


def test_stream_joins_to_caption_text(exact_captioner, tiny_assets):
    clip = tiny_assets.audio["music_24k_mono.wav"]
    full = exact_captioner.caption(clip, max_new_tokens=40, temperature=0)
    pieces = list(exact_captioner.caption_stream(clip, max_new_tokens=40, temperature=0))
    assert "".join(pieces) == full.text
    assert len(pieces) > 1
    assert all("\ufffd" not in p or p in full.text for p in pieces)


def test_cli_json_equals_reference_cli(tiny_bundle, tiny_assets):
    clips = [str(c) for c in _clips(tiny_assets)[:2]]
    common = ["--max-new-tokens", "32", "--json"]
    sdk = subprocess.run([sys.executable, "-m", "mullama_sdk", "caption", *clips, "--bundle", str(tiny_bundle),
                          "--quant", "f32", "--encoder-precision", "fp32", "--exact", "--temperature", "0",
                          "--low-memory",  # changes memory, not answers
                          "--question", "What do you hear in the audio?", *common],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    ref = subprocess.run([sys.executable, "-m", "training.reference.greedy", "--checkpoint", str(tiny_assets.checkpoint),
                          "--llama-dir", str(tiny_assets.llama_dir), "--mert-dir", str(tiny_assets.mert_dir),
                          "--audio", *clips, "--question", "What do you hear in the audio?", *common],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    got = [json.loads(line) for line in sdk.stdout.splitlines()]
    want = [json.loads(line) for line in ref.stdout.splitlines()]
    assert [g["tokens"] for g in got] == [w["tokens"] for w in want]
    assert [g["prompt_tokens"] for g in got] == [w["prompt_tokens"] for w in want]
    assert all({"file", "text", "tokens", "prompt_tokens", "timings"} <= set(g) for g in got)


def test_cli_bad_input_is_one_line_error(tiny_bundle, tmp_path):
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"this is not audio at all" * 10)
    r = subprocess.run([sys.executable, "-m", "mullama_sdk", "caption", str(junk), "--bundle", str(tiny_bundle)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0
    assert "junk.wav" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "mullama_sdk", "caption", str(junk), "--bundle", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "no mullama.json" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "mullama_sdk", "caption", str(junk), "--bundle", str(tiny_bundle),
                        "--encoder-backend", "tensorrt"], capture_output=True, text=True, cwd=ROOT)
    # This machine has no GPU: forcing TensorRT is a one-line error naming why, not a traceback.
    assert r.returncode == 2 and "mullama: error:" in r.stderr and "Traceback" not in r.stderr
