"""Checkpoints written by the recipes are complete models: the reference loads them, the export bundles them.

Pretrain (fresh adapter) -> finetune (fresh deltas) on the tiny model, then the SDK's greedy tokens
on the exported bundle must equal the torch reference's on the same checkpoint.
"""

from __future__ import annotations

import json

import pytest
import torch

from export.build import BundleOptions, build_bundle
from mullama_sdk import Captioner
from tests.test_training_recipes import TINY_JSON, run_recipe, tiny_config
from training.reference.build import load_reference
from training.reference.dims import DeltaDims
from training.reference.loading import read_checkpoint

FAST = BundleOptions(quants=("f32",), encoder_precisions=("fp32",), verify_llm=False)


@pytest.fixture(scope="module")
def trained(tiny_assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    cache = root / "features"
    # A high learning rate so that three steps move every trained tensor visibly.
    pre = run_recipe(tiny_config(tiny_assets, root / "pretrain", "pretrain", "optim.lr=5e-2", cache=cache))
    fine = run_recipe(tiny_config(tiny_assets, root / "finetune", "finetune", f"model.init_checkpoint={pre.checkpoint}",
                                  "optim.lr=5e-2", cache=cache))
    return pre.checkpoint, fine.checkpoint


def _check_bundle(ckpt, assets, out):
    clip = assets.audio["music_44k_stereo.wav"]
    ref = load_reference(ckpt, assets.llama_dir, assets.mert_dir).generate(clip, temperature=0, max_new_tokens=16)
    bundle = build_bundle(ckpt, assets.llama_dir, assets.mert_dir, out, options=FAST)
    with Captioner.from_pretrained(bundle, exact=True) as cap:
        got = cap.caption(clip, temperature=0, max_new_tokens=16)
    assert len(ref.tokens) > 0
    assert list(got.tokens) == ref.tokens
    return bundle


def test_finetune_checkpoint_exports_and_matches_reference(trained, tiny_assets, tmp_path):
    _, fine = trained
    ck = read_checkpoint(fine)
    # Complete on top of the base folders: adapter, prefix queries, gates, norms, biases, LoRA.
    assert ck.info["stage"] == "finetune" and ck.config["deltas"] == {"bias": True, "lora_rank": 4}
    assert {"mu_mert_proj.weight", "prefix_query.weight", "llama.layers.3.attention.gate", "llama.norm.weight",
            "llama.layers.0.attention.wq.bias", "llama.layers.0.feed_forward.lora_w3_l2.weight"} <= set(ck.model)
    assert not any(k.endswith(("wq.weight", "w1.weight")) or k.startswith("mert_model.") for k in ck.model)
    # Finetuning moved the deltas away from their zero start and left the adapter alone.
    assert ck.model["llama.layers.0.feed_forward.lora_w3_l2.weight"].abs().max() > 0
    pre = read_checkpoint(trained[0])
    assert torch.equal(pre.model["mu_mert_proj.weight"], ck.model["mu_mert_proj.weight"])
    bundle = _check_bundle(fine, tiny_assets, tmp_path / "fine.bundle")

    # `mullama-train eval` through the SDK on that bundle.
    from training.evaluation.evaluate import main

    report = tmp_path / "eval.json"
    assert main(["--data", str(TINY_JSON), "--audio-dir", str(tiny_assets.root / "audio"), "--bundle", str(bundle),
                 "--max-new-tokens", "8", "--no-progress", "--out", str(report)]) == 0
    got = json.loads(report.read_text())
    assert got["answers_from"].startswith("bundle") and got["n"] == 4 and "compat" in got["control"]


def test_pretrain_checkpoint_loads_without_deltas(trained, tiny_assets):
    pre, _ = trained
    model = load_reference(pre, tiny_assets.llama_dir, tiny_assets.mert_dir)
    assert model.config.deltas == DeltaDims(bias=False, lora_rank=0)
    assert not any("lora" in n or n.endswith(".bias") and n.startswith("llama.") for n, _ in model.named_parameters())
    gates = [model.llama.layers[l].attention.gate for l in range(model.config.llama.n_layers)]
    assert all(g.abs().max() > 0 for g in gates[2:]) and all(g.abs().max() == 0 for g in gates[:2])


@pytest.mark.slow
def test_pretrain_checkpoint_exports_and_matches_reference(trained, tiny_assets, tmp_path):
    _check_bundle(trained[0], tiny_assets, tmp_path / "pre.bundle")
