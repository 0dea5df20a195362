"""Cancellation and limits: cancel() ends every path (single, stream, batch, prefill, encoding) and leaves
no trace on the next call; max_new_tokens and the context length hold on every path; re-entrant calls
are refused instead of corrupting the KV cache.

Cancellation is made deterministic by calling ``cancel()`` from inside the work itself: from the Python
injection hook (which llama.cpp calls in the middle of a graph, so the abort callback is what stops it) or
from the encoder.
"""

from __future__ import annotations

import pytest

import native_bridge.hook as hook_module
from mullama_sdk import Captioner, ContextLengthError

GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def cap(tiny_bundle):
    with Captioner.from_pretrained(tiny_bundle, n_threads=1, batch_size=2) as c:
        yield c


@pytest.fixture(scope="module")
def pycap(tiny_bundle):
    """A Captioner whose music hook is the Python one: a place to call cancel() from inside llama_decode."""
    with Captioner.from_pretrained(tiny_bundle, n_threads=1, batch_size=2, hook_backend="python") as c:
        yield c


@pytest.fixture(scope="module")
def clips(tiny_assets):
    return [tiny_assets.audio[n] for n in ("music_24k_mono.wav", "music_44k_stereo.flac", "music_44k_stereo.ogg")]


@pytest.fixture
def cancel_inside_graph(monkeypatch):
    """``arm(cap, after=n)``: the n-th hooked graph node evaluated from now on calls ``cap.cancel()``.

    Returns a dict counting hooked nodes evaluated after the cancel (0 = the graph stopped right there).
    """
    original = hook_module._PythonState._inject
    state = {"cap": None, "countdown": -1, "after_cancel": 0, "cancelled": False}

    def inject(self, t):
        if state["cancelled"]:
            state["after_cancel"] += 1
        elif state["countdown"] > 0:
            state["countdown"] -= 1
            if state["countdown"] == 0:
                state["cancelled"] = True
                state["cap"].cancel()
        return original(self, t)

    monkeypatch.setattr(hook_module._PythonState, "_inject", inject)

    def arm(cap, after: int = 1):
        state.update(cap=cap, countdown=after, after_cancel=0, cancelled=False)
        return state

    return arm


def test_cancel_between_tokens_does_not_leak_into_the_next_call(cap, clips):
    """cancel() while a stream waits at a yield: the next caption must not inherit the abort request."""
    reference = cap.caption(clips[0], max_new_tokens=12, **GREEDY)
    stream = cap.caption_stream(clips[0], max_new_tokens=200, **GREEDY)
    next(stream)
    cap.cancel()
    rest = list(stream)
    assert len(rest) <= 1  # at most the text of the token already generated
    after = cap.caption(clips[0], max_new_tokens=12, **GREEDY)
    assert after.stop_reason == reference.stop_reason and after.tokens == reference.tokens
    batch = cap.caption_batch(clips[:2], max_new_tokens=12, **GREEDY)
    assert batch[0].tokens == reference.tokens


def test_cancel_before_a_call_is_ignored(cap, clips):
    cap.cancel()
    res = cap.caption(clips[0], max_new_tokens=5, **GREEDY)
    assert res.stop_reason in ("eos", "max_new_tokens") and len(res.tokens) == 5


def test_cancel_during_prefill_uses_llamas_abort_callback(pycap, clips, cancel_inside_graph):
    vec = pycap.encode(clips[0])
    question = "describe the rhythm section and the harmony in detail " * 30  # > n_batch: 2+ ubatches
    reference = pycap.caption(vec, question=question, max_new_tokens=6, **GREEDY)
    assert len(reference.prompt_tokens) > 512
    state = cancel_inside_graph(pycap, after=1)  # the first injected layer of the first ubatch
    res = pycap.caption(vec, question=question, max_new_tokens=6, **GREEDY)
    assert res.stop_reason == "cancelled" and res.tokens == ()
    # The graph stopped inside the first ubatch: the next injected layer was never evaluated.
    assert state["cancelled"] and state["after_cancel"] == 0
    again = pycap.caption(vec, question=question, max_new_tokens=6, **GREEDY)
    assert again.tokens == reference.tokens  # the half-filled KV cache was dropped


def test_cancel_during_batch_prefill_returns_cancelled_captions(pycap, clips, cancel_inside_graph):
    reference = pycap.caption_batch(clips[:2], max_new_tokens=6, **GREEDY)
    state = cancel_inside_graph(pycap, after=1)
    res = pycap.caption_batch(clips[:2], max_new_tokens=6, **GREEDY)  # used to raise InterruptedError
    assert state["after_cancel"] == 0
    assert [r.stop_reason for r in res] == ["cancelled", "cancelled"] and all(r.tokens == () for r in res)
    assert [r.tokens for r in pycap.caption_batch(clips[:2], max_new_tokens=6, **GREEDY)] == \
        [r.tokens for r in reference]


def test_cancel_during_batch_decode_ends_the_whole_batch(pycap, clips, cancel_inside_graph):
    """batch_size=2 and 5 clips = 3 llama.cpp batches: cancel() in the first ends all of them."""
    audios = [clips[i % 3] for i in range(5)]
    n_layers_hooked = 2
    cancel_inside_graph(pycap, after=n_layers_hooked * 4)  # prefill + 3 decode steps of the first batch
    res = pycap.caption_batch(audios, max_new_tokens=50, **GREEDY)
    assert [r.stop_reason for r in res] == ["cancelled"] * 5
    assert all(len(r.tokens) <= 3 for r in res[:2])
    assert all(r.tokens == () for r in res[2:])  # later batches were not decoded at all
    full = pycap.caption_batch(audios, max_new_tokens=3, **GREEDY)
    assert [r.stop_reason for r in full] == ["max_new_tokens"] * 5


def test_cancel_while_encoding_skips_generation(cap, clips, monkeypatch):
    encoder = cap._encoder
    original = encoder.window_means

    def window_means(window):
        cap.cancel()
        return original(window)

    monkeypatch.setattr(encoder, "window_means", window_means)
    res = cap.caption(clips[0], max_new_tokens=20, **GREEDY)
    assert res.stop_reason == "cancelled" and res.tokens == ()
    batch = cap.caption_batch(clips, max_new_tokens=20, **GREEDY)
    assert [r.stop_reason for r in batch] == ["cancelled"] * 3
    assert list(cap.caption_stream(clips[0], max_new_tokens=20, **GREEDY)) == []
    monkeypatch.undo()
    assert cap.caption(clips[0], max_new_tokens=4, **GREEDY).stop_reason == "max_new_tokens"


def test_stop_callback_in_a_stream_ends_within_one_token(cap, clips):
    seen = []
    pieces = list(cap.caption_stream(clips[1], max_new_tokens=100, stop=lambda: len(seen) >= 4 or seen.append(1),
                                     **GREEDY))
    ref = cap.caption(clips[1], max_new_tokens=5, **GREEDY)
    assert "".join(pieces) == ref.text


@pytest.mark.parametrize("n", [0, 1, 9])
def test_max_new_tokens_on_every_path(cap, clips, n):
    single = cap.caption(clips[0], max_new_tokens=n, **GREEDY)
    stream = "".join(cap.caption_stream(clips[0], max_new_tokens=n, **GREEDY))
    batch = cap.caption_batch(clips, max_new_tokens=n, **GREEDY)
    assert len(single.tokens) <= n and stream == single.text
    for r in batch:
        assert len(r.tokens) <= n and (r.stop_reason == "eos" or len(r.tokens) == n)
    assert batch[0].tokens == single.tokens


def test_context_length_on_every_path(tiny_bundle, clips):
    long_question = "tell me everything about this recording " * 120
    with Captioner.from_pretrained(tiny_bundle, n_ctx=256, n_threads=1, batch_size=2) as small:
        vec = small.encode(clips[0])
        with pytest.raises(ContextLengthError, match="exceed the context"):
            small.caption(vec, question=long_question, max_new_tokens=1)
        with pytest.raises(ContextLengthError, match="exceed the context"):
            next(small.caption_stream(vec, question=long_question, max_new_tokens=1))
        with pytest.raises(ContextLengthError, match="exceed the context"):
            small.caption_batch([vec, vec], questions=[None, long_question], max_new_tokens=1)
        with pytest.raises(ContextLengthError):
            small.caption(vec, max_new_tokens=10_000)
        # Nothing is left half-done: the same Captioner keeps working.
        assert len(small.caption(vec, max_new_tokens=3, **GREEDY).tokens) == 3


def test_reentrant_calls_are_refused_not_corrupting(cap, clips):
    """A stop callback (or a caption_stream loop body) calling the same Captioner in the same thread used to
    re-enter the single KV cache mid-generation (RLock) and derail the outer caption."""
    reference = cap.caption(clips[0], max_new_tokens=15, **GREEDY)
    errors = []

    def stop():
        try:
            cap.caption(clips[1], max_new_tokens=2, **GREEDY)
        except RuntimeError as e:
            errors.append(str(e))
        return False

    res = cap.caption(clips[0], max_new_tokens=15, stop=stop, **GREEDY)
    assert res.tokens == reference.tokens
    assert errors and "already generating" in errors[0]
    pieces, refused = [], []
    for piece in cap.caption_stream(clips[0], max_new_tokens=15, **GREEDY):
        pieces.append(piece)
        try:
            cap.caption_batch([clips[1]], max_new_tokens=2)
            refused.append(False)
        except RuntimeError as e:
            assert "already generating" in str(e)
            refused.append(True)
        cap.encode(clips[1])  # the encoder does not touch llama.cpp: allowed
    assert "".join(pieces) == reference.text
    # Refused while generating; only a last piece flushed after the generation ended may run it.
    assert refused[0] and all(refused[:-1])
