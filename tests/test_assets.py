"""The tiny-asset factory writes what it promises: real formats, spec-exact key sets, deterministic bytes."""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import pytest
import sentencepiece as spm
import soundfile as sf
import torch
from transformers import HubertConfig, HubertModel

from mullama_sdk.prompt import format_prompt
from testkit.make_assets import AssetDims, TinyAssets, build_shape_assets, build_tiny_assets
from testkit.tokenizer import pad_tokenizer, train_tokenizer

ATTENTION = ("wq", "wk", "wv", "wo")


def load(path: Path) -> object:
    """torch.load the way consumers must: weights only, with the checkpoint's argparse.Namespace allowed."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, weights_only=True)


def sha256_tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def spec_checkpoint_shapes(d: AssetDims, mert_shapes: dict[str, torch.Size]) -> dict[str, tuple[int, ...]]:
    """Every key and shape of ``checkpoint.pth``'s ``model``, written out from docs/model.md section 3."""
    hidden, rank = d.ffn_hidden, d.lora_rank
    shapes = {f"mert_model.{k}": tuple(v) for k, v in mert_shapes.items()}
    shapes |= {
        "mu_mert_agg.weight": (1, d.mert_num_hidden_layers + 1, 1),
        "mu_mert_agg.bias": (1,),
        "mu_mert_proj.weight": (d.dim, d.mert_hidden_size),
        "mu_mert_proj.bias": (d.dim,),
        "prefix_query.weight": (d.n_inject, d.dim),
        "llama.tok_embeddings.weight": (d.vocab_size, d.dim),
        "llama.norm.weight": (d.dim,),
        "llama.output.weight": (d.vocab_size, d.dim),
    }
    for k in (1, 2, 3):
        shapes |= {
            f"mu_mert_norm_{k}.weight": (d.dim,),
            f"mu_mert_f1_{k}.weight": (4 * d.dim, d.dim),
            f"mu_mert_f3_{k}.weight": (4 * d.dim, d.dim),
            f"mu_mert_f2_{k}.weight": (d.dim, 4 * d.dim),
        }
    ffn_io = {"w1": (d.dim, hidden), "w2": (hidden, d.dim), "w3": (d.dim, hidden)}
    for n in range(d.n_layers):
        a, f = f"llama.layers.{n}.attention.", f"llama.layers.{n}.feed_forward."
        for w in ATTENTION:
            shapes |= {
                f"{a}{w}.weight": (d.dim, d.dim),
                f"{a}lora_{w}_l1.weight": (rank, d.dim),
                f"{a}lora_{w}_l2.weight": (d.dim, rank),
            }
        shapes |= {f"{a}wq.bias": (d.dim,), f"{a}wo.bias": (d.dim,), f"{a}gate": (1, d.n_heads, 1, 1)}
        for w, (fan_in, fan_out) in ffn_io.items():
            shapes |= {
                f"{f}{w}.weight": (fan_out, fan_in),
                f"{f}{w}.bias": (fan_out,),
                f"{f}lora_{w}_l1.weight": (rank, fan_in),
                f"{f}lora_{w}_l2.weight": (fan_out, rank),
            }
        shapes |= {
            f"llama.layers.{n}.attention_norm.weight": (d.dim,),
            f"llama.layers.{n}.ffn_norm.weight": (d.dim,),
        }
    return shapes


def is_trained(key: str) -> bool:
    """Whether docs/model.md section 3 counts ``key`` as a trained part (what checkpoint_deltas.pth holds)."""
    if key.startswith(("mu_mert_", "prefix_query.")):
        return True
    return key.startswith("llama.") and (key.endswith((".bias", ".gate", "norm.weight")) or ".lora_" in key)


@pytest.fixture(scope="module")
def checkpoint(tiny_assets: TinyAssets) -> dict[str, torch.Tensor]:
    return load(tiny_assets.checkpoint)["model"]


@pytest.fixture(scope="module")
def shard(tiny_assets: TinyAssets) -> dict[str, torch.Tensor]:
    return load(tiny_assets.llama_dir / "consolidated.00.pth")


@pytest.fixture(scope="module")
def mert_weights(tiny_assets: TinyAssets) -> dict[str, torch.Tensor]:
    return load(tiny_assets.mert_dir / "pytorch_model.bin")


def test_two_builds_are_byte_identical(tiny_assets: TinyAssets, tmp_path: Path) -> None:
    again = build_tiny_assets(tmp_path / "again")
    assert sha256_tree(again.root) == sha256_tree(tiny_assets.root)


def test_seed_changes_weights_only(tiny_assets: TinyAssets, tmp_path: Path) -> None:
    other = sha256_tree(build_tiny_assets(tmp_path / "seed1", seed=1).root)
    same = {k for k, v in sha256_tree(tiny_assets.root).items() if other[k] == v}
    unseeded = (".json", ".model", "tokenizer_checklist.chk")
    assert all(k.startswith("audio/") or k.endswith(unseeded) for k in same), same


def test_pickles_equal_plain_torch_save(tiny_assets: TinyAssets, tmp_path: Path) -> None:
    # The streamed writer patches zip CRCs and torch's serialization_id; re-saving the loaded content with
    # torch.save (same file name: it names the archive folder) must reproduce every byte.
    for path in (
        tiny_assets.checkpoint,
        tiny_assets.checkpoint_deltas,
        tiny_assets.llama_dir / "consolidated.00.pth",
        tiny_assets.mert_dir / "pytorch_model.bin",
    ):
        with zipfile.ZipFile(path) as zf:
            assert zf.testzip() is None, path
        resaved = tmp_path / path.parent.name / path.name
        resaved.parent.mkdir(exist_ok=True)
        torch.save(load(path), resaved)
        assert resaved.read_bytes() == path.read_bytes(), path


def test_tokenizer_follows_llama_conventions(tiny_assets: TinyAssets) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(tiny_assets.tokenizer))
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert sp.get_piece_size() == tiny_assets.dims.vocab_size
    assert sp.encode_as_pieces("\n\n") == ["\u2581", "<0x0A>", "<0x0A>"]
    assert sp.encode_as_pieces("a  b") == ["\u2581a", "\u2581", "\u2581b"]  # the double space survives
    assert sp.decode(sp.encode("two  spaces, 3 digits: 120 BPM")) == "two  spaces, 3 digits: 120 BPM"
    assert sp.encode_as_pieces("120") == ["\u2581", "1", "2", "0"]  # split_digits
    prompt = format_prompt("What do you hear in the audio?")
    assert sp.decode(sp.encode(prompt)) == prompt
    assert sp.encode(prompt).count(sp.piece_to_id("<0x0A>")) == prompt.count("\n")


def test_padded_tokenizer_keeps_ids() -> None:
    small = train_tokenizer(512)
    sp_small = spm.SentencePieceProcessor(model_proto=small)
    sp_big = spm.SentencePieceProcessor(model_proto=pad_tokenizer(small, 32000))
    assert sp_big.get_piece_size() == 32000
    assert (sp_big.unk_id(), sp_big.bos_id(), sp_big.eos_id()) == (0, 1, 2)
    prompt = format_prompt()
    assert sp_big.encode(prompt) == sp_small.encode(prompt)


def test_llama_folder_matches_params(tiny_assets: TinyAssets, shard: dict[str, torch.Tensor]) -> None:
    params = json.loads((tiny_assets.llama_dir / "params.json").read_text())
    assert params == {
        "dim": 64,
        "multiple_of": 32,
        "n_heads": 4,
        "n_layers": 4,
        "norm_eps": 1e-5,
        "vocab_size": -1,  # as Meta's LLaMA-2 params.json: the tokenizer's size
    }
    dim, hidden = params["dim"], 192  # multiple_of * ceil(int(2 * 4 * dim / 3) / multiple_of)
    assert tiny_assets.dims.ffn_hidden == hidden
    expected = {
        "tok_embeddings.weight": (tiny_assets.dims.vocab_size, dim),
        "norm.weight": (dim,),
        "output.weight": (tiny_assets.dims.vocab_size, dim),
    }
    for n in range(params["n_layers"]):
        expected |= {f"layers.{n}.attention.{w}.weight": (dim, dim) for w in ATTENTION}
        expected |= {
            f"layers.{n}.feed_forward.w1.weight": (hidden, dim),
            f"layers.{n}.feed_forward.w2.weight": (dim, hidden),
            f"layers.{n}.feed_forward.w3.weight": (hidden, dim),
            f"layers.{n}.attention_norm.weight": (dim,),
            f"layers.{n}.ffn_norm.weight": (dim,),
        }
    assert {k: tuple(v.shape) for k, v in shard.items()} == expected
    assert {v.dtype for v in shard.values()} == {torch.bfloat16}


def test_base_weights_exact_in_bf16_and_fp16(
    shard: dict[str, torch.Tensor], checkpoint: dict[str, torch.Tensor]
) -> None:
    for name, w in shard.items():
        assert torch.equal(w.half().bfloat16(), w), name
        stored = checkpoint[f"llama.{name}"]
        if name.endswith("norm.weight"):
            assert stored.dtype == torch.float32 and not torch.equal(stored, w.float()), name  # trained
        else:
            assert stored.dtype == torch.float16 and torch.equal(stored.float(), w.float()), name
    logits_scale = shard["output.weight"].float().std() * shard["output.weight"].shape[1] ** 0.5
    assert 0.5 < logits_scale < 2.0  # O(1) logits from unit-RMS hidden states


def test_mert_folder_loads_into_hubert(
    tiny_assets: TinyAssets, mert_weights: dict[str, torch.Tensor]
) -> None:
    config = json.loads((tiny_assets.mert_dir / "config.json").read_text())
    assert config["model_type"] == "mert_model" and config["architectures"] == ["MERTModel"]
    assert not config["feature_extractor_cqt"] and not config["deepnorm"]
    pre = json.loads((tiny_assets.mert_dir / "preprocessor_config.json").read_text())
    assert pre["sampling_rate"] == 24000 and pre["do_normalize"] is False
    mert_only = (
        "model_type",
        "architectures",
        "feature_extractor_cqt",
        "feature_extractor_cqt_bins",
        "deepnorm",
        "attention_relax",
        "sample_rate",
    )
    model = HubertModel(HubertConfig(**{k: v for k, v in config.items() if k not in mert_only}))
    assert {v.dtype for v in mert_weights.values()} == {torch.float32}
    assert "encoder.pos_conv_embed.conv.weight_g" in mert_weights
    renamed = {
        k.replace(".weight_g", ".parametrizations.weight.original0").replace(
            ".weight_v", ".parametrizations.weight.original1"
        ): v
        for k, v in mert_weights.items()
    }
    model.load_state_dict(renamed, strict=True)
    norm = mert_weights["encoder.layers.0.layer_norm.weight"]
    assert (norm - 1).abs().max() > 0.05 and mert_weights["encoder.layer_norm.bias"].abs().max() > 0.02


def test_checkpoint_has_exactly_the_spec_keys(
    tiny_assets: TinyAssets, checkpoint: dict[str, torch.Tensor], mert_weights: dict[str, torch.Tensor]
) -> None:
    raw = load(tiny_assets.checkpoint)
    assert list(raw) == ["model", "optimizer", "epoch", "scaler", "args"]
    assert isinstance(raw["args"], argparse.Namespace) and raw["args"].llama_type == "7B"
    expected = spec_checkpoint_shapes(tiny_assets.dims, {k: v.shape for k, v in mert_weights.items()})
    assert {k: tuple(v.shape) for k, v in checkpoint.items()} == expected
    for name, t in checkpoint.items():
        if name.startswith("mert_model."):
            assert torch.equal(t, mert_weights[name.removeprefix("mert_model.")]), name
        elif name.endswith(".gate"):
            assert t.dtype == torch.float16 and torch.tanh(t.float()).abs().max() > 0.3, name
        elif is_trained(name):
            assert t.dtype == torch.float32 and t.abs().max() > 0, name


def test_deltas_on_top_of_base_equal_checkpoint(
    tiny_assets: TinyAssets,
    checkpoint: dict[str, torch.Tensor],
    shard: dict[str, torch.Tensor],
    mert_weights: dict[str, torch.Tensor],
) -> None:
    raw = load(tiny_assets.checkpoint_deltas)
    deltas = raw["model"]
    assert list(raw) == ["model", "optimizer", "epoch", "scaler", "args"]
    assert set(deltas) == {k for k in checkpoint if is_trained(k)}
    rebuilt = {f"mert_model.{k}": v for k, v in mert_weights.items()}
    rebuilt |= {f"llama.{k}": v.half() for k, v in shard.items()}
    rebuilt |= deltas
    assert rebuilt.keys() == checkpoint.keys()
    for name, t in checkpoint.items():
        assert rebuilt[name].dtype == t.dtype and torch.equal(rebuilt[name], t), name


def test_audio_decodes_at_stated_format(tiny_assets: TinyAssets) -> None:
    stated = {
        "music_24k_mono.wav": (24000, 1, 4.0),
        "music_44k_stereo.wav": (44100, 2, 3.0),
        "music_44k_stereo.flac": (44100, 2, 3.0),
        "music_44k_stereo.ogg": (44100, 2, 3.0),
        "music_24k_mono_10s.wav": (24000, 1, 10.0),
    }
    assert set(tiny_assets.audio) == set(stated)
    clips = {}
    for name, (rate, channels, seconds) in stated.items():
        data, sr = sf.read(tiny_assets.audio[name], always_2d=True)
        assert (sr, data.shape[1], data.shape[0]) == (rate, channels, round(rate * seconds)), name
        assert 0.45 < abs(data).max() <= 0.5 + 1e-3, name
        clips[name] = data
    wav = clips["music_44k_stereo.wav"]
    assert abs(clips["music_44k_stereo.flac"] - wav).max() == 0  # lossless
    assert abs(clips["music_44k_stereo.ogg"] - wav).std() < 0.01  # lossy, same music
    assert abs(wav[:, 0] - wav[:, 1]).max() > 0.05  # panned, not dual mono


@pytest.mark.slow
def test_shape_assets_at_real_width(tmp_path: Path) -> None:
    assets = build_shape_assets(tmp_path, n_layers=1, llama_only=True)
    try:
        assert assets.mert_dir is None and assets.checkpoint is None
        shard = torch.load(assets.llama_dir / "consolidated.00.pth", mmap=True, weights_only=True)
        assert {k: tuple(v.shape) for k, v in shard.items() if k.startswith(("tok_", "layers.0.feed"))} == {
            "tok_embeddings.weight": (32000, 4096),
            "layers.0.feed_forward.w1.weight": (11008, 4096),
            "layers.0.feed_forward.w2.weight": (4096, 11008),
            "layers.0.feed_forward.w3.weight": (11008, 4096),
        }
        assert torch.equal(
            shard["layers.0.attention.wq.weight"][:8].half().bfloat16(),
            shard["layers.0.attention.wq.weight"][:8],
        )
        del shard
        sp = spm.SentencePieceProcessor(model_file=str(assets.llama_dir / "tokenizer.model"))
        assert (sp.get_piece_size(), sp.bos_id(), sp.eos_id()) == (32000, 1, 2)
    finally:
        shutil.rmtree(assets.root / "llama")  # ~0.9 GB; pytest would keep it among its last three runs
