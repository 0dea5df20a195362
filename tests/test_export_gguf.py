"""GGUF export (LLaMA + merged deltas) and llama.cpp quantisation, checked against the torch reference.

Tolerances (tiny model, logits up to ~4.5):
* F32 GGUF, llama.cpp with exact settings (no flash attention, F32 KV cache) vs the float32 torch
  reference: <= 1e-3 max abs (measured ~3e-6).
* F16 GGUF: <= 5e-2 (measured ~7e-3: llama.cpp also rounds the activations to f16 in F16 matmuls).
* Q8_0 / Q4_K_M: finite logits, top-1 agreement with the reference reported (random tiny weights make
  these numbers pessimistic; Q4_K_M falls back to Q5_0/Q8_0 at these widths).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from export import gguf_export
from export.gguf_export import GgufSource, MullamaKeys, write_gguf, write_llama_gguf
from export.gguf_tensors import gguf_tensor_name
from export.llamacpp_eval import LlamaCppModel
from export.quantize import QUANTS, quantize_gguf
from mullama_sdk.errors import BundleError, CheckpointError, ConfigError, ContextLengthError
from mullama_sdk.prompt import CAPTION_QUESTIONS, format_prompt
from training.reference.build import load_reference
from training.reference.model_sources import open_sources

F32_TOL = 1e-3
F16_TOL = 5e-2

QUESTIONS = (
    *CAPTION_QUESTIONS,
    "Is this  song   happy?",
    "What's the tempo?\nAnd the key?\n\n",
    "Décris l'audio — ça swingue? 🎷 日本語",
    "  two leading spaces and trailing  ",
    "tabs\tand\r\nCRLF",
    "<s> literal specials </s>",
    "numbers 1234567 3.14",
)
ANSWER = "A calm piano piece in C major with soft strings and a slow tempo."


def _kind_paths(assets, kind: str):
    ckpt = assets.checkpoint if kind == "full" else assets.checkpoint_deltas
    return ckpt, assets.llama_dir, assets.mert_dir


@pytest.fixture(scope="module", params=["full", "deltas"])
def exported(request, tiny_assets, tmp_path_factory):
    """(kind, report, torch reference model) for an F32 GGUF of each checkpoint kind."""
    kind = request.param
    paths = _kind_paths(tiny_assets, kind)
    out = tmp_path_factory.mktemp(f"gguf-{kind}") / "model-f32.gguf"
    report = write_gguf(open_sources(*paths), out, file_type="f32")
    return kind, report, load_reference(*paths)


@pytest.fixture(scope="module")
def full_f32(tiny_assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf-full") / "model-f32.gguf"
    write_gguf(open_sources(*_kind_paths(tiny_assets, "full")), out, file_type="f32")
    return out


@pytest.fixture(scope="module")
def reference(tiny_assets):
    return load_reference(*_kind_paths(tiny_assets, "full"))


def _tokens(ref, question: str = "Describe the audio") -> list[int]:
    return ref.tokenizer.encode_prompt(question) + ref.tokenizer.encode(ANSWER)


def _ref_logits(ref, tokens: list[int]) -> np.ndarray:
    with torch.inference_mode():
        return ref.logits(tokens, None).numpy()


# ------------------------------------------------------------------------------------- (a) exactness
def test_f32_gguf_matches_reference(exported):
    kind, report, ref = exported
    assert report.n_lora_merged == 4 * 7 and report.n_biases == 4 * 5 and report.n_skipped == 4
    with LlamaCppModel(report.path, exact=True, n_ctx=256, n_batch=256) as m:
        worst = 0.0
        for q in CAPTION_QUESTIONS[:2]:
            tokens = _tokens(ref, q)
            want = _ref_logits(ref, tokens)
            got = m.logits(tokens)
            assert got.shape == want.shape
            worst = max(worst, float(np.abs(got - want).max()))
    print(f"\n[{kind}] F32 GGUF vs torch reference: max |dlogits| = {worst:.2e} (tol {F32_TOL})")
    assert worst <= F32_TOL


def test_decode_in_chunks_equals_one_batch(full_f32, reference):
    tokens = _tokens(reference)
    with LlamaCppModel(full_f32, exact=True, n_ctx=256, n_batch=16) as m:
        chunked = m.logits(tokens)
    with LlamaCppModel(full_f32, exact=True, n_ctx=256, n_batch=256) as m:
        whole = m.logits(tokens)
    assert np.abs(chunked - whole).max() <= 1e-4


# ------------------------------------------------------------------------------------- (b) tokenizer
def test_llamacpp_tokenizer_matches_sentencepiece(full_f32, reference):
    tok = reference.tokenizer
    with LlamaCppModel(full_f32, n_ctx=64, n_batch=64) as m:
        for q in QUESTIONS:
            assert m.tokenize(format_prompt(q), add_special=True, parse_special=False) == tok.encode_prompt(q), q


def test_llamacpp_detokenizer_matches_sentencepiece(full_f32, reference):
    tok = reference.tokenizer
    rng = np.random.default_rng(0)
    with LlamaCppModel(full_f32, n_ctx=256, n_batch=256) as m:
        generated = m.greedy(tok.encode_prompt("Describe the audio"), 48)
        assert generated
        cases = [generated, tok.encode(ANSWER), tok.encode(ANSWER) + [tok.eos_id]]
        cases += [tok.encode(q) for q in QUESTIONS]
        cases += [[int(i) for i in rng.integers(3, tok.n_vocab, size=24)] for _ in range(8)]  # byte soup
        for ids in cases:
            assert m.detokenize(ids) == tok.decode(ids), ids


# ------------------------------------------------------------------------------- (c) f16 and quants
def test_f16_gguf_within_tolerance(tiny_assets, reference, tmp_path):
    report = write_gguf(open_sources(*_kind_paths(tiny_assets, "full")), tmp_path / "m16.gguf", file_type="f16")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(report.path)).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16
    assert types["blk.0.attn_q.bias"] == gguf.GGMLQuantizationType.F32
    tokens = _tokens(reference)
    with LlamaCppModel(report.path, exact=True, n_ctx=256, n_batch=256) as m:
        err = float(np.abs(m.logits(tokens) - _ref_logits(reference, tokens)).max())
    print(f"\nF16 GGUF vs torch reference: max |dlogits| = {err:.2e} (tol {F16_TOL})")
    assert err <= F16_TOL


@pytest.mark.parametrize("quant", ["q8_0", "q4_k_m"])
def test_quantized_gguf_loads_and_runs(full_f32, reference, tmp_path, quant):
    report = quantize_gguf(full_f32, tmp_path / f"m-{quant}.gguf", quant, nthread=2)
    assert report.dst.is_file() and report.n_bytes < report.src_bytes
    assert sum(report.tensor_types.values()) == 59
    assert report.tensor_types.get("F32") == 4 * 7 + 1  # norms + biases stay F32
    if quant == "q4_k_m":
        # n_embd 64 / n_ff 192 are not multiples of 256: every matrix falls back, and we say so.
        assert report.k_quant_fallback and len(report.fallback_tensors) == 4 * 7 + 2
        assert report.warnings and "256" in report.warnings[0]
        assert not any(t.endswith("_K") for t in report.tensor_types)
    else:
        assert not report.k_quant_fallback and report.tensor_types.get("Q8_0") == 4 * 7 + 2

    tokens = _tokens(reference)
    want = _ref_logits(reference, tokens)
    with LlamaCppModel(report.dst, n_ctx=256, n_batch=256) as m:  # production settings
        got = m.logits(tokens)
        assert m.meta(MullamaKeys.INJECT_LAYERS_CSV) == "2,3"
    assert np.isfinite(got).all()
    agree = float((got.argmax(1) == want.argmax(1)).mean())
    err = float(np.abs(got - want).max())
    print(f"\n{quant}: types {report.tensor_types}, top-1 agreement {agree:.1%}, max |dlogits| {err:.3f}")
    assert agree >= 0.5  # a wrong tensor mapping would give ~1/512


# ------------------------------------------------------------------------------------- (d) metadata
def _field(reader: gguf.GGUFReader, key: str):
    field = reader.get_field(key)
    assert field is not None, f"missing GGUF key {key}"
    return field.contents()


def test_gguf_metadata_and_tensors(full_f32, tiny_assets):
    r = gguf.GGUFReader(str(full_f32))
    arch = "llama"
    llm = gguf.Keys.LLM
    assert _field(r, gguf.Keys.General.ARCHITECTURE) == arch
    assert _field(r, gguf.Keys.General.FILE_TYPE) == int(gguf.LlamaFileType.ALL_F32)
    assert _field(r, MullamaKeys.FORMAT_VERSION) == gguf_export.FORMAT_VERSION == 1
    assert _field(r, MullamaKeys.INJECT_LAYERS) == [2, 3]
    assert _field(r, MullamaKeys.INJECT_LAYERS_CSV) == "2,3"
    assert _field(r, MullamaKeys.N_INJECT) == 2
    assert _field(r, MullamaKeys.LORA_RANK) == 4
    hp = {
        llm.CONTEXT_LENGTH: 4096, llm.EMBEDDING_LENGTH: 64, llm.BLOCK_COUNT: 4, llm.FEED_FORWARD_LENGTH: 192,
        gguf.Keys.Attention.HEAD_COUNT: 4, gguf.Keys.Attention.HEAD_COUNT_KV: 4,
        gguf.Keys.Rope.DIMENSION_COUNT: 16, llm.VOCAB_SIZE: 512,
    }
    for key, want in hp.items():
        assert _field(r, key.format(arch=arch)) == want, key
    assert _field(r, gguf.Keys.Attention.LAYERNORM_RMS_EPS.format(arch=arch)) == pytest.approx(1e-5)
    assert _field(r, gguf.Keys.Rope.FREQ_BASE.format(arch=arch)) == pytest.approx(10000.0)

    tk = gguf.Keys.Tokenizer
    assert _field(r, tk.MODEL) == "llama"
    tokens = _field(r, tk.LIST)
    types = _field(r, tk.TOKEN_TYPE)
    assert len(tokens) == len(types) == len(_field(r, tk.SCORES)) == 512
    assert (_field(r, tk.BOS_ID), _field(r, tk.EOS_ID), _field(r, tk.UNK_ID)) == (1, 2, 0)
    assert _field(r, tk.ADD_BOS) is True and _field(r, tk.ADD_EOS) is False
    assert types[0] == gguf.TokenType.UNKNOWN and types[1] == types[2] == gguf.TokenType.CONTROL
    assert types[tokens.index("<0x0A>")] == gguf.TokenType.BYTE

    tensors = {t.name: t for t in r.tensors}
    assert len(tensors) == 3 + 4 * 14
    for i in range(4):
        for b in ("attn_q", "attn_output", "ffn_gate", "ffn_down", "ffn_up"):
            assert f"blk.{i}.{b}.bias" in tensors
        assert f"blk.{i}.attn_k.bias" not in tensors and f"blk.{i}.attn_v.bias" not in tensors
    assert not any("gate" in n and "ffn_gate" not in n for n in tensors)  # injection gates stay out
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in tensors.values())

    # Values: w2's bias is ffn_down's, w1 + its LoRA is ffn_gate, the trained norm is attn_norm.
    src = open_sources(*_kind_paths(tiny_assets, "full")).llama

    def data(name: str) -> np.ndarray:
        t = tensors[name]
        return np.asarray(t.data).reshape([int(d) for d in reversed(t.shape)])

    np.testing.assert_array_equal(data("blk.1.ffn_down.bias"), src["layers.1.feed_forward.w2.bias"].numpy())
    np.testing.assert_array_equal(data("blk.1.attn_norm.weight"), src["layers.1.attention_norm.weight"].numpy())
    w1 = src["layers.1.feed_forward.w1.weight"].float()
    merged = w1 + src["layers.1.feed_forward.lora_w1_l2.weight"] @ src["layers.1.feed_forward.lora_w1_l1.weight"]
    np.testing.assert_allclose(data("blk.1.ffn_gate.weight"), merged.numpy(), rtol=0, atol=1e-6)


def test_tensor_name_mapping():
    assert gguf_tensor_name("tok_embeddings.weight") == "token_embd.weight"
    assert gguf_tensor_name("norm.weight") == "output_norm.weight"
    assert gguf_tensor_name("layers.7.feed_forward.w1.bias") == "blk.7.ffn_gate.bias"
    assert gguf_tensor_name("layers.7.feed_forward.w2.weight") == "blk.7.ffn_down.weight"
    assert gguf_tensor_name("layers.7.feed_forward.w3.bias") == "blk.7.ffn_up.bias"
    assert gguf_tensor_name("layers.0.attention.wo.bias") == "blk.0.attn_output.bias"
    for bad in ("layers.0.attention.wk.bias", "layers.0.attention.gate", "layers.0.attention.lora_wq_l1.weight",
                "prefix_query.weight", "layers.x.attention.wq.weight", "rope.freqs"):
        with pytest.raises(CheckpointError):
            gguf_tensor_name(bad)


def test_unknown_or_missing_source_tensor_is_refused(tiny_assets, tmp_path):
    src = GgufSource.from_model_sources(open_sources(*_kind_paths(tiny_assets, "full")))
    extra = dataclasses.replace(src, tensors={**src.tensors, "layers.0.attention.wk.bias": torch.zeros(64)})
    with pytest.raises(CheckpointError, match="wk.bias"):
        write_llama_gguf(extra, tmp_path / "x.gguf")
    missing = dataclasses.replace(
        src, tensors={k: v for k, v in src.tensors.items() if k != "layers.2.feed_forward.w3.weight"})
    with pytest.raises(CheckpointError, match="blk.2.ffn_up.weight"):
        write_llama_gguf(missing, tmp_path / "x.gguf")
    half_lora = dataclasses.replace(
        src, tensors={k: v for k, v in src.tensors.items() if k != "layers.1.attention.lora_wv_l2.weight"})
    with pytest.raises(CheckpointError, match="incomplete"):
        write_llama_gguf(half_lora, tmp_path / "x.gguf")
    nan = src.tensors["layers.3.attention.wo.weight"].float().clone()
    nan[1, 2] = float("nan")
    with pytest.raises(CheckpointError, match="non-finite"):
        write_llama_gguf(dataclasses.replace(src, tensors={**src.tensors, "layers.3.attention.wo.weight": nan}),
                         tmp_path / "x.gguf")
    big = src.tensors["output.weight"].float().clone()
    big[0, 0] = 1e6
    with pytest.raises(CheckpointError, match="float16"):
        write_llama_gguf(dataclasses.replace(src, tensors={**src.tensors, "output.weight": big}),
                         tmp_path / "x.gguf", file_type="f16")
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------- (e) bad input
def test_unknown_quant_and_file_type(full_f32, tiny_assets, tmp_path):
    with pytest.raises(ConfigError) as e:
        quantize_gguf(full_f32, tmp_path / "q.gguf", "q3_xyz")
    assert all(q in str(e.value) for q in QUANTS)
    with pytest.raises(ConfigError, match="f32, f16"):
        write_gguf(open_sources(*_kind_paths(tiny_assets, "full")), tmp_path / "x.gguf", file_type="bf16")


def test_unwritable_output_is_a_typed_error(full_f32, tiny_assets, tmp_path):
    sources = open_sources(*_kind_paths(tiny_assets, "full"))
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    # /proc refuses new files even for root (chmod-based tests do not work as root).
    for out in (tmp_path / "missing" / "m.gguf", blocker / "m.gguf", Path("/proc/mullama-test.gguf"), tmp_path):
        with pytest.raises(BundleError):
            write_gguf(sources, out)
        with pytest.raises(BundleError):
            quantize_gguf(full_f32, out, "q8_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_quantizer_failure_is_a_typed_error(full_f32, tmp_path):
    q8 = quantize_gguf(full_f32, tmp_path / "q8.gguf", "q8_0", nthread=2).dst
    # Re-quantising a quantised file is refused by llama.cpp (allow_requantize is off).
    with pytest.raises(BundleError, match="quantiser failed"):
        quantize_gguf(q8, tmp_path / "q4.gguf", "q4_k_m", nthread=2)
    not_gguf = tmp_path / "junk.gguf"
    not_gguf.write_bytes(b"definitely not a gguf file")
    with pytest.raises(BundleError):
        quantize_gguf(not_gguf, tmp_path / "q4b.gguf", "q4_k_m")
    with pytest.raises(BundleError):
        quantize_gguf(tmp_path / "absent.gguf", tmp_path / "q4c.gguf", "q8_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.gguf", "q8.gguf"]


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_interrupted_write_leaves_no_file(tiny_assets, tmp_path, monkeypatch, exc):
    sources = open_sources(*_kind_paths(tiny_assets, "full"))
    out = tmp_path / "model.gguf"
    real = gguf.GGUFWriter.write_tensor_data
    calls = {"n": 0}

    def failing(self, tensor, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 10:
            raise exc("simulated failure mid-stream")
        return real(self, tensor, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", failing)
    with pytest.raises(exc):
        write_gguf(sources, out)
    assert calls["n"] == 10
    assert list(tmp_path.iterdir()) == []

    # An existing file is only replaced by a complete one.
    out.write_bytes(b"previous model")
    calls["n"] = 0
    with pytest.raises(exc):
        write_gguf(sources, out)
    assert out.read_bytes() == b"previous model" and list(tmp_path.iterdir()) == [out]


def test_llamacpp_model_lifecycle(full_f32):
    m = LlamaCppModel(full_f32, n_ctx=32, n_batch=32)
    assert (m.n_vocab, m.n_embd, m.n_layer) == (512, 64, 4)
    assert m.n_ctx >= 32  # llama.cpp may round the context up
    with pytest.raises(ContextLengthError):
        m.logits([5] * (m.n_ctx + 1))
    m.close()
    m.close()
    assert m.closed
    with pytest.raises(RuntimeError, match="closed"):
        m.tokenize("x")
    with pytest.raises(BundleError):
        LlamaCppModel(full_f32.with_name("nope.gguf"))
