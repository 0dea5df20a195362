"""native_bridge: the cb_eval injection hook against a float64 reference on a tiny random LLaMA.

Run: .venv/bin/python -m pytest tests/test_native_bridge.py -q

Tolerance: with flash attention off and an F32 KV cache llama.cpp matches the float64 reference to
~1e-6 (float32 noise); we assert <= 1e-4 max |delta logits|, while the injection itself moves logits
by O(1), so a missed or misplaced injection cannot pass.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

import native_bridge
from native_bridge import InjectionHook, NativeBridgeError, build
from testkit import llama_gguf as H

TOL = 1e-4
INJECT_LAYERS = (2, 3)  # layer 2: attn_out is the MUL_MAT; layer 3 has attn_output.bias -> ADD
N_PREFILL, N_STEPS = 6, 8
BACKENDS = ("native", "python")


# ----------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = H.TinyLlamaConfig(
        n_embd=64,
        n_layer=4,
        n_head=4,
        n_head_kv=4,
        n_ff=176,
        biases={"attn_output": (1, 3), "attn_q": (0, 2), "ffn_down": (3,)},
    )
    weights = H.random_weights(cfg, seed=1)
    path = H.write_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", cfg, weights)
    H.silence_llama_logs()
    model = H.load_model(path)
    rng = np.random.default_rng(7)
    clips = {c: {layer: 0.5 * rng.standard_normal(cfg.n_embd) for layer in INJECT_LAYERS} for c in (0, 1, 2)}
    seqs = [rng.integers(3, cfg.n_vocab, N_PREFILL + N_STEPS) for _ in range(3)]
    ref_cache: dict = {}

    def ref(seq: int, clip: int | None) -> np.ndarray:
        if (seq, clip) not in ref_cache:
            inj = clips[clip] if clip is not None else None
            ref_cache[seq, clip] = H.reference_logits(cfg, weights, seqs[seq], inj)
        return ref_cache[seq, clip]

    yield dict(cfg=cfg, model=model, clips=clips, seqs=seqs, ref=ref)
    llama_cpp.llama_model_free(model)


@pytest.fixture(scope="module")
def native_cache(tmp_path_factory):
    """A private build cache for this module (does not touch ~/.cache)."""
    return tmp_path_factory.mktemp("mucache")


def make_hook(tiny, backend, native_cache, clips=(0,)):
    cfg = tiny["cfg"]
    hook = InjectionHook(cfg.n_embd, cfg.n_layer, backend=backend, cache_dir=native_cache)
    for c in clips:
        hook.set_clip_vectors(c, tiny["clips"][c])
    return hook


def run_sequence(ctx, tokens, n_vocab, seq_id=0):
    """Prefill N_PREFILL tokens (all logits), then N_STEPS single-token decodes."""
    out = [H.decode(ctx, tokens[:N_PREFILL], range(N_PREFILL), [seq_id] * N_PREFILL, n_vocab=n_vocab)]
    for i in range(N_PREFILL, N_PREFILL + N_STEPS):
        out.append(H.decode(ctx, tokens[i : i + 1], [i], [seq_id], n_vocab=n_vocab))
    return np.concatenate(out)


def max_err(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max())


# ----------------------------------------------------------------------------------------------
# (a) (b) (c): one context, prefill + decode, clip switch, clear
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_injection_matches_reference(tiny, native_cache, backend):
    cfg, seq = tiny["cfg"], tiny["seqs"][0]
    hook = make_hook(tiny, backend, native_cache, clips=(0, 1))
    assert hook.backend == backend
    ctx = H.new_context(tiny["model"], hook)
    try:
        # (a) clip 0: prefill 6 + 8 decode steps
        hook.use_single_clip(0)
        got = run_sequence(ctx, seq, cfg.n_vocab)
        assert max_err(got, tiny["ref"](0, 0)) <= TOL
        assert max_err(got, tiny["ref"](0, None)) > 0.1  # the injection matters
        c = hook.counters
        assert c.injected_rows == len(INJECT_LAYERS) * (N_PREFILL + N_STEPS)
        assert c.ask_accepted == c.eval_calls == len(INJECT_LAYERS) * (1 + N_STEPS)
        assert c.ubatches == 1 + N_STEPS and c.skipped_nodes == c.unmapped_rows == 0

        # (b) switch to clip 1 on the same context after clearing the KV memory
        H.clear_memory(ctx)
        hook.use_single_clip(1)
        assert max_err(run_sequence(ctx, seq, cfg.n_vocab), tiny["ref"](0, 1)) <= TOL

        # (c) clear(): no injection at all
        H.clear_memory(ctx)
        hook.clear()
        hook.reset_counters()
        assert max_err(run_sequence(ctx, seq, cfg.n_vocab), tiny["ref"](0, None)) <= TOL
        assert hook.counters.ask_accepted == 0 and hook.counters.injected_rows == 0
        assert hook.counters.ask_calls > 0
    finally:
        llama_cpp.llama_free(ctx)
        hook.close()


def test_vectors_given_as_layer_ids_and_array(tiny, native_cache):
    cfg = tiny["cfg"]
    d = tiny["clips"][0]
    with InjectionHook(cfg.n_embd, cfg.n_layer, backend="native", cache_dir=native_cache) as hook:
        layers = list(INJECT_LAYERS)
        hook.set_clip_vectors(0, (layers, np.stack([d[layer] for layer in layers])))
        hook.use_single_clip(0)
        ctx = H.new_context(tiny["model"], hook)
        try:
            got = run_sequence(ctx, tiny["seqs"][0], cfg.n_vocab)
        finally:
            llama_cpp.llama_free(ctx)
    assert max_err(got, tiny["ref"](0, 0)) <= TOL


# ----------------------------------------------------------------------------------------------
# (d) several sequences/clips interleaved in one batch
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_ubatch", [64, 5])
def test_mixed_batch_equals_each_clip_alone(tiny, native_cache, backend, n_ubatch):
    """Seq 0 -> clip 0, seq 1 -> clip 1, seq 2 -> no injection; rows interleaved, one batch per
    step; n_ubatch=5 splits the prefill into ubatches 5+5+5+3 (the hook must move its row base)."""
    cfg, seqs = tiny["cfg"], tiny["seqs"]
    seq_clip = {0: 0, 1: 1, 2: -1}
    hook = make_hook(tiny, backend, native_cache, clips=(0, 1))
    ctx = H.new_context(tiny["model"], hook, n_ubatch=n_ubatch, n_seq_max=3, multi_clip=True)
    try:
        got = {s: [] for s in seq_clip}
        # interleaved prefill: row 3*i + s = sequence s, position i
        rows = [(s, i) for i in range(N_PREFILL) for s in seq_clip]
        hook.set_row_clips([seq_clip[s] for s, _ in rows])
        logits = H.decode(
            ctx,
            [seqs[s][i] for s, i in rows],
            [i for _, i in rows],
            [s for s, _ in rows],
            n_vocab=cfg.n_vocab,
        )
        for (s, _), row in zip(rows, logits):
            got[s].append(row)
        if n_ubatch == 5:
            assert hook.counters.ubatches == 4
        for i in range(N_PREFILL, N_PREFILL + N_STEPS):
            order = [2, 0, 1] if i % 2 else [0, 1, 2]  # vary the row order between steps
            hook.set_row_clips([seq_clip[s] for s in order])
            logits = H.decode(ctx, [seqs[s][i] for s in order], [i] * 3, order, n_vocab=cfg.n_vocab)
            for s, row in zip(order, logits):
                got[s].append(row)
        for s, clip in seq_clip.items():
            ref = tiny["ref"](s, None if clip < 0 else clip)
            assert max_err(np.stack(got[s]), ref) <= TOL, f"sequence {s} (clip {clip})"
        assert hook.counters.unmapped_rows == 0
    finally:
        llama_cpp.llama_free(ctx)
        hook.close()


def test_short_row_map_is_counted_not_injected(tiny, native_cache):
    cfg, seq = tiny["cfg"], tiny["seqs"][0]
    with make_hook(tiny, "native", native_cache) as hook:
        ctx = H.new_context(tiny["model"], hook, multi_clip=True)
        try:
            hook.set_row_clips([0] * (N_PREFILL - 2))
            H.decode(ctx, seq[:N_PREFILL], range(N_PREFILL), n_vocab=cfg.n_vocab)
        finally:
            llama_cpp.llama_free(ctx)
        c = hook.counters
        assert c.unmapped_rows == 2 * len(INJECT_LAYERS)
        assert c.injected_rows == (N_PREFILL - 2) * len(INJECT_LAYERS)


# ----------------------------------------------------------------------------------------------
# (e) two contexts / hooks in one process
# ----------------------------------------------------------------------------------------------


def test_two_contexts_do_not_interfere(tiny, native_cache):
    cfg, seq = tiny["cfg"], tiny["seqs"][1]
    setups = [("native", 0), ("native", 1), ("python", 2)]
    hooks, ctxs = [], []
    try:
        for backend, clip in setups:
            hook = make_hook(tiny, backend, native_cache, clips=(clip,))
            hook.use_single_clip(clip)
            hooks.append(hook)
            ctxs.append(H.new_context(tiny["model"], hook))
        got = [[] for _ in setups]
        for k, ctx in enumerate(ctxs):  # prefill all, then interleave the decode steps
            got[k].append(H.decode(ctx, seq[:N_PREFILL], range(N_PREFILL), n_vocab=cfg.n_vocab))
        for i in range(N_PREFILL, N_PREFILL + N_STEPS):
            for k, ctx in enumerate(ctxs):
                got[k].append(H.decode(ctx, seq[i : i + 1], [i], n_vocab=cfg.n_vocab))
        for k, (_, clip) in enumerate(setups):
            assert max_err(np.concatenate(got[k]), tiny["ref"](1, clip)) <= TOL, setups[k]
            assert hooks[k].counters.injected_rows == len(INJECT_LAYERS) * (N_PREFILL + N_STEPS)
    finally:
        for ctx in ctxs:
            llama_cpp.llama_free(ctx)
        for hook in hooks:
            hook.close()


# ----------------------------------------------------------------------------------------------
# (f) build cache and ABI checks
# ----------------------------------------------------------------------------------------------


def test_build_cache_reused_and_corruption_rebuilt(tmp_path):
    first = native_bridge.build_library(cache_dir=tmp_path)
    assert first.compiled and first.path.is_file()
    assert first.path.parent.name.startswith(llama_cpp.__version__ + "-")
    mtime = first.path.stat().st_mtime_ns
    second = native_bridge.build_library(cache_dir=tmp_path)
    assert not second.compiled and second.path == first.path
    assert second.path.stat().st_mtime_ns == mtime

    first.path.write_bytes(b"\x7fELF garbage")  # corrupted .so
    third = native_bridge.build_library(cache_dir=tmp_path)
    assert third.compiled
    meta = json.loads((third.path.parent / "build.json").read_text())
    assert meta["sha256"] == build._sha256_file(third.path)

    (third.path.parent / "build.json").write_text("{not json")  # corrupted metadata
    assert native_bridge.build_library(cache_dir=tmp_path).compiled
    lib = native_bridge.load_library(cache_dir=tmp_path)  # loads and passes the ABI check
    assert lib.muhook_sizeof_tensor() == build.EXPECTED_TENSOR_SIZE == 336
    assert not any(p.name.startswith("libmuhook.so.tmp") for p in third.path.parent.iterdir())


def test_build_cache_env_var_and_concurrent_builds(tmp_path):
    """Three processes build into the same empty cache at once: all succeed, one entry."""
    env = dict(os.environ, MULLAMA_CACHE=str(tmp_path), PYTHONPATH=str(Path(__file__).parents[1]))
    code = "import native_bridge as nb; lib = nb.load_library(); print(nb.build_library().path)"
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(set(outs)) == 1 and Path(outs[0]).is_file()
    assert Path(outs[0]).is_relative_to(tmp_path / "native")
    assert len(list((tmp_path / "native").iterdir())) == 1


def test_abi_mismatch_is_a_clear_error(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(build, "EXPECTED_TENSOR_SIZE", 999)
    with pytest.raises(NativeBridgeError, match=r"sizeof\(struct ggml_tensor\) is 336 in C but 999"):
        native_bridge.load_library(cache_dir=tmp_path)
    with pytest.raises(NativeBridgeError, match="ABI check failed"):
        InjectionHook(64, 4, backend="native", cache_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="native_bridge.hook"):
        hook = InjectionHook(64, 4, backend="auto", cache_dir=tmp_path)
    assert hook.backend == "python"
    assert "native injection hook unavailable" in caplog.text
    hook.close()


def test_abi_version_and_llama_cpp_version_checks(tmp_path, monkeypatch, native_cache):
    lib = native_bridge.load_library(cache_dir=native_cache)
    build.check_abi(lib, built_for=llama_cpp.__version__)
    with pytest.raises(NativeBridgeError, match="built for llama-cpp-python 0.0.1"):
        build.check_abi(lib, built_for="0.0.1")
    monkeypatch.setattr(build, "EXPECTED_ABI_VERSION", 99)
    with pytest.raises(NativeBridgeError, match="muhook ABI version 1 != 99"):
        build.check_abi(lib)


def test_no_compiler_falls_back_to_python(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(NativeBridgeError, match="CC"):
        native_bridge.build_library(cache_dir=tmp_path)
    with InjectionHook(64, 4, backend="auto", cache_dir=tmp_path) as hook:
        assert hook.backend == "python"


def test_compile_error_is_reported(tmp_path, monkeypatch):
    bad = tmp_path / "muhook.c"
    bad.write_text("this is not C;\n")
    monkeypatch.setattr(build, "SOURCE_PATH", bad)
    with pytest.raises(NativeBridgeError, match="compiling the native hook failed"):
        native_bridge.build_library(cache_dir=tmp_path)


# ----------------------------------------------------------------------------------------------
# (g) input validation and lifetime
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_raise_value_error(backend, native_cache):
    hook = InjectionHook(8, 4, backend=backend, cache_dir=native_cache)
    ok = np.ones(8, np.float32)
    bad_vectors = [
        {0: np.ones(7)},  # wrong length
        {0: np.ones((1, 8))},  # wrong rank
        {4: ok},  # layer out of range
        {-1: ok},  # negative layer
        {1.0: ok},  # non-int layer
        {0: np.array([np.nan] + [0.0] * 7)},  # NaN
        {0: np.full(8, 1e300)},  # overflows float32
        {0: np.ones(8, complex)},  # complex
        {0: np.array(["a"] * 8)},  # strings
        ([0, 1], np.ones((3, 8))),  # ids/array mismatch
        ([0, 0], np.ones((2, 8))),  # duplicate layer
        [0, 1],  # neither dict nor (ids, array)
    ]
    for vectors in bad_vectors:
        with pytest.raises(ValueError):
            hook.set_clip_vectors(0, vectors)
    for clip in (-1, 1 << 16, 1.5, True, "0"):
        with pytest.raises(ValueError):
            hook.set_clip_vectors(clip, {0: ok})
    with pytest.raises(ValueError, match="no vectors"):
        hook.use_single_clip(0)
    hook.set_clip_vectors(0, {0: ok, 3: np.arange(8)})  # ints converted to float32
    hook.use_single_clip(0)
    for rows in ([], [[0]], [0.0, 1.0], [0, 5], [0, -2], [True]):
        with pytest.raises(ValueError):
            hook.set_row_clips(rows)
    hook.set_row_clips(np.array([0, -1, 0]))
    for args in [(0, 4), (8, 0), (8.0, 4)]:
        with pytest.raises(ValueError):
            InjectionHook(*args, backend=backend, cache_dir=native_cache)
    with pytest.raises(ValueError, match="backend"):
        InjectionHook(8, 4, backend="cuda")
    hook.close()
    hook.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        hook.set_clip_vectors(0, {0: ok})
    with pytest.raises(ValueError, match="closed"):
        native_bridge.apply_to_context_params(llama_cpp.llama_context_default_params(), hook)


def test_context_param_helpers():
    cparams = llama_cpp.llama_context_default_params()
    native_bridge.set_exact_arithmetic(cparams)
    assert (cparams.flash_attn_type, cparams.type_k, cparams.type_v) == (0, 0, 0)
    native_bridge.enable_multi_clip_batches(cparams, n_seq_max=4)
    assert cparams.kv_unified and cparams.n_seq_max == 4
    with pytest.raises(TypeError):
        native_bridge.apply_to_context_params(cparams, object())


# ----------------------------------------------------------------------------------------------
# the callback itself on synthetic tensors (4-D, padded rows, name/type filtering, ubatches)
# ----------------------------------------------------------------------------------------------


class _FakeTensor:
    """A host ggml_tensor (buffer NULL) over a numpy buffer with padded, strided rows."""

    def __init__(self, name: bytes, ne, pad_floats=3, ggml_type=0):
        from native_bridge.ggml_mirror import GGMLTensor

        n0, n1, n2, n3 = ne
        row = n0 + pad_floats
        self.storage = np.zeros(row * n1 * n2 * n3, np.float32)
        self.values = np.random.default_rng(3).standard_normal((n3, n2, n1, n0)).astype(np.float32)
        self.view = np.lib.stride_tricks.as_strided(
            self.storage,
            shape=(n3, n2, n1, n0),
            strides=(4 * row * n1 * n2, 4 * row * n1, 4 * row, 4),
        )
        self.view[...] = self.values
        self.t = GGMLTensor()
        self.t.type = ggml_type
        self.t.ne[:] = list(ne)
        self.t.nb[:] = [4, 4 * row, 4 * row * n1, 4 * row * n1 * n2]
        self.t.data = self.storage.ctypes.data
        self.t.name = name
        self.ptr = ctypes.addressof(self.t)


@pytest.mark.parametrize("backend", BACKENDS)
def test_callback_on_synthetic_tensors(backend, native_cache):
    n_embd, n_layer = 8, 12
    rng = np.random.default_rng(0)
    d = {c: {layer: rng.standard_normal(n_embd).astype(np.float32) for layer in (1, 10)} for c in (0, 1)}
    hook = InjectionHook(n_embd, n_layer, backend=backend, cache_dir=native_cache)
    for c in d:
        hook.set_clip_vectors(c, d[c])
    cb, ud = hook.cb_eval, hook.user_data

    hook.use_single_clip(1)
    for name, ggml_type, n0 in [
        (b"attn_out-1 (view)", 0, 8),
        (b"attn_out-", 0, 8),
        (b"xattn_out-1", 0, 8),
        (b"attn_out-2", 0, 8),
        (b"attn_out-12", 0, 8),
        (b"attn_out-01x", 0, 8),
        (b"attn_out-1", 1, 8),
        (b"attn_out-1", 0, 9),
        (b"ffn_out-1", 0, 8),
    ]:
        fake = _FakeTensor(name, (n0, 2, 1, 1), ggml_type=ggml_type)
        assert cb(fake.ptr, True, ud) is False, name
    assert hook.counters.ask_accepted == 0

    # single clip, 4-D tensor with padded rows: every row += d[1][10]; padding untouched
    fake = _FakeTensor(b"attn_out-10", (n_embd, 3, 2, 2))
    assert cb(fake.ptr, True, ud) is True
    assert cb(fake.ptr, False, ud) is True
    np.testing.assert_array_equal(fake.view, fake.values + d[1][10])
    assert not fake.storage.reshape(-1, n_embd + 3)[:, n_embd:].any()
    assert hook.counters.injected_rows == 12

    # row map over two ubatches of 12 rows: layers 1 then 10 in each graph run
    rows = rng.integers(-1, 2, 24)
    hook.set_row_clips(rows)
    hook.reset_counters()
    for ub in range(2):
        for layer in (1, 10):
            fake = _FakeTensor(b"attn_out-%d" % layer, (n_embd, 3, 2, 2))
            assert cb(fake.ptr, True, ud) and cb(fake.ptr, False, ud)
            clips = rows[12 * ub : 12 * ub + 12]
            add = np.stack([d[c][layer] if c >= 0 else np.zeros(n_embd, np.float32) for c in clips])
            np.testing.assert_array_equal(fake.view, fake.values + add.reshape(2, 2, 3, n_embd))
    c = hook.counters
    assert c.ubatches == 2 and c.injected_rows == 2 * int((rows >= 0).sum()) and c.unmapped_rows == 0
    # a third ubatch runs past the 24-row map: counted, not injected
    fake = _FakeTensor(b"attn_out-1", (n_embd, 3, 2, 2))
    assert cb(fake.ptr, True, ud) and cb(fake.ptr, False, ud)
    np.testing.assert_array_equal(fake.view, fake.values)
    assert hook.counters.unmapped_rows == 12
    hook.close()
