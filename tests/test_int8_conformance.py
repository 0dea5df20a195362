"""int8 that is right on every x86 CPU (issue: AVX2-only kernels saturate full-range int8 weights).

What holds whatever CPU runs these tests:
* structurally, from the files: every int8 MatMul weight of a new bundle lies in [-64, 64], so no kernel can
  saturate (255 * 64 * 2 = 32640 <= 32767) and every kernel computes the same integers; full-range (legacy)
  graphs do exceed it, so the check can fail;
* the runtime's choice: a legacy bundle on a saturating kernel falls back to fp32 with one warning line, on an
  exact kernel (or for a new bundle) it keeps int8; the kernel is injected, so both branches run everywhere;
* ``mullama-export requantize`` turns a legacy bundle into a current one in place, or leaves it untouched;
* greedy decoding with the int8 encoder picks fp32's token wherever fp32's top-2 logit margin exceeds 0.05
  (teacher-forced on fp32's own greedy caption, so one low-margin step cannot hide the later ones).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mullama_sdk.encoder_backend as encoder_backend
from export.onnx_precision import META_INT8_SCHEME, int8_weight_limit, quantize_int8
from export.requantize import requantize_bundle
from mullama_sdk.bundle_files import check_files
from mullama_sdk.constants import SAMPLE_RATE_HZ
from mullama_sdk.cpu import INT8_SCHEME, INT8_WEIGHT_LIMIT, LEGACY_INT8_SCHEME, Int8Kernel, int8_kernel
from mullama_sdk.errors import BundleError
from mullama_sdk.manifest import MANIFEST_NAME, load_manifest

ROOT = Path(__file__).resolve().parents[1]
DEMO_BUNDLE = ROOT / "examples" / "demo_bundle"
#: The acceptance bound on greedy agreement: fp32's top-2 logit margin above which int8 must agree.
MARGIN = 0.05
SATURATING = Int8Kernel("avx2", False)
EXACT = Int8Kernel("avx512-vnni", True)


def _metadata(path: Path) -> dict[str, str]:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def _legacy_copy(bundle: Path, dest: Path) -> Path:
    """A copy of ``bundle`` as an older exporter wrote it: full-range int8 graphs, no recorded scheme."""
    from mullama_sdk.files import sha256_file

    shutil.copytree(bundle, dest)
    raw = json.loads((dest / MANIFEST_NAME).read_text())
    for graph in ("encoder", "adapter"):
        quantize_int8(dest / raw[graph]["fp32"], dest / raw[graph]["int8"], reduce_range=False)
        name = raw[graph]["int8"]
        raw["files"][name] = {"size": (dest / name).stat().st_size, "sha256": sha256_file(dest / name)}
    raw.pop("quantization", None)
    (dest / MANIFEST_NAME).write_text(json.dumps(raw, indent=2))
    return dest


@pytest.fixture(scope="module")
def legacy_bundle(tiny_bundle, tmp_path_factory) -> Path:
    return _legacy_copy(Path(tiny_bundle), tmp_path_factory.mktemp("legacy") / "legacy.bundle")


# ------------------------------------------------------------------------------------------ the files
def test_new_int8_graphs_cannot_saturate(tiny_bundle):
    m = load_manifest(Path(tiny_bundle))
    assert m.int8_scheme == INT8_SCHEME
    assert m.raw["quantization"]["int8"]["scheme"] == INT8_SCHEME
    for graph in ("encoder", "adapter"):
        path = Path(tiny_bundle) / getattr(m, graph)["int8"]
        assert int8_weight_limit(path) <= INT8_WEIGHT_LIMIT, graph
        assert _metadata(path)[META_INT8_SCHEME] == INT8_SCHEME
        row = m.verification[f"{graph}/int8"]
        assert row["passed"] and row["min_cosine"] >= 0.999, row
        assert f"|w| <= {INT8_WEIGHT_LIMIT}" in row["tolerance"]


def test_full_range_graphs_exceed_the_limit(legacy_bundle):
    """The structural check is not vacuous: 8-bit weights use the range a saturating kernel cannot take."""
    m = load_manifest(legacy_bundle)
    assert m.int8_scheme == LEGACY_INT8_SCHEME
    for graph in ("encoder", "adapter"):
        path = legacy_bundle / getattr(m, graph)["int8"]
        assert int8_weight_limit(path) > INT8_WEIGHT_LIMIT
        assert _metadata(path)[META_INT8_SCHEME] == LEGACY_INT8_SCHEME


def test_unknown_scheme_is_refused(tiny_bundle, tmp_path):
    dest = tmp_path / "b"
    shutil.copytree(tiny_bundle, dest)
    raw = json.loads((dest / MANIFEST_NAME).read_text())
    raw["quantization"]["int8"]["scheme"] = "s4s4-w3"
    (dest / MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(BundleError, match=r"quantization\.int8\.scheme 's4s4-w3' is unknown"):
        load_manifest(dest)


# ---------------------------------------------------------------------------------------- the kernel
@pytest.mark.parametrize(("flags", "machine", "name", "exact"), [
    ({"avx2", "avx512f", "avx512_vnni"}, "x86_64", "avx512-vnni", True),
    ({"avx2", "avx_vnni"}, "x86_64", "avx-vnni", True),
    ({"avx2", "fma"}, "x86_64", "avx2", False),
    (set(), "AMD64", "x86", False),
    (set(), "aarch64", "non-x86", True),
])
def test_int8_kernel_from_flags(flags, machine, name, exact):
    k = int8_kernel(frozenset(flags), machine)
    assert (k.name, k.exact) == (name, exact)


def test_this_machine_is_named():
    k = int8_kernel()
    print(f"this CPU's int8 kernel: {k.describe()}")
    assert k.name in ("avx512-vnni", "avx-vnni", "avx2", "x86", "non-x86")


# ------------------------------------------------------------------------------------ runtime choice
def _choose(bundle: Path, kernel: Int8Kernel, monkeypatch, **kw) -> str:
    monkeypatch.setattr(encoder_backend, "int8_kernel", lambda: kernel)
    return encoder_backend.choose_encoder_backend(load_manifest(bundle), device="cpu", **kw).onnx_precision


def test_legacy_bundle_falls_back_on_a_saturating_cpu(legacy_bundle, monkeypatch, caplog):
    with caplog.at_level(logging.WARNING, logger="mullama_sdk.encoder_backend"):
        assert _choose(legacy_bundle, SATURATING, monkeypatch) == "fp32"
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert "using the fp32 graphs" in lines[0] and "mullama-export requantize" in lines[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mullama_sdk.encoder_backend"):  # asked for by name: kept, warned
        assert _choose(legacy_bundle, SATURATING, monkeypatch, encoder_precision="int8") == "int8"
    assert any("it was asked for" in r.getMessage() for r in caplog.records)


def test_int8_is_kept_where_it_is_right(legacy_bundle, tiny_bundle, monkeypatch, caplog):
    with caplog.at_level(logging.WARNING, logger="mullama_sdk.encoder_backend"):
        assert _choose(legacy_bundle, EXACT, monkeypatch) == "int8"
        assert _choose(Path(tiny_bundle), SATURATING, monkeypatch) == "int8"
        assert _choose(Path(tiny_bundle), EXACT, monkeypatch) == "int8"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_legacy_bundle_without_fp32_keeps_int8_and_says_so(legacy_bundle, tmp_path, monkeypatch, caplog):
    dest = tmp_path / "int8only"
    shutil.copytree(legacy_bundle, dest)
    raw = json.loads((dest / MANIFEST_NAME).read_text())
    for graph in ("encoder", "adapter"):
        for p in [k for k in raw[graph] if k != "int8"]:
            name = raw[graph].pop(p)
            raw["files"].pop(name)
            (dest / name).unlink()
    (dest / MANIFEST_NAME).write_text(json.dumps(raw))
    with caplog.at_level(logging.WARNING, logger="mullama_sdk.encoder_backend"):
        assert _choose(dest, SATURATING, monkeypatch) == "int8"
    assert any("has no fp32/fp16 graphs" in r.getMessage() for r in caplog.records)
    with pytest.raises(BundleError, match="ships no fp32 encoder graph"):
        requantize_bundle(dest)


# --------------------------------------------------------------------------------------- requantize
def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_requantize_cli_fixes_a_legacy_bundle_in_place(legacy_bundle, tmp_path, monkeypatch, caplog):
    dest = tmp_path / "fixme.bundle"
    shutil.copytree(legacy_bundle, dest)
    before = _files(dest)
    r = subprocess.run([sys.executable, "-m", "export.cli", "requantize", str(dest)], capture_output=True,
                       text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr
    print(r.stdout)
    m = load_manifest(dest)
    assert m.int8_scheme == INT8_SCHEME
    check_files(dest, m, list(m.files), sha256=True)  # every file listed, with the right hash
    after = _files(dest)
    assert set(after) == set(before)
    changed = {n for n in after if after[n] != before[n]}
    assert changed == {m.encoder["int8"], m.adapter["int8"], MANIFEST_NAME}, changed
    for graph in ("encoder", "adapter"):
        assert int8_weight_limit(dest / getattr(m, graph)["int8"]) <= INT8_WEIGHT_LIMIT
        row = m.verification[f"{graph}/int8"]
        assert row["passed"] and row["min_cosine"] >= 0.999 and "fp32 graphs" in row["note"]
    assert any("re-quantized" in n for n in m.notes)
    assert not list(tmp_path.glob(".*partial*")), "the staging folder was left behind"
    with caplog.at_level(logging.WARNING, logger="mullama_sdk.encoder_backend"):  # no fallback any more
        assert _choose(dest, SATURATING, monkeypatch) == "int8"
    assert not caplog.records
    again = requantize_bundle(dest)
    assert not again.changed and _files(dest) == after


def test_failed_requantize_leaves_the_bundle_as_it_was(legacy_bundle, tmp_path, monkeypatch):
    import export.verify as verify

    dest = tmp_path / "keep.bundle"
    shutil.copytree(legacy_bundle, dest)
    before = _files(dest)
    monkeypatch.setitem(verify.ONNX_TOLERANCES, ("adapter", "int8"), (None, 1.0000001))  # cannot pass
    with pytest.raises(BundleError, match=r"adapter/int8 failed verification.*left as it was"):
        requantize_bundle(dest)
    assert _files(dest) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.bundle"]


# ---------------------------------------------------------------------------------- greedy decoding
def _teacher_forced(bundle: Path, clip: np.ndarray, max_new_tokens: int) -> tuple[np.ndarray, list]:
    """fp32's greedy caption, then the logits along it with the fp32 and with the int8 music vectors.

    Returns (fp32's top-2 margin at each generated position, [(position, margin) where int8's argmax differs
    from fp32's although the margin exceeds MARGIN]).
    """
    from mullama_sdk import Captioner
    from mullama_sdk.llm import LlamaContext, LlamaModel
    from native_bridge import InjectionHook

    vectors = {}
    for precision in ("fp32", "int8"):
        with Captioner.from_pretrained(bundle, device="cpu", encoder_precision=precision, n_threads=2) as cap:
            vectors[precision] = cap.encode(clip, sample_rate=SAMPLE_RATE_HZ).injection
            if precision == "fp32":
                res = cap.caption(clip, sample_rate=SAMPLE_RATE_HZ, temperature=0.0, max_new_tokens=max_new_tokens)
                prompt, tokens = list(res.prompt_tokens), list(res.tokens)
    m = load_manifest(bundle)
    seq = prompt + tokens
    layers = list(m.inject_layers)
    logits = {}
    llm = LlamaModel(bundle / m.llm[m.default_quant])
    hook = InjectionHook(m.dims.n_embd, m.dims.n_layer)
    ctx = LlamaContext(llm, hook, n_ctx=len(seq) + 8, n_threads=2)
    try:
        for precision, d in vectors.items():
            hook.set_clip_vectors(0, (layers, d))
            hook.use_single_clip(0)
            ctx.clear()
            want = [i >= len(prompt) - 1 for i in range(len(seq))]
            logits[precision] = np.stack(ctx.decode(seq, range(len(seq)), [0] * len(seq), want))
    finally:
        ctx.close()
        llm.close()
        hook.close()
    ref, got = logits["fp32"], logits["int8"]
    top2 = np.sort(ref, axis=-1)[:, -2:]
    margins = top2[:, 1] - top2[:, 0]
    # The caption itself is fp32's argmax at each step (the logits above re-create it).
    assert [int(t) for t in ref.argmax(-1)[: len(tokens)]] == tokens[: len(ref)]
    wrong = [(i, float(margins[i])) for i in range(len(ref))
             if margins[i] > MARGIN and ref[i].argmax() != got[i].argmax()]
    return margins, wrong


def test_int8_greedy_tokens_match_fp32_where_fp32_is_sure(tiny_bundle, tiny_assets):
    from mullama_sdk.audio import load_audio

    clips = [load_audio(p) for n, p in sorted(tiny_assets.audio.items()) if n.endswith(".wav")]
    checked = confident = 0
    for clip in clips[:3]:
        margins, wrong = _teacher_forced(Path(tiny_bundle), clip, 24)
        checked, confident = checked + len(margins), confident + int((margins > MARGIN).sum())
        assert not wrong, wrong
    assert confident > checked // 2, (confident, checked)  # the bound is not met vacuously


@pytest.mark.skipif(not (DEMO_BUNDLE / MANIFEST_NAME).exists(), reason="no committed demo bundle")
def test_demo_bundle_int8_greedy_tokens_match_fp32(tmp_path):
    """The trained demo model: every example clip, with the int8 graphs the bundle ships."""
    from mullama_sdk.audio import load_audio

    clips = sorted((ROOT / "examples" / "clips").glob("*.wav"))
    assert clips
    checked = confident = 0
    for path in clips:
        margins, wrong = _teacher_forced(DEMO_BUNDLE, load_audio(path), 32)
        checked, confident = checked + len(margins), confident + int((margins > MARGIN).sum())
        assert not wrong, (path.name, wrong)
    assert confident > checked // 2, (confident, checked)


@pytest.mark.skipif(not (DEMO_BUNDLE / MANIFEST_NAME).exists(), reason="no committed demo bundle")
def test_demo_cli_default_int8_is_fp32s_greedy_caption(tmp_path):
    """``mullama caption --temperature 0 --json``: the default (int8) encoder gives fp32's tokens, up to a
    step where fp32 itself is unsure (top-2 margin <= MARGIN), after which the captions may part."""
    from mullama_sdk.audio import load_audio

    clips = [str(p) for p in sorted((ROOT / "examples" / "clips").glob("*.wav"))]
    out = {}
    for extra in ([], ["--encoder-precision", "fp32"]):
        r = subprocess.run([sys.executable, "-m", "mullama_sdk", "caption", *clips, "--bundle", str(DEMO_BUNDLE),
                            "--temperature", "0", "--json", "--max-new-tokens", "32", *extra],
                           capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert r.returncode == 0, r.stderr
        out[tuple(extra)] = [json.loads(line)["tokens"] for line in r.stdout.splitlines() if line.strip()]
        if not extra:
            assert "requantize" not in r.stderr, r.stderr  # the shipped bundle is current: no fallback
    for path, int8, fp32 in zip(clips, out[()], out[("--encoder-precision", "fp32")]):
        if int8 == fp32:
            continue
        k = next((i for i, (a, b) in enumerate(zip(int8, fp32)) if a != b), min(len(int8), len(fp32)))
        margins, _ = _teacher_forced(DEMO_BUNDLE, load_audio(path), 32)
        assert margins[k] <= MARGIN, (path, k, float(margins[k]))
