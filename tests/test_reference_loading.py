"""Loaders: strict keys, both checkpoint kinds, base weights from folders or checkpoint, bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mullama_sdk.errors import CheckpointError, ConfigError
from training.checkpoint_layout import module_to_published
from training.loading import CHECKPOINT_FORMAT, load_reference, save_checkpoint, torch_load

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
    llama = _copy_folder(tiny_assets.llama_dir, tmp_path / "llama")
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
    llama = _copy_folder(tiny_assets.llama_dir, tmp_path / "llama")
    (llama / "consolidated.00.pth").unlink()
    m = load_reference(tiny_assets.checkpoint, llama, tiny_assets.mert_dir)
    torch.testing.assert_close(_logits(m), _logits(reference), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="no consolidated"):
        load_reference(tiny_assets.checkpoint_deltas, llama, tiny_assets.mert_dir)


def test_params_json_disagreeing_with_tensors(tiny_assets, tmp_path):
    llama = _copy_folder(tiny_assets.llama_dir, tmp_path / "llama")
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
                                         ("do_stable_layer_norm", False), ("attention_relax", 32.0)])
def test_unsupported_mert_configs_are_refused(tiny_assets, tmp_path, field, value):
    mert = _copy_folder(tiny_assets.mert_dir, tmp_path / "mert")
    cfg = json.loads((mert / "config.json").read_text())
    cfg[field] = value
    (mert / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=field):
        load_reference(tiny_assets.checkpoint, tiny_assets.llama_dir, mert)


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
    cmd = [sys.executable, "-m", "training.reference", "--checkpoint", str(tiny_assets.checkpoint),
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
