"""Runtime behaviour: limits, cancellation, threads, lifetime."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from mullama_sdk import Captioner, ContextLengthError


@pytest.fixture(scope="module")
def cap(tiny_bundle):
    with Captioner.from_pretrained(tiny_bundle, n_ctx=1024, n_threads=1) as c:
        yield c


@pytest.fixture(scope="module")
def clip(tiny_assets):
    return tiny_assets.audio["music_24k_mono.wav"]


def test_context_length_is_checked(tiny_bundle, clip):
    with Captioner.from_pretrained(tiny_bundle, n_ctx=64) as small:
        n_prompt = len(small.caption(clip, max_new_tokens=0).prompt_tokens)
        fits = small.n_ctx - n_prompt
        with pytest.raises(ContextLengthError, match=f"exceed the context of {small.n_ctx} tokens"):
            small.caption(clip, max_new_tokens=fits + 1)
        assert len(small.caption(clip, max_new_tokens=fits, temperature=0).tokens) <= fits
        with pytest.raises(ContextLengthError):
            small.caption(clip, question="a very long question " * 200, max_new_tokens=1)


def test_max_new_tokens_and_bad_arguments(cap, clip):
    for n in (0, 1, 7):
        res = cap.caption(clip, max_new_tokens=n, temperature=0)
        assert len(res.tokens) <= n and (res.stop_reason == "eos" or len(res.tokens) == n)
    with pytest.raises(ValueError, match="max_new_tokens"):
        cap.caption(clip, max_new_tokens=-1)
    with pytest.raises(ValueError, match="temperature"):
        cap.caption(clip, temperature=-1)
    with pytest.raises(ValueError, match="question"):
        cap.caption(clip, question="   ")


def test_stop_callback_and_cancel_end_within_one_token(cap, clip):
    seen = []

    def stop():
        seen.append(1)
        return len(seen) >= 5

    res = cap.caption(clip, max_new_tokens=200, temperature=0, stop=stop)
    assert res.stop_reason == "stopped" and len(res.tokens) == 5

    def cancel_after_3():
        seen.append(1)
        if len(seen) >= 8:
            cap.cancel()
        return False

    res = cap.caption(clip, max_new_tokens=200, temperature=0, stop=cancel_after_3)
    assert res.stop_reason == "cancelled" and len(res.tokens) == 3
    # The next call is not affected by the earlier cancel, and the KV cache is consistent.
    again = cap.caption(clip, max_new_tokens=10, temperature=0)
    assert again.stop_reason in ("eos", "max_new_tokens") and len(again.tokens) == 10


def test_cancel_from_another_thread(cap, clip):
    started = threading.Event()
    pieces = []

    def consume():
        for piece in cap.caption_stream(clip, max_new_tokens=400, temperature=0):
            pieces.append(piece)
            started.set()

    t = threading.Thread(target=consume)
    t.start()
    assert started.wait(30)
    cap.cancel()
    t.join(30)
    assert not t.is_alive()
    assert 0 < len(pieces) < 400


def test_shared_by_threads_gives_sequential_results(cap, tiny_assets):
    clips = [tiny_assets.audio[n] for n in ("music_24k_mono.wav", "music_44k_stereo.flac", "music_24k_mono_10s.wav")]
    jobs = [(clips[i % 3], q) for i in range(12) for q in (None, "What is the tempo?")][:12]
    sequential = [cap.caption(c, question=q, max_new_tokens=10, temperature=0).tokens for c, q in jobs]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda j: cap.caption(j[0], question=j[1], max_new_tokens=10,
                                                       temperature=0).tokens, jobs))
    assert threaded == sequential


def test_close_is_idempotent_and_final(tiny_bundle, clip):
    c = Captioner.from_pretrained(tiny_bundle)
    c.close()
    c.close()
    with pytest.raises(RuntimeError, match="closed"):
        c.caption(clip)


@pytest.mark.parametrize("precision,quant", [("fp32", "f32"), ("int8", "q4_k_m")])
def test_low_memory_sets_the_knobs_and_keeps_the_answers(tiny_bundle, clip, precision, quant):
    """low_memory=True: ORT without prepacking and arena, llama.cpp without repacking; same music vectors
    (to float rounding) and the same greedy caption."""
    out = {}
    for low in (False, True):
        with Captioner.from_pretrained(tiny_bundle, encoder_precision=precision, quant=quant, n_threads=1,
                                       low_memory=low) as c:
            opts = c._encoder._encoder.get_session_options()
            assert opts.enable_cpu_mem_arena is not low
            if low:
                assert opts.get_session_config_entry("session.disable_prepacking") == "1"
            else:  # ORT's default (prepacking on) is an absent key
                with pytest.raises(RuntimeError):
                    opts.get_session_config_entry("session.disable_prepacking")
            assert c._model.repack_weights is not low
            vec = c.encode(clip)
            out[low] = (vec, c.ask(vec, "Describe the audio", max_new_tokens=12, temperature=0).tokens)
    np.testing.assert_allclose(out[True][0].injection, out[False][0].injection, rtol=1e-4, atol=1e-5)
    assert out[True][1] == out[False][1]
