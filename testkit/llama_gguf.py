"""Tiny random LLaMA models as GGUF files, a float64 numpy reference, and llama_cpp helpers.

Reusable by any test that needs a real llama.cpp model without downloading one.

API:
    TinyLlamaConfig            dims + which optional biases exist (frozen dataclass).
    random_weights(cfg, seed)  -> dict {gguf tensor name: np.ndarray}, Meta/PyTorch (out, in) layout,
                                  float32. Names: token_embd.weight, output_norm.weight, output.weight,
                                  blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm,
                                  ffn_gate, ffn_up, ffn_down}.weight and the configured blk.N.*.bias.
    write_llama_gguf(path, cfg, weights, *, dtype=np.float32)
                               -> writes a GGUF llama.cpp loads (SentencePiece-style vocab of 320 tokens
                                  with byte fallback); dtype=np.float16 stores the matrices as F16.
    quantize_gguf(src, dst, ftype=llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, nthread=2)
    reference_logits(cfg, weights, tokens, injection=None) -> (len(tokens), n_vocab) float64
                               full causal forward of one sequence starting at position 0;
                               injection = {layer: d_l (n_embd,)} added after wo (+bias), before the
                               residual add - where MU-LLaMA's adapter output goes.
    silence_llama_logs()       routes llama.cpp's log output to nowhere (keeps the callback alive).
    load_model(path), new_context(model, hook=None, *, exact=True, n_ctx, n_batch, n_ubatch,
                               n_seq_max, multi_clip) -> raw llama_cpp pointers.
    decode(ctx, tokens, positions, seq_ids) -> (n, n_vocab) float32 logits of every row.

Matrices are written in Meta layout without the HF q/k permutation: llama.cpp's LLaMA arch uses
"normal" (adjacent-pair) RoPE like Meta's code, and so does the reference here.
"""

from __future__ import annotations

import ctypes
import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

BIAS_NAMES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@dataclasses.dataclass(frozen=True)
class TinyLlamaConfig:
    """Dimensions of a random LLaMA. ``biases`` maps a bias name (see BIAS_NAMES) to the layers
    that have it, e.g. ``{"attn_output": (1, 3)}``."""

    n_embd: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_head_kv: int = 4
    n_ff: int = 176
    n_ctx_train: int = 256
    rms_eps: float = 1e-5
    rope_base: float = 10000.0
    biases: Mapping[str, Sequence[int]] = dataclasses.field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_vocab(self) -> int:
        return len(vocab_tokens()[0])


# ----------------------------------------------------------------------------------------------
# vocabulary: <unk> <s> </s>, 256 byte tokens, 61 pieces  -> 320 tokens
# ----------------------------------------------------------------------------------------------

_WORDS = ("▁the", "▁music", "▁is", "▁fun", "▁audio", "▁describe", "▁guitar", "▁piano")


def vocab_tokens() -> tuple[list[str], list[float], list[int]]:
    """(tokens, scores, token types) of the SentencePiece-style test vocabulary."""
    import gguf

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256
    scores = [0.0] * len(tokens)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces = list(_WORDS) + ["▁"] + letters + ["▁" + c for c in letters]
    for rank, piece in enumerate(pieces):
        tokens.append(piece)
        scores.append(-float(rank))
        types.append(gguf.TokenType.NORMAL)
    return tokens, scores, [int(t) for t in types]


# ----------------------------------------------------------------------------------------------
# weights + GGUF
# ----------------------------------------------------------------------------------------------


def random_weights(cfg: TinyLlamaConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights with O(1) activations (matrices ~ N(0, 1/fan_in))."""
    rng = np.random.default_rng(seed)
    e, hd, ff = cfg.n_embd, cfg.head_dim, cfg.n_ff

    def mat(out_dim: int, in_dim: int) -> np.ndarray:
        return (rng.standard_normal((out_dim, in_dim), dtype=np.float32) / np.sqrt(in_dim)).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w = {
        "token_embd.weight": rng.standard_normal((cfg.n_vocab, e), dtype=np.float32),
        "output_norm.weight": norm(e),
        "output.weight": mat(cfg.n_vocab, e),
    }
    out_dims = {
        "attn_q": cfg.n_head * hd,
        "attn_k": cfg.n_head_kv * hd,
        "attn_v": cfg.n_head_kv * hd,
        "attn_output": e,
        "ffn_gate": ff,
        "ffn_up": ff,
        "ffn_down": e,
    }
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        w[p + "attn_norm.weight"] = norm(e)
        w[p + "attn_q.weight"] = mat(cfg.n_head * hd, e)
        w[p + "attn_k.weight"] = mat(cfg.n_head_kv * hd, e)
        w[p + "attn_v.weight"] = mat(cfg.n_head_kv * hd, e)
        w[p + "attn_output.weight"] = mat(e, cfg.n_head * hd)
        w[p + "ffn_norm.weight"] = norm(e)
        w[p + "ffn_gate.weight"] = mat(ff, e)
        w[p + "ffn_up.weight"] = mat(ff, e)
        w[p + "ffn_down.weight"] = mat(e, ff)
        for name, layers in cfg.biases.items():
            if name not in BIAS_NAMES:
                raise ValueError(f"unknown bias {name!r}; valid: {BIAS_NAMES}")
            if i in layers:
                w[p + name + ".bias"] = (0.1 * rng.standard_normal(out_dims[name])).astype(np.float32)
    return w


def write_llama_gguf(
    path: str | Path,
    cfg: TinyLlamaConfig,
    weights: Mapping[str, np.ndarray],
    *,
    dtype: type = np.float32,
) -> Path:
    """Writes ``weights`` as a llama-architecture GGUF. 1-D tensors always stay F32."""
    import gguf

    path = Path(path)
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_name("tiny-random-llama")
    writer.add_context_length(cfg.n_ctx_train)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(cfg.n_ff)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.n_head_kv)
    writer.add_layer_norm_rms_eps(cfg.rms_eps)
    writer.add_rope_freq_base(cfg.rope_base)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_vocab_size(cfg.n_vocab)
    f16 = np.dtype(dtype) == np.float16
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if f16 else gguf.LlamaFileType.ALL_F32)
    tokens, scores, types = vocab_tokens()
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    for name, arr in weights.items():
        arr = np.ascontiguousarray(arr, dtype=np.float32 if arr.ndim == 1 else dtype)
        writer.add_tensor(name, arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def quantize_gguf(src: str | Path, dst: str | Path, ftype: int | None = None, nthread: int = 2) -> Path:
    """Quantises ``src`` into ``dst`` with llama.cpp (default ``LLAMA_FTYPE_MOSTLY_Q8_0``)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0 if ftype is None else ftype
    params.nthread = nthread
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc})")
    return Path(dst)


# ----------------------------------------------------------------------------------------------
# float64 reference forward
# ----------------------------------------------------------------------------------------------


def _rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x: np.ndarray, pos: np.ndarray, base: float) -> np.ndarray:
    """Adjacent-pair rotary embedding (llama.cpp "normal" mode). x: (T, heads, head_dim)."""
    hd = x.shape[-1]
    inv = base ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)  # (hd/2,)
    ang = pos[:, None].astype(np.float64) * inv[None, :]  # (T, hd/2)
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


def reference_logits(
    cfg: TinyLlamaConfig,
    weights: Mapping[str, np.ndarray],
    tokens: Sequence[int],
    injection: Mapping[int, np.ndarray] | None = None,
) -> np.ndarray:
    """Logits (len(tokens), n_vocab) in float64 for one sequence at positions 0..T-1."""
    w = {k: np.asarray(v, np.float64) for k, v in weights.items()}
    injection = injection or {}
    T = len(tokens)
    pos = np.arange(T)
    hd, nh, nkv = cfg.head_dim, cfg.n_head, cfg.n_head_kv
    mask = np.triu(np.full((T, T), -np.inf), k=1)
    x = w["token_embd.weight"][np.asarray(tokens)]

    def lin(h: np.ndarray, name: str) -> np.ndarray:
        y = h @ w[name + ".weight"].T
        return y + w[name + ".bias"] if name + ".bias" in w else y

    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        h = _rms_norm(x, w[p + "attn_norm.weight"], cfg.rms_eps)
        q = _rope(lin(h, p + "attn_q").reshape(T, nh, hd), pos, cfg.rope_base)
        k = _rope(lin(h, p + "attn_k").reshape(T, nkv, hd), pos, cfg.rope_base)
        v = lin(h, p + "attn_v").reshape(T, nkv, hd)
        k = np.repeat(k, nh // nkv, axis=1)  # query head j uses kv head j // (nh // nkv)
        v = np.repeat(v, nh // nkv, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + mask
        s = np.exp(s - s.max(axis=-1, keepdims=True))
        s /= s.sum(axis=-1, keepdims=True)
        o = np.einsum("hts,shd->thd", s, v).reshape(T, nh * hd)
        attn = lin(o, p + "attn_output")
        if i in injection:
            attn = attn + np.asarray(injection[i], np.float64)
        x = x + attn
        h = _rms_norm(x, w[p + "ffn_norm.weight"], cfg.rms_eps)
        g = lin(h, p + "ffn_gate")
        x = x + lin(g / (1.0 + np.exp(-g)) * lin(h, p + "ffn_up"), p + "ffn_down")
    x = _rms_norm(x, w["output_norm.weight"], cfg.rms_eps)
    return x @ w["output.weight"].T


# ----------------------------------------------------------------------------------------------
# llama_cpp low-level helpers
# ----------------------------------------------------------------------------------------------

_log_callback = None


def silence_llama_logs() -> None:
    """Discards llama.cpp's log output (the callback is kept referenced at module level)."""
    global _log_callback
    import llama_cpp

    if _log_callback is None:
        _log_callback = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
        llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(None))


def load_model(path: str | Path):
    """``llama_model_load_from_file`` on CPU; raises RuntimeError on failure."""
    import llama_cpp

    llama_cpp.llama_backend_init()
    mparams = llama_cpp.llama_model_default_params()
    mparams.n_gpu_layers = 0
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {path}")
    return model


def new_context(
    model,
    hook=None,
    *,
    exact: bool = True,
    n_ctx: int = 64,
    n_batch: int = 64,
    n_ubatch: int | None = None,
    n_seq_max: int = 1,
    multi_clip: bool = False,
    n_threads: int = 2,
):
    """``llama_init_from_model`` with the hook installed (if given)."""
    import llama_cpp

    from native_bridge import (
        apply_to_context_params,
        enable_multi_clip_batches,
        set_exact_arithmetic,
    )

    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = n_ctx
    cparams.n_batch = n_batch
    cparams.n_ubatch = n_ubatch or n_batch
    cparams.n_seq_max = n_seq_max
    cparams.n_threads = n_threads
    cparams.n_threads_batch = n_threads
    if exact:
        set_exact_arithmetic(cparams)
    if multi_clip:
        enable_multi_clip_batches(cparams)
    if hook is not None:
        apply_to_context_params(cparams, hook)
    ctx = llama_cpp.llama_init_from_model(model, cparams)
    if not ctx:
        raise RuntimeError("llama_init_from_model failed")
    return ctx


def clear_memory(ctx) -> None:
    import llama_cpp

    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)


def decode(
    ctx,
    tokens: Sequence[int],
    positions: Sequence[int],
    seq_ids: Sequence[int] | None = None,
    *,
    n_vocab: int,
    want_logits: bool = True,
) -> np.ndarray | None:
    """One ``llama_decode`` of a batch; returns the logits of every row (n, n_vocab) float32."""
    import llama_cpp

    n = len(tokens)
    seq_ids = [0] * n if seq_ids is None else seq_ids
    batch = llama_cpp.llama_batch_init(n, 0, 1)
    try:
        batch.n_tokens = n
        for i in range(n):
            batch.token[i] = int(tokens[i])
            batch.pos[i] = int(positions[i])
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = int(seq_ids[i])
            batch.logits[i] = 1 if want_logits else int(i == n - 1)
        rc = llama_cpp.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        if not want_logits:
            return None
        return np.stack(
            [
                np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).copy()
                for i in range(n)
            ]
        )
    finally:
        llama_cpp.llama_batch_free(batch)
