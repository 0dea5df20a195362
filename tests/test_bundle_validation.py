"""Broken bundles fail with BundleError naming the problem, before anything native loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mullama_sdk import BundleError, Captioner
from mullama_sdk.bundle_files import safe_member
from mullama_sdk.manifest import MANIFEST_NAME, load_manifest


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path) -> Path:
    dst = tmp_path / "b"
    shutil.copytree(tiny_bundle, dst)
    return dst


def _edit_manifest(folder: Path, edit) -> None:
    path = folder / MANIFEST_NAME
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))


def _load(folder: Path, **kw):
    return Captioner.from_pretrained(folder, quant="f32", encoder_precision="fp32", **kw)


def test_manifest_describes_the_bundle(tiny_bundle):
    m = load_manifest(tiny_bundle)
    assert m.dims.n_embd == 64 and m.dims.n_layer == 4 and m.inject_layers == (2, 3)
    assert set(m.llm) == {"f32", "q8_0", "q4_k_m"} and set(m.encoder) == {"fp32", "fp16", "int8"}
    assert m.default_encoder_precision == "int8" and m.default_quant == "f32"
    assert all(row["passed"] for row in m.verification.values()) and "llm/f32" in m.verification
    assert m.verification["llm/f32"]["max_abs"] <= 1e-3
    assert m.verification["adapter/int8"]["min_cosine"] >= 0.99
    for name, entry in m.files.items():
        assert (tiny_bundle / name).stat().st_size == entry.size
    assert {"mullama_sdk", "onnx_opset", "llama-cpp-python"} <= set(m.versions)
    assert any("multiples of 256" in n for n in m.notes)  # the tiny dims' K-quant fallback is stated


def test_missing_folder_and_manifest(tmp_path):
    with pytest.raises(BundleError, match="not found"):
        _load(tmp_path / "nope")
    with pytest.raises(BundleError, match="no mullama.json"):
        _load(tmp_path)


def test_missing_file(bundle_copy):
    (bundle_copy / "llm.f32.gguf").unlink()
    with pytest.raises(BundleError, match=r"missing: llm\.f32\.gguf"):
        _load(bundle_copy)


def test_truncated_gguf_and_onnx(bundle_copy):
    gguf = bundle_copy / "llm.f32.gguf"
    gguf.write_bytes(gguf.read_bytes()[:1000])
    with pytest.raises(BundleError, match=r"llm\.f32\.gguf has 1000 bytes"):
        _load(bundle_copy)


def test_wrong_sha256(bundle_copy):
    onnx = bundle_copy / "adapter.fp32.onnx"
    data = bytearray(onnx.read_bytes())
    data[-10] ^= 0xFF
    onnx.write_bytes(bytes(data))
    _load(bundle_copy).close()  # same size: only the checksum can tell
    with pytest.raises(BundleError, match=r"adapter\.fp32\.onnx fails its sha256"):
        _load(bundle_copy, verify_checksums=True)


def test_newer_format_version(bundle_copy):
    _edit_manifest(bundle_copy, lambda m: m.update(format_version=99))
    with pytest.raises(BundleError, match="newer than this mullama-sdk reads"):
        _load(bundle_copy)


def test_dims_disagree_with_gguf(bundle_copy):
    _edit_manifest(bundle_copy, lambda m: m["dims"].update(n_ff=m["dims"]["n_ff"] * 2))
    with pytest.raises(BundleError, match="feed_forward_length"):
        _load(bundle_copy)
    _edit_manifest(bundle_copy, lambda m: (m["dims"].update(n_ff=m["dims"]["n_ff"] // 2),
                                           m.update(inject_layers=[1, 3])))
    with pytest.raises(BundleError, match="inject_layers"):
        _load(bundle_copy)


def test_paths_cannot_escape(bundle_copy, tmp_path):
    outside = tmp_path / "evil.gguf"
    shutil.copy(bundle_copy / "llm.f32.gguf", outside)

    def escape(m):
        m["files"]["../evil.gguf"] = m["files"]["llm.f32.gguf"]
        m["llm"]["f32"] = "../evil.gguf"

    _edit_manifest(bundle_copy, escape)
    with pytest.raises(BundleError, match="inside the bundle"):
        _load(bundle_copy)
    with pytest.raises(BundleError):
        safe_member(bundle_copy, "/etc/passwd")
    (bundle_copy / "link.gguf").symlink_to(outside)
    with pytest.raises(BundleError, match="outside the bundle"):
        safe_member(bundle_copy, "link.gguf")


def test_unknown_variant_and_bad_json(bundle_copy):
    with pytest.raises(BundleError, match=r"quant='q2_k' is not in this bundle"):
        Captioner.from_pretrained(bundle_copy, quant="q2_k")
    (bundle_copy / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(BundleError, match="cannot read"):
        _load(bundle_copy)


def test_runtime_never_imports_torch(tiny_bundle, tiny_assets):
    import subprocess
    import sys

    code = ("import sys; from mullama_sdk import Captioner; "
            f"c = Captioner.from_pretrained({str(tiny_bundle)!r}); "
            f"c.caption({str(tiny_assets.audio['music_24k_mono.wav'])!r}, max_new_tokens=3); "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
