"""Loaders: strict keys, both checkpoint kinds, base weights from folders or checkpoint, bad input, and the
published folder layouts (MERT-v1-330M's config.json as it is, Meta's LLaMA download, DDP-saved checkpoints)."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mullama_sdk.errors import CheckpointError, ConfigError
from training.reference.build import load_reference
from training.reference.checkpoint_layout import module_to_published
from training.reference.llama_folder import resolve_llama_dir
from training.reference.loading import CHECKPOINT_FORMAT, save_checkpoint, torch_load
from training.reference.mert import MERT_PREPROCESSOR

TOKENS = [1, 30, 31, 32, 33, 34, 35]


def _logits(model, seed=0):
    torch.manual_seed(seed)
    a = model.music_query(torch.randn(model.config.adapter.n_states, model.config.adapter.mert_dim))
    with torch.no_grad():
        return model.logits(TOKENS, a)


@pytest.fixture(scope="module")
def reference(tiny_assets):
    return load_reference(tiny_assets.checkpoint, tiny_assets.llama_dir, tiny_assets.mert_dir)


def _copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _copy_llama(tiny_assets, dst: Path, model_folder: str = "7B") -> Path:
    """A copy of the tiny assets' Meta download layout (tokenizer.model above the model folder) in ``dst``;
    returns the model folder."""
    shutil.copytree(tiny_assets.llama_root, dst)
    if model_folder != tiny_assets.llama_dir.name:
        (dst / tiny_assets.llama_dir.name).rename(dst / model_folder)
    return dst / model_folder


def _write_published(path: Path, sd: dict, **extra) -> Path:
    torch.save({"model": sd, "optimizer": {}, "epoch": 0, "scaler": {}, **extra}, path)
    return path


def _published_sd(tiny_assets) -> dict:
    return dict(torch.load(tiny_assets.checkpoint, map_location="cpu", weights_only=False)["model"])


def test_deltas_plus_folders_equal_full_checkpoint(reference, tiny_assets):
    deltas = load_reference(tiny_assets.checkpoint_deltas, tiny_assets.llama_dir, tiny_assets.mert_dir)
    torch.testing.assert_close(_logits(deltas), _logits(reference), rtol=0, atol=0)
    torch.testing.assert_close(
        deltas.mert(torch.ones(1, 12000) * 0.1)[0], reference.mert(torch.ones(1, 12000) * 0.1)[0], rtol=0, atol=0
    )


def test_meta_shards_are_joined(reference, tiny_assets, tmp_path):
    """Two model-parallel shards (split the way Meta splits them) load like one file."""
    llama = _copy_llama(tiny_assets, tmp_path / "llama")
    full = torch.load(llama / "consolidated.00.pth", weights_only=True)
    shards = ({}, {})
    for k, v in full.items():
        leaf = k.split(".")[-2]
        if v.dim() == 1:
            parts = (v, v)
        else:
            dim = 1 if leaf in ("wo", "w2", "tok_embeddings") else 0
            parts = v.chunk(2, dim=dim)
        for s, p in zip(shards, parts):
            s[k] = p.clone()
    (llama / "consolidated.00.pth").unlink()
    torch.save(shards[0], llama / "consolidated.00.pth")
    torch.save(shards[1], llama / "consolidated.01.pth")
    m = load_reference(tiny_assets.checkpoint_deltas, llama, tiny_assets.mert_dir)
    torch.testing.assert_close(_logits(m), _logits(reference), rtol=0, atol=0)


def test_missing_key_is_named(tiny_assets, tmp_path):
    sd = _published_sd(tiny_assets)
    del sd["llama.layers.1.attention.lora_wk_l2.weight"]
    ckpt = _write_published(tmp_path / "c.pth", sd)
    with pytest.raises(CheckpointError, match=r"missing 1 key\(s\): layers\.1\.attention\.lora_wk_l2\.weight"):
        load_reference(ckpt, tiny_assets.llama_dir, tiny_assets.mert_dir)


def test_unexpected_and_misshaped_keys_are_named(tiny_assets, tmp_path):
    sd = _published_sd(tiny_assets)
    sd["llama.layers.0.attention.wk.bias"] = torch.zeros(4)
    ckpt = _write_published(tmp_path / "c.pth", sd)
    with pytest.raises(CheckpointError, match=r"unexpected 1 key\(s\): layers\.0\.attention\.wk\.bias"):
        load_reference(ckpt, tiny_assets.llama_dir, tiny_assets.mert_dir)
    sd = _published_sd(tiny_assets)
    sd["foo.bar"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="foo.bar"):
        load_reference(_write_published(tmp_path / "d.pth", sd), tiny_assets.llama_dir, tiny_assets.mert_dir)
    sd = _published_sd(tiny_assets)
    w = sd["mu_mert_f2_2.weight"]
    sd["mu_mert_f2_2.weight"] = w[:, :-1]
    with pytest.raises(CheckpointError, match=r"blocks\.1\.w2\.weight"):
        load_reference(_write_published(tmp_path / "e.pth", sd), tiny_assets.llama_dir, tiny_assets.mert_dir)


def test_missing_mert_weights_are_explained(tiny_assets, tmp_path):
    mert = _copy_folder(tiny_assets.mert_dir, tmp_path / "mert")
    for f in ("pytorch_model.bin", "model.safetensors"):
        (mert / f).unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match="no MERT weights"):
        load_reference(tiny_assets.checkpoint_deltas, tiny_assets.llama_dir, mert)
    # The full checkpoint carries mert_model.*: then the folder only supplies the config.
    load_reference(tiny_assets.checkpoint, tiny_assets.llama_dir, mert)


def test_checkpoint_alone_needs_no_llama_shards(reference, tiny_assets, tmp_path):
    llama = _copy_llama(tiny_assets, tmp_path / "llama")
    (llama / "consolidated.00.pth").unlink()
    m = load_reference(tiny_assets.checkpoint, llama, tiny_assets.mert_dir)
    torch.testing.assert_close(_logits(m), _logits(reference), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="no consolidated"):
        load_reference(tiny_assets.checkpoint_deltas, llama, tiny_assets.mert_dir)


def test_params_json_disagreeing_with_tensors(tiny_assets, tmp_path):
    llama = _copy_llama(tiny_assets, tmp_path / "llama")
    params = json.loads((llama / "params.json").read_text())
    params["dim"] = params["dim"] * 2
    (llama / "params.json").write_text(json.dumps(params))
    with pytest.raises(ConfigError, match="tok_embeddings"):
        load_reference(tiny_assets.checkpoint, llama, tiny_assets.mert_dir)
    params["dim"] //= 2
    params["n_layers"] += 1
    (llama / "params.json").write_text(json.dumps(params))
    with pytest.raises(ConfigError, match="n_layers"):
        load_reference(tiny_assets.checkpoint, llama, tiny_assets.mert_dir)


@pytest.mark.parametrize("field,value", [("feature_extractor_cqt", True), ("deepnorm", True),
                                         ("do_stable_layer_norm", False), ("sample_rate", 16000)])
def test_unsupported_mert_configs_are_refused(tiny_assets, tmp_path, field, value):
    mert = _copy_folder(tiny_assets.mert_dir, tmp_path / "mert")
    cfg = json.loads((mert / "config.json").read_text())
    cfg[field] = value
    (mert / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=field) as e:
        load_reference(tiny_assets.checkpoint, tiny_assets.llama_dir, mert)
    assert str(mert / "config.json") in str(e.value)


# The published MERT-v1-330M config.json (m-a-p/MERT-v1-330M): every field it has. MERTConfig's own class, so
# HubertConfig does not know several of them (attention_relax, deepnorm, feature_extractor_cqt*, sample_rate,
# auto_map, the fairseq mask_channel_* / mask_time_{min_space,other,selection} leftovers, gradient_checkpointing).
PUBLISHED_MERT_FIELDS = {
    "_name_or_path", "activation_dropout", "apply_spec_augment", "architectures", "attention_dropout",
    "attention_relax", "auto_map", "bos_token_id", "classifier_proj_size", "conv_bias", "conv_dim", "conv_kernel",
    "conv_stride", "ctc_loss_reduction", "ctc_zero_infinity", "deepnorm", "do_stable_layer_norm", "eos_token_id",
    "feat_extract_activation", "feat_extract_dropout", "feat_extract_norm", "feat_proj_dropout",
    "feat_proj_layer_norm", "feature_extractor_cqt", "feature_extractor_cqt_bins", "final_dropout",
    "gradient_checkpointing", "hidden_act", "hidden_dropout", "hidden_size", "initializer_range",
    "intermediate_size", "layer_norm_eps", "layerdrop", "mask_channel_length", "mask_channel_min_space",
    "mask_channel_other", "mask_channel_prob", "mask_channel_selection", "mask_feature_length",
    "mask_feature_min_masks", "mask_feature_prob", "mask_time_length", "mask_time_min_masks",
    "mask_time_min_space", "mask_time_other", "mask_time_prob", "mask_time_selection", "model_type",
    "num_attention_heads", "num_conv_pos_embedding_groups", "num_conv_pos_embeddings", "num_feat_extract_layers",
    "num_hidden_layers", "pad_token_id", "sample_rate", "tokenizer_class", "torch_dtype", "transformers_version",
    "use_weighted_layer_sum", "vocab_size",
}


def _mert_out(model, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(1, 15000) * 0.1
    with torch.no_grad():
        return model.mert(x)[0]


def _with_mert_config(tiny_assets, tmp_path, **changes) -> Path:
    mert = _copy_folder(tiny_assets.mert_dir, tmp_path / "mert")
    cfg = json.loads((mert / "config.json").read_text())
    cfg.update(changes)
    (mert / "config.json").write_text(json.dumps(cfg, indent=2))
    return mert


def test_published_mert_config_loads_as_is(reference, tiny_assets, tmp_path, caplog):
    """MERT-v1-330M's config.json as published (attention_relax 32.0 included) loads, and quietly."""
    cfg = json.loads((tiny_assets.mert_dir / "config.json").read_text())
    assert set(cfg) == PUBLISHED_MERT_FIELDS
    assert cfg["attention_relax"] == 32.0 and cfg["model_type"] == "mert_model"
    assert cfg["auto_map"]["AutoModel"] == "modeling_MERT.MERTModel" and cfg["architectures"] == ["MERTModel"]
    with caplog.at_level(logging.DEBUG, logger="training"):
        model = load_reference(tiny_assets.checkpoint, tiny_assets.llama_dir, tiny_assets.mert_dir)
    assert not [r for r in caplog.records if "does not know" in r.getMessage()]
    # attention_relax only acts in MERT's deepnorm encoder, which is off: any value gives the same numbers.
    other = load_reference(tiny_assets.checkpoint, tiny_assets.llama_dir,
                           _with_mert_config(tiny_assets, tmp_path, attention_relax=-1.0))
    torch.testing.assert_close(_mert_out(other), _mert_out(model), rtol=0, atol=0)
    torch.testing.assert_close(_logits(other), _logits(reference), rtol=0, atol=0)


def test_training_only_mert_keys_are_ignored(reference, tiny_assets, tmp_path, caplog):
    """Dropouts, masking, layerdrop and checkpointing switches change nothing (MERT runs frozen, in eval)."""
    mert = _with_mert_config(
        tiny_assets, tmp_path, hidden_dropout=0.5, attention_dropout=0.5, activation_dropout=0.5,
        feat_proj_dropout=0.5, final_dropout=0.5, feat_extract_dropout=0.5, hidden_dropout_prob=0.5,
        layerdrop=0.9, gradient_checkpointing=True, mask_time_prob=0.5, mask_time_length=3,
        mask_channel_prob=0.5, mask_channel_selection="normal", mask_time_selection="uniform",
    )
    with caplog.at_level(logging.DEBUG, logger="training"):
        model = load_reference(tiny_assets.checkpoint, tiny_assets.llama_dir, mert)
    assert not [r for r in caplog.records if "does not know" in r.getMessage()]
    assert not model.mert.training
    for seed in (0, 1):
        torch.testing.assert_close(_mert_out(model, seed), _mert_out(reference, seed), rtol=0, atol=0)


def test_unknown_mert_fields_are_logged_not_refused(reference, tiny_assets, tmp_path, caplog):
    mert = _with_mert_config(tiny_assets, tmp_path, some_future_field=7, another_note="x")
    with caplog.at_level(logging.INFO, logger="training"):
        model = load_reference(tiny_assets.checkpoint, tiny_assets.llama_dir, mert)
    notes = [r for r in caplog.records if "does not know" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelno == logging.INFO
    assert "another_note, some_future_field" in notes[0].getMessage()
    assert str(mert / "config.json") in notes[0].getMessage()
    torch.testing.assert_close(_mert_out(model), _mert_out(reference), rtol=0, atol=0)


def test_published_preprocessor_config_is_accepted(tiny_assets, tmp_path):
    pre = json.loads((tiny_assets.mert_dir / "preprocessor_config.json").read_text())
    # MERT-v1-330M's preprocessor_config.json, field for field.
    assert pre == {"do_normalize": False, "feature_extractor_type": "Wav2Vec2FeatureExtractor", "feature_size": 1,
                   "padding_side": "right", "padding_value": 0.0, "return_attention_mask": True,
                   "sampling_rate": 24000}
    assert pre == MERT_PREPROCESSOR
    # The file is optional (the spec's preprocessing is then assumed).
    mert = _copy_folder(tiny_assets.mert_dir, tmp_path / "mert")
    (mert / "preprocessor_config.json").unlink()
    assert load_reference(tiny_assets.checkpoint, tiny_assets.llama_dir, mert).config.mert_do_normalize is False


@pytest.mark.parametrize("field,value", [
    ("sampling_rate", 16000), ("do_normalize", True), ("do_normalize", None), ("feature_size", 2),
    ("feature_extractor_type", "SeamlessM4TFeatureExtractor"),
])
def test_preprocessor_config_that_changes_the_input_is_refused(tiny_assets, tmp_path, field, value):
    mert = _copy_folder(tiny_assets.mert_dir, tmp_path / "mert")
    pre = json.loads((mert / "preprocessor_config.json").read_text())
    if value is None:
        del pre[field]  # Wav2Vec2FeatureExtractor normalises when do_normalize is absent
    else:
        pre[field] = value
    (mert / "preprocessor_config.json").write_text(json.dumps(pre))
    with pytest.raises(ConfigError, match=field) as e:
        load_reference(tiny_assets.checkpoint, tiny_assets.llama_dir, mert)
    assert str(mert / "preprocessor_config.json") in str(e.value)


# ---- LLaMA folder layouts -----------------------------------------------------------------------------------
def test_tokenizer_one_level_up(reference, tiny_assets, tmp_path):
    """Meta's download layout: tokenizer.model beside the model folder, not in it (what the fixture writes)."""
    assert not (tiny_assets.llama_dir / "tokenizer.model").exists()
    assert tiny_assets.tokenizer == tiny_assets.llama_dir.parent / "tokenizer.model"
    assert reference.tokenizer.path == tiny_assets.tokenizer
    # The flat folder (tokenizer next to the weights) gives the same model; the one next to the weights wins.
    flat = _copy_folder(tiny_assets.llama_dir, tmp_path / "flat")
    shutil.copy(tiny_assets.tokenizer, flat)
    m = load_reference(tiny_assets.checkpoint_deltas, flat, tiny_assets.mert_dir)
    assert m.tokenizer.path == flat / "tokenizer.model"
    torch.testing.assert_close(_logits(m), _logits(reference), rtol=0, atol=0)
    # No tokenizer in either place: the error names both folders and where Meta keeps it.
    (flat / "tokenizer.model").unlink()
    with pytest.raises(ConfigError, match="tokenizer.model") as e:
        load_reference(tiny_assets.checkpoint_deltas, flat, tiny_assets.mert_dir)
    assert str(flat) in str(e.value) and str(tmp_path) in str(e.value) and "one level above" in str(e.value)


@pytest.mark.parametrize("model_folder", ["7B", "llama-2-7b"])
def test_parent_folder_holding_one_model(reference, tiny_assets, tmp_path, caplog, model_folder):
    weights = _copy_llama(tiny_assets, tmp_path / "llama", model_folder)
    assert resolve_llama_dir(weights).weights == weights
    with caplog.at_level(logging.INFO, logger="training"):
        m = load_reference(tiny_assets.checkpoint_deltas, tmp_path / "llama", tiny_assets.mert_dir)
    torch.testing.assert_close(_logits(m), _logits(reference), rtol=0, atol=0)
    assert any(model_folder in r.getMessage() and "only model folder" in r.getMessage() for r in caplog.records)
    # Two model folders: which one is meant would be a guess.
    _copy_folder(weights, tmp_path / "llama" / "llama-2-13b")
    with pytest.raises(ConfigError, match="2 LLaMA model folders") as e:
        load_reference(tiny_assets.checkpoint_deltas, tmp_path / "llama", tiny_assets.mert_dir)
    assert model_folder in str(e.value) and "llama-2-13b" in str(e.value) and "--llama-dir" in str(e.value)


def test_params_json_vocab_size_minus_one(reference, tiny_assets, tmp_path):
    """LLaMA-2's params.json says vocab_size -1: the size is the tokenizer's."""
    params = json.loads((tiny_assets.llama_dir / "params.json").read_text())
    assert params["vocab_size"] == -1
    assert reference.config.llama.vocab_size == reference.tokenizer.n_vocab == tiny_assets.dims.vocab_size
    # A stated size that disagrees with the tokenizer is refused, naming the file.
    llama = _copy_llama(tiny_assets, tmp_path / "llama")
    params["vocab_size"] = tiny_assets.dims.vocab_size + 1
    (llama / "params.json").write_text(json.dumps(params))
    with pytest.raises(ConfigError, match="vocab_size") as e:
        load_reference(tiny_assets.checkpoint, llama, tiny_assets.mert_dir)
    assert str(llama / "params.json") in str(e.value)


def test_hf_layout_folder_is_refused_with_a_hint(tiny_assets, tmp_path):
    for weights in ("model.safetensors", "pytorch_model-00001-of-00002.bin"):
        hf = tmp_path / weights.split(".")[0]
        hf.mkdir()
        (hf / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
        (hf / weights).write_bytes(b"")
        shutil.copy(tiny_assets.tokenizer, hf)
        with pytest.raises(ConfigError, match="HF-layout") as e:
            load_reference(tiny_assets.checkpoint, hf, tiny_assets.mert_dir)
        assert str(hf) in str(e.value) and "params.json" in str(e.value) and "original" in str(e.value)
    with pytest.raises(ConfigError, match="no params.json"):
        load_reference(tiny_assets.checkpoint, tmp_path, tiny_assets.mert_dir)


def test_ddp_prefixed_checkpoint_is_accepted(reference, tiny_assets, tmp_path, caplog):
    """A state dict saved from a DDP-wrapped model has ``module.`` on every key: stripped, with a note."""
    sd = {f"module.{k}": v for k, v in _published_sd(tiny_assets).items()}
    ckpt = _write_published(tmp_path / "ddp.pth", sd)
    with caplog.at_level(logging.INFO, logger="training"):
        m = load_reference(ckpt, tiny_assets.llama_dir, tiny_assets.mert_dir)
    torch.testing.assert_close(_logits(m), _logits(reference), rtol=0, atol=0)
    notes = [r for r in caplog.records if "DDP" in r.getMessage()]
    assert len(notes) == 1 and "module." in notes[0].getMessage() and str(ckpt) in notes[0].getMessage()
    # Only on some keys: not a DDP save; the strays are named.
    sd = _published_sd(tiny_assets)
    sd["module.prefix_query.weight"] = sd.pop("prefix_query.weight")
    with pytest.raises(CheckpointError, match=r"module\.prefix_query\.weight"):
        load_reference(_write_published(tmp_path / "half.pth", sd), tiny_assets.llama_dir, tiny_assets.mert_dir)


def test_weight_norm_key_spellings_are_equivalent(reference, tiny_assets, tmp_path):
    sd = _published_sd(tiny_assets)
    for old, new in (("weight_g", "parametrizations.weight.original0"),
                     ("weight_v", "parametrizations.weight.original1")):
        sd[f"mert_model.encoder.pos_conv_embed.conv.{new}"] = sd.pop(f"mert_model.encoder.pos_conv_embed.conv.{old}")
    m = load_reference(_write_published(tmp_path / "c.pth", sd), tiny_assets.llama_dir, tiny_assets.mert_dir)
    x = torch.randn(1, 15000) * 0.1
    with torch.no_grad():
        torch.testing.assert_close(m.mert(x)[0], reference.mert(x)[0], rtol=0, atol=0)


def test_own_format_round_trip(reference, tiny_assets, tmp_path):
    state = module_to_published(
        {k: v for k, v in reference.state_dict().items() if not k.startswith("mert.")}
    )
    path = tmp_path / "ours.pth"
    save_checkpoint(path, state, reference.config, stage="finetune", step=3)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == CHECKPOINT_FORMAT and raw["stage"] == "finetune" and raw["config"]["llama"]["dim"]
    m = load_reference(path, tiny_assets.llama_dir, tiny_assets.mert_dir)
    torch.testing.assert_close(_logits(m), _logits(reference), rtol=0, atol=0)
    raw["format_version"] = 99
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match="newer"):
        load_reference(path, tiny_assets.llama_dir, tiny_assets.mert_dir)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_arbitrary_pickles_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "args": _Evil()}, path)
    with pytest.raises(CheckpointError, match="trust"):
        torch_load(path)


def test_reference_cli_json(tiny_assets):
    clip = next(iter(tiny_assets.audio.values()))
    cmd = [sys.executable, "-m", "training.reference.greedy", "--checkpoint", str(tiny_assets.checkpoint),
           "--llama-dir", str(tiny_assets.llama_dir), "--mert-dir", str(tiny_assets.mert_dir),
           "--audio", str(clip), "--max-new-tokens", "6", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1])
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(rec) >= {"tokens", "text", "prompt_tokens"}
    assert rec["prompt_tokens"][0] == 1 and 0 < len(rec["tokens"]) <= 6
    bad_cmd = [str(tiny_assets.root / "nope.wav") if c == str(clip) else c for c in cmd]
    bad = subprocess.run(bad_cmd,
                         capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert bad.returncode == 2 and "error:" in bad.stderr and "nope.wav" in bad.stderr
