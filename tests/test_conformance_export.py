"""Conformance end to end: ``mullama-export bundle`` with its default precisions on MU-LLaMA inputs laid out
exactly as they are published, and the bundle it writes loads and captions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from mullama_sdk import Captioner

ROOT = Path(__file__).parents[1]


def test_default_export_of_published_layouts(tiny_assets, tmp_path):
    llama, mert = tiny_assets.llama_dir, tiny_assets.mert_dir
    # Meta's download layout: the model folder 7B/ (params.json with vocab_size -1, consolidated.00.pth,
    # checklist.chk), tokenizer.model one level up.
    assert llama.name == "7B" and {p.name for p in llama.iterdir()} == {
        "params.json", "consolidated.00.pth", "checklist.chk"}
    assert (llama.parent / "tokenizer.model").is_file()
    assert json.loads((llama / "params.json").read_text())["vocab_size"] == -1
    # MERT-v1-330M's config.json as published: attention_relax 32.0 and the training-only keys.
    cfg = json.loads((mert / "config.json").read_text())
    assert cfg["attention_relax"] == 32.0 and cfg["model_type"] == "mert_model"
    assert {"gradient_checkpointing", "layerdrop", "mask_channel_prob", "mask_time_selection"} <= set(cfg)

    out = tmp_path / "published.bundle"
    cmd = [sys.executable, "-m", "export", "bundle", "--checkpoint", str(tiny_assets.checkpoint),
           "--llama-dir", str(llama), "--mert-dir", str(mert), "--out", str(out)]  # default precisions
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r.returncode == 0, f"{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    manifest = json.loads((out / "mullama.json").read_text())
    files = {p.name for p in out.iterdir()}
    assert {"encoder.fp32.onnx", "encoder.int8.onnx", "llm.q4_k_m.gguf"} <= files
    assert manifest["source"]["kind"] == "published"  # read as MU-LLaMA's checkpoint.pth, not one of ours
    # int8 in the scheme no CPU kernel saturates, so this bound holds on AVX2-only and VNNI machines alike.
    assert manifest["quantization"]["int8"]["scheme"] == "u8s8-w7"
    adapter = manifest["verification"]["adapter/int8"]
    assert adapter["passed"] and adapter["min_cosine"] >= 0.999, adapter

    clip = tiny_assets.audio["music_44k_stereo.wav"]
    with Captioner.from_pretrained(out) as cap:  # the runtime's defaults: int8 encoder, q4_k_m LLM
        got = cap.caption(clip, max_new_tokens=8, temperature=0)
    assert 0 < len(got.tokens) <= 8
