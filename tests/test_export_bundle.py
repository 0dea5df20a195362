"""``mullama-export bundle`` / ``verify``: named errors for bad input, no half bundles, a failing verify."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from export.build import BundleOptions, build_bundle
from mullama_sdk.errors import BundleError, CheckpointError, ConfigError

ROOT = Path(__file__).parents[1]
FAST = BundleOptions(quants=("f32",), encoder_precisions=("fp32",), verify_llm=False)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "export", *args], capture_output=True, text=True, cwd=ROOT)


def _src_args(a) -> list[str]:
    return ["--checkpoint", str(a.checkpoint), "--llama-dir", str(a.llama_dir), "--mert-dir", str(a.mert_dir)]


def test_verify_passes_and_shows_llm_row(tiny_bundle, tiny_assets):
    r = _cli("verify", str(tiny_bundle), *_src_args(tiny_assets), "--audio",
             str(tiny_assets.audio["music_24k_mono.wav"]), "--checksums")
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line for line in r.stdout.splitlines() if "/" in line.split(" ")[0]}
    assert {"encoder/fp32", "adapter/int8", "llm/f32", "llm/q4_k_m"} <= set(rows)
    assert all("PASS" in line for line in rows.values())


def test_verify_fails_against_another_checkpoint(tiny_bundle, tiny_assets, tmp_path):
    raw = torch.load(tiny_assets.checkpoint, weights_only=False)
    raw["model"]["mu_mert_proj.bias"] = raw["model"]["mu_mert_proj.bias"] + 0.5
    other = tmp_path / "other.pth"
    torch.save(raw, other)
    args = _src_args(tiny_assets)
    args[1] = str(other)
    r = _cli("verify", str(tiny_bundle), *args, "--skip-llm")
    assert r.returncode == 2
    assert "FAIL" in r.stdout and "adapter/fp32" in r.stderr


def test_bad_inputs_get_named_errors(tiny_assets, tmp_path):
    raw = torch.load(tiny_assets.checkpoint, weights_only=False)
    del raw["model"]["llama.layers.0.feed_forward.lora_w2_l1.weight"]
    broken = tmp_path / "broken.pth"
    torch.save(raw, broken)
    with pytest.raises(CheckpointError, match=r"lora_w2_l1"):
        build_bundle(broken, tiny_assets.llama_dir, tiny_assets.mert_dir, tmp_path / "b1", options=FAST)

    llama = tmp_path / "llama"
    shutil.copytree(tiny_assets.llama_dir, llama)
    shutil.copy(tiny_assets.tokenizer, llama)  # the flat layout: tokenizer.model beside the weights
    params = json.loads((llama / "params.json").read_text())
    params["n_heads"] = 8
    params["dim"] = 128
    (llama / "params.json").write_text(json.dumps(params))
    r = _cli("bundle", *_src_args(tiny_assets)[:2], "--llama-dir", str(llama), "--mert-dir",
             str(tiny_assets.mert_dir), "--out", str(tmp_path / "b2"))
    assert r.returncode == 2 and "tok_embeddings" in r.stderr and "Traceback" not in r.stderr

    mert = tmp_path / "mert"
    shutil.copytree(tiny_assets.mert_dir, mert)
    cfg = json.loads((mert / "config.json").read_text())
    cfg["feature_extractor_cqt"] = True
    (mert / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="feature_extractor_cqt"):
        build_bundle(tiny_assets.checkpoint, tiny_assets.llama_dir, mert, tmp_path / "b3", options=FAST)
    assert not any(p.name.startswith(("b1", "b2", "b3", ".b")) for p in tmp_path.iterdir())


def test_output_folder_problems(tiny_assets, tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        build_bundle(tiny_assets.checkpoint, tiny_assets.llama_dir, tiny_assets.mert_dir,
                     tmp_path / "no" / "such" / "b", options=FAST)
    with pytest.raises(BundleError, match="cannot write the bundle"):
        build_bundle(tiny_assets.checkpoint, tiny_assets.llama_dir, tiny_assets.mert_dir,
                     Path("/proc/mullama-bundle"), options=FAST)
    (tmp_path / "exists").mkdir()
    with pytest.raises(BundleError, match="already exists"):
        build_bundle(tiny_assets.checkpoint, tiny_assets.llama_dir, tiny_assets.mert_dir, tmp_path / "exists",
                     options=FAST)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_interrupted_export_leaves_nothing(tiny_assets, tmp_path, monkeypatch, exc):
    import export.gguf_export

    def boom(*a, **k):
        raise exc("interrupted")

    monkeypatch.setattr(export.gguf_export, "write_gguf", boom)
    with pytest.raises(exc):
        build_bundle(tiny_assets.checkpoint, tiny_assets.llama_dir, tiny_assets.mert_dir, tmp_path / "b",
                     options=FAST)
    assert os.listdir(tmp_path) == []


def test_failed_verification_writes_no_bundle(tiny_assets, tmp_path, monkeypatch):
    import export.verify

    monkeypatch.setitem(export.verify.ONNX_TOLERANCES, ("encoder", "fp32"), (0.0, None))
    with pytest.raises(BundleError, match="verification failed for encoder/fp32"):
        build_bundle(tiny_assets.checkpoint, tiny_assets.llama_dir, tiny_assets.mert_dir, tmp_path / "b",
                     options=FAST)
    assert os.listdir(tmp_path) == []


def test_own_training_checkpoint_exports(tiny_assets, reference_model, tmp_path):
    from mullama_sdk import Captioner
    from training.reference.checkpoint_layout import module_to_published
    from training.reference.loading import save_checkpoint

    state = module_to_published({k: v for k, v in reference_model.state_dict().items()
                                 if not k.startswith("mert.") and "layers.0.attention.wq.weight" not in k})
    state = {k: v for k, v in state.items() if "lora" in k or "bias" in k or "gate" in k or "norm" in k
             or k.startswith("mu_mert_") or k == "prefix_query.weight"}
    ckpt = tmp_path / "ours.pth"
    save_checkpoint(ckpt, state, reference_model.config, stage="finetune", step=1)
    out = build_bundle(ckpt, tiny_assets.llama_dir, tiny_assets.mert_dir, tmp_path / "ours.bundle", options=FAST)
    clip = tiny_assets.audio["music_24k_mono.wav"]
    with Captioner.from_pretrained(out, exact=True) as cap:
        got = cap.caption(clip, max_new_tokens=16, temperature=0)
    assert list(got.tokens) == reference_model.generate(clip, max_new_tokens=16, temperature=0).tokens
    assert json.loads((out / "mullama.json").read_text())["source"]["kind"] == "mullama"


def test_torch_music_model_is_freed_before_quantizing(tiny_assets, tmp_path, monkeypatch):
    """build_bundle keeps only the torch model's outputs for the checks: no MullamaModel is alive while the
    int8 variants and the GGUF are made (at real size it is 4 GB under quantization's own peak)."""
    import gc

    import export.gguf_export
    import export.onnx_precision
    from training.reference.model import MullamaModel

    def models_alive() -> int:
        gc.collect()
        return sum(type(o) is MullamaModel for o in gc.get_objects())  # type(): no attribute lookups

    before = models_alive()          # other tests' session fixtures may hold reference models
    alive: dict[str, int] = {}

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            alive[name] = models_alive() - before
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(export.onnx_precision, "quantize_int8", spy("quantize_int8", export.onnx_precision.quantize_int8))
    monkeypatch.setattr(export.gguf_export, "write_gguf", spy("write_gguf", export.gguf_export.write_gguf))
    build_bundle(tiny_assets.checkpoint, tiny_assets.llama_dir, tiny_assets.mert_dir, tmp_path / "b",
                 options=BundleOptions(quants=("f32",), encoder_precisions=("fp32", "int8"), verify_llm=False))
    assert alive == {"quantize_int8": 0, "write_gguf": 0}


def test_music_export_in_a_child_process_gives_the_same_bundle(tiny_assets, tmp_path, monkeypatch):
    """isolate_music_export=True (the default for big music models) runs the torch part in a child process:
    byte-identical files and the same verification."""
    import hashlib

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1767225600")
    digests = {}
    for isolate in (False, True):
        out = build_bundle(tiny_assets.checkpoint, tiny_assets.llama_dir, tiny_assets.mert_dir, tmp_path / str(isolate),
                           options=BundleOptions(quants=("f32",), encoder_precisions=("fp32", "int8"),
                                                 verify_llm=False, isolate_music_export=isolate))
        digests[isolate] = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(out.iterdir())}
    assert digests[True] == digests[False]
    assert "encoder.int8.onnx" in digests[True]


def test_music_job_errors_come_back_typed(tiny_assets, tmp_path):
    from export.music_export import MusicJob, run_in_child

    job = MusicJob(tmp_path / "missing.pth", tiny_assets.llama_dir, tiny_assets.mert_dir, False, tmp_path, (), 1)
    with pytest.raises(CheckpointError, match="missing.pth"):
        run_in_child(job)
    assert list(tmp_path.iterdir()) == []                        # the job's files are cleaned up
