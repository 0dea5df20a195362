"""Corrupt, tampered and malformed bundles: always a BundleError naming the problem, never another
exception, never a crash - and, for everything the manifest and the GGUF header can tell, before
ONNX Runtime or llama.cpp load anything. Extends tests/test_bundle_validation.py (which covers a missing
file, a size mismatch, a wrong sha256, a newer format version, dims that disagree, ``..`` paths)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mullama_sdk import BundleError, Captioner
from mullama_sdk.manifest import MANIFEST_NAME, load_manifest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path) -> Path:
    dst = tmp_path / "b"
    shutil.copytree(tiny_bundle, dst)
    return dst


@pytest.fixture
def no_native_load(monkeypatch):
    """Fail the test if ONNX Runtime or llama.cpp is asked to load a file."""
    import llama_cpp
    import onnxruntime

    def refuse(*args, **kwargs):
        raise AssertionError("a native load was attempted before the bundle was rejected")

    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)
    monkeypatch.setattr(llama_cpp, "llama_model_load_from_file", refuse)


def _edit_manifest(folder: Path, edit) -> None:
    path = folder / MANIFEST_NAME
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))


def _relist(folder: Path, name: str) -> None:
    """Update the manifest's size and sha256 of ``name``: a consistent bundle with a bad file."""
    data = (folder / name).read_bytes()
    _edit_manifest(folder, lambda m: m["files"].update(
        {name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}}))


def _load(folder: Path, **kw):
    return Captioner.from_pretrained(folder, quant="f32", encoder_precision="fp32", **kw)


def _rename(m: dict, key: str, variant: str, new: str) -> None:
    m["files"][new] = m["files"][m[key][variant]]
    m[key][variant] = new


# Manifest fields of the right name and the wrong type or value: (id, edit, words the message must contain).
GARBAGE = [
    ("inject_layers strings", lambda m: m.update(inject_layers=["a", "b"]), "inject_layers"),
    ("inject_layers floats", lambda m: m.update(inject_layers=[2.7, 3.2]), "inject_layers"),
    ("inject_layers null", lambda m: m.update(inject_layers=[None, 3]), "inject_layers"),
    ("inject_layers repeated", lambda m: m.update(inject_layers=[3, 3]), "inject_layers"),
    ("dims as a list", lambda m: m.update(dims=[64]), "dims"),
    ("dim as a string", lambda m: m["dims"].update(n_embd="64"), "n_embd"),
    ("dim as a bool", lambda m: m["dims"].update(n_layer=True), "n_layer"),
    ("files as a list", lambda m: m.update(files=[]), "files"),
    ("file entry a string", lambda m: m["files"].update({"llm.f32.gguf": "x"}), "llm.f32.gguf"),
    ("negative size", lambda m: m["files"]["llm.f32.gguf"].update(size=-1), "size"),
    ("sha256 not hex", lambda m: m["files"]["llm.f32.gguf"].update(sha256="z" * 64), "sha256"),
    ("variant file a list", lambda m: m["llm"].update(f32=["llm.f32.gguf"]), "llm"),
    ("variant file an object", lambda m: m["encoder"].update(fp32={}), "encoder"),
    ("versions a list", lambda m: m.update(versions=["a"]), "versions"),
    ("verification a string", lambda m: m.update(verification="x"), "verification"),
    ("notes a number", lambda m: m.update(notes=5), "notes"),
    ("temperature a string", lambda m: m["sampling"].update(temperature="hot"), "temperature"),
    ("top_p above 1", lambda m: m["sampling"].update(top_p=3), "top_p"),
    ("max_new_tokens negative", lambda m: m["sampling"].update(max_new_tokens=-5), "max_new_tokens"),
    ("sample rate 0", lambda m: m["audio"].update(sample_rate=0), "sample_rate"),
    ("sample rate 44.1 kHz", lambda m: m["audio"].update(sample_rate=44100), "sample_rate"),
    ("max window 0", lambda m: m["audio"].update(max_window_seconds=0), "window"),
    ("min window > max", lambda m: m["audio"].update(min_window_seconds=40), "window"),
    ("max window NaN", lambda m: m["audio"].update(max_window_seconds=float("nan")), "window"),
    ("template unknown field", lambda m: m["prompt"].update(template="{foo} {question}"), "template"),
    ("template single brace", lambda m: m["prompt"].update(template="{question} {"), "template"),
    ("template without question", lambda m: m["prompt"].update(template="hello"), "template"),
    ("template attribute access", lambda m: m["prompt"].update(template="{question.__class__}"), "template"),
    ("empty default question", lambda m: m["prompt"].update(default_question=" "), "default_question"),
    ("eos id outside the vocabulary", lambda m: m["prompt"].update(eos_id=10**12), "eos_id"),
    ("format_version a float", lambda m: m.update(format_version=1.0), "format_version"),
    ("trt section a list", lambda m: m.update(trt=[1]), "trt"),
    ("name with NUL", lambda m: _rename(m, "llm", "f32", "llm\0.gguf"), "plain paths"),
    ("name with backslash", lambda m: _rename(m, "llm", "f32", "sub\\llm.f32.gguf"), "plain paths"),
    ("name '.'", lambda m: _rename(m, "llm", "f32", "."), "outside the bundle"),
    ("name too long for the OS", lambda m: _rename(m, "adapter", "fp32", "a" * 5000), "a" * 20),
]


@pytest.mark.parametrize("edit,words", [pytest.param(e, w, id=i) for i, e, w in GARBAGE])
def test_garbage_manifest_fields(bundle_copy, no_native_load, edit, words):
    _edit_manifest(bundle_copy, edit)
    with pytest.raises(BundleError, match=words.replace("\\", "\\\\").replace(".", r"\.")):
        _load(bundle_copy)


@pytest.mark.parametrize("text", [
    pytest.param("[" * 100_000 + "]" * 100_000, id="nested 100000 deep"),
    pytest.param('{"format": "mullama-bundle", "format_version": 1' + "0" * 5000 + "}", id="5000-digit int"),
    pytest.param("\ufeff{}", id="BOM"),
    pytest.param("", id="empty"),
    pytest.param(None, id="invalid UTF-8"),
])
def test_unparsable_manifest(bundle_copy, no_native_load, text):
    path = bundle_copy / MANIFEST_NAME
    if text is None:
        path.write_bytes(b'{"format": "\xff\xfe"}')
    else:
        path.write_text(text, encoding="utf-8")
    with pytest.raises(BundleError, match="mullama.json"):
        _load(bundle_copy)


def test_manifest_that_is_a_directory(bundle_copy, no_native_load):
    (bundle_copy / MANIFEST_NAME).unlink()
    (bundle_copy / MANIFEST_NAME).mkdir()
    with pytest.raises(BundleError, match="cannot read"):
        _load(bundle_copy)


@pytest.mark.parametrize("fraction", [0.001, 0.1, 0.5, 0.999])
def test_truncated_gguf_with_a_consistent_manifest(bundle_copy, no_native_load, fraction):
    """The size and sha256 in the manifest were updated too: the GGUF header check still catches it."""
    gguf = bundle_copy / "llm.f32.gguf"
    data = gguf.read_bytes()
    gguf.write_bytes(data[: int(len(data) * fraction)])
    _relist(bundle_copy, "llm.f32.gguf")
    with pytest.raises(BundleError, match=r"llm\.f32\.gguf"):
        _load(bundle_copy, verify_checksums=True)


@pytest.mark.parametrize("name", ["encoder.fp32.onnx", "adapter.fp32.onnx"])
@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.5, 0.999])
def test_truncated_onnx(bundle_copy, name, fraction):
    onnx_file = bundle_copy / name
    data = onnx_file.read_bytes()
    onnx_file.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(BundleError, match=rf"{name} has \d+ bytes"):  # size mismatch: before any load
        _load(bundle_copy)
    _relist(bundle_copy, name)
    with pytest.raises(BundleError, match=rf"ONNX Runtime cannot load {name}"):  # a consistent manifest
        _load(bundle_copy)


def test_onnx_graphs_swapped(bundle_copy):
    shutil.copy(bundle_copy / "encoder.fp32.onnx", bundle_copy / "adapter.fp32.onnx")
    _relist(bundle_copy, "adapter.fp32.onnx")
    with pytest.raises(BundleError, match=r"adapter\.fp32\.onnx has inputs \('waveform',\)"):
        _load(bundle_copy)


@pytest.mark.parametrize("n_embd,n_ff,match", [(128, 384, "embedding_length"), (64, 192, "tokens")])
def test_gguf_replaced_by_another_valid_gguf(bundle_copy, tmp_path, no_native_load, n_embd, n_ff, match):
    """A real, loadable llama GGUF of other dims (or another vocabulary), manifest size/sha updated."""
    from testkit.llama_gguf import TinyLlamaConfig, random_weights, write_llama_gguf

    cfg = TinyLlamaConfig(n_embd=n_embd, n_layer=4, n_head=4, n_head_kv=4, n_ff=n_ff)
    write_llama_gguf(bundle_copy / "llm.f32.gguf", cfg, random_weights(cfg))
    _relist(bundle_copy, "llm.f32.gguf")
    with pytest.raises(BundleError, match=match):
        _load(bundle_copy, verify_checksums=True)


@pytest.mark.parametrize("key,value,match", [
    ("llama.attention.head_count_kv", 2, "head_count_kv = 2"),
    ("llama.feed_forward_length", "one hundred and ninety-two", "malformed GGUF header"),
])
def test_gguf_header_disagrees_or_is_malformed(bundle_copy, tmp_path, no_native_load, key, value, match):
    """A GGUF whose header has one field changed (no tensors: the header check comes first)."""
    import gguf

    reader = gguf.GGUFReader(str(bundle_copy / "llm.f32.gguf"))
    writer = gguf.GGUFWriter(str(bundle_copy / "llm.f32.gguf.new"), arch="llama")
    for name, f in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        v = value if name == key else f.contents()
        if isinstance(v, list):
            writer.add_array(name, v)
        elif isinstance(v, str):
            writer.add_string(name, v)
        elif isinstance(v, float):
            writer.add_float32(name, v)
        else:
            writer.add_uint32(name, int(v))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    (bundle_copy / "llm.f32.gguf.new").replace(bundle_copy / "llm.f32.gguf")
    _relist(bundle_copy, "llm.f32.gguf")
    with pytest.raises(BundleError, match=match):
        _load(bundle_copy)


def _external_data_bundle(folder: Path, location: str, listed: bool) -> None:
    """Re-save adapter.fp32.onnx with its weights in an external-data file at ``location``."""
    import onnx

    model = onnx.load(folder / "adapter.fp32.onnx")
    onnx.save(model, folder / "adapter.fp32.onnx", save_as_external_data=True,
              location="adapter.fp32.onnx.data", size_threshold=4096)
    if location != "adapter.fp32.onnx.data":
        shutil.move(folder / "adapter.fp32.onnx.data", (folder / location) if not location.startswith("/")
                    else location)
        model = onnx.load(folder / "adapter.fp32.onnx", load_external_data=False)
        for t in model.graph.initializer:
            for entry in t.external_data:
                if entry.key == "location":
                    entry.value = location
        onnx.save(model, folder / "adapter.fp32.onnx")
    _relist(folder, "adapter.fp32.onnx")
    if listed:
        _relist(folder, "adapter.fp32.onnx.data")


def test_external_data_file(bundle_copy, tiny_assets):
    _external_data_bundle(bundle_copy, "adapter.fp32.onnx.data", listed=True)
    with _load(bundle_copy) as cap:  # the layout big (> 2 GB) graphs use works ...
        assert len(cap.caption(tiny_assets.audio["music_24k_mono.wav"], max_new_tokens=2).tokens) == 2
    (bundle_copy / "adapter.fp32.onnx.data").unlink()
    with pytest.raises(BundleError, match=r"missing: adapter\.fp32\.onnx\.data"):  # ... listed and missing
        _load(bundle_copy)


def test_external_data_missing_and_unlisted(bundle_copy):
    _external_data_bundle(bundle_copy, "adapter.fp32.onnx.data", listed=False)
    (bundle_copy / "adapter.fp32.onnx.data").unlink()
    with pytest.raises(BundleError, match=r"ONNX Runtime cannot load adapter\.fp32\.onnx"):
        _load(bundle_copy)


@pytest.mark.parametrize("where", ["../outside.data", "ABSOLUTE"])
def test_external_data_cannot_point_outside_the_bundle(bundle_copy, tmp_path, where):
    """ONNX Runtime refuses external-data paths that leave the model's folder; we surface a BundleError."""
    location = str(tmp_path / "abs_outside.data") if where == "ABSOLUTE" else where
    _external_data_bundle(bundle_copy, location, listed=False)
    with pytest.raises(BundleError, match=r"ONNX Runtime cannot load adapter\.fp32\.onnx"):
        _load(bundle_copy)


def test_corrupt_bundles_never_crash_the_process(tiny_bundle, tiny_assets, tmp_path):
    """Random byte damage to each bundle file, manifest kept consistent, loaded and used in a child process:
    BundleError or a working Captioner, every time, and the child never dies."""
    script = textwrap.dedent("""
        import hashlib, json, random, shutil, sys
        from pathlib import Path
        from mullama_sdk import BundleError, Captioner
        src, work, clip = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
        rng = random.Random(0)
        outcomes = {}
        for trial in range(24):
            d = work / f"t{trial}"
            shutil.copytree(src, d)
            m = json.loads((d / "mullama.json").read_text())
            name = ["llm.f32.gguf", "encoder.fp32.onnx", "adapter.fp32.onnx"][trial % 3]
            data = bytearray((d / name).read_bytes())
            for _ in range(rng.choice([1, 8, 64])):
                pos = rng.randrange(min(len(data), 4096) if trial % 2 else len(data))
                data[pos] = rng.randrange(256)
            (d / name).write_bytes(bytes(data))
            m["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            (d / "mullama.json").write_text(json.dumps(m))
            try:
                with Captioner.from_pretrained(d, quant="f32", encoder_precision="fp32") as cap:
                    cap.caption(clip, max_new_tokens=2)
                outcome = "loaded"
            except BundleError:
                outcome = "BundleError"
            except Exception as e:  # a damaged weight can still load: its use may fail with a typed error
                outcome = type(e).__name__
            outcomes[f"{trial}:{name}"] = outcome
            shutil.rmtree(d)
        print(json.dumps(outcomes))
    """)
    out = subprocess.run([sys.executable, "-c", script, str(tiny_bundle), str(tmp_path),
                          str(tiny_assets.audio["music_24k_mono.wav"])],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    outcomes = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(outcomes.values()) <= {"loaded", "BundleError"}, outcomes


def test_symlinked_file_pointing_outside(bundle_copy, tmp_path, no_native_load):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.move(bundle_copy / "llm.f32.gguf", outside / "llm.f32.gguf")
    (bundle_copy / "llm.f32.gguf").symlink_to(outside / "llm.f32.gguf")
    with pytest.raises(BundleError, match=r"'llm\.f32\.gguf' resolves outside the bundle"):
        _load(bundle_copy)


def test_symlinked_folder_pointing_outside(bundle_copy, tmp_path, no_native_load):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(bundle_copy / "llm.f32.gguf", outside / "llm.f32.gguf")
    (bundle_copy / "models").symlink_to(outside, target_is_directory=True)
    _edit_manifest(bundle_copy, lambda m: _rename(m, "llm", "f32", "models/llm.f32.gguf"))
    with pytest.raises(BundleError, match="resolves outside the bundle"):
        _load(bundle_copy)


def test_symlinks_inside_the_bundle_are_fine(bundle_copy, tiny_assets):
    (bundle_copy / "weights").mkdir()
    shutil.move(bundle_copy / "llm.f32.gguf", bundle_copy / "weights" / "llm.f32.gguf")
    (bundle_copy / "llm.f32.gguf").symlink_to(Path("weights") / "llm.f32.gguf")
    with _load(bundle_copy) as cap:
        assert cap.caption(tiny_assets.audio["music_24k_mono.wav"], max_new_tokens=1).tokens


def test_symlink_loop(bundle_copy, no_native_load):
    (bundle_copy / "llm.f32.gguf").unlink()
    (bundle_copy / "llm.f32.gguf").symlink_to("loop.gguf")
    (bundle_copy / "loop.gguf").symlink_to("llm.f32.gguf")
    with pytest.raises(BundleError, match=r"llm\.f32\.gguf"):
        _load(bundle_copy)


def test_runtime_load_path_never_unpickles(tiny_bundle, tiny_assets):
    """from_pretrained + every entry point in a fresh interpreter: no torch, and no unpickling of anything
    (Python's audit hook sees every Unpickler.find_class; pickle.load(s) are trapped as well)."""
    code = textwrap.dedent(f"""
        import sys, pickle
        events = []
        sys.addaudithook(lambda event, args: events.append((event, args)) if event.startswith("pickle") else None)
        def trap(*a, **k):
            raise AssertionError("unpickling on the runtime path")
        pickle.load = pickle.loads = trap
        pickle.Unpickler = trap
        from mullama_sdk import Captioner
        clip = {str(tiny_assets.audio['music_44k_stereo.flac'])!r}
        with Captioner.from_pretrained({str(tiny_bundle)!r}, verify_checksums=True) as cap:
            vec = cap.encode(clip)
            cap.caption(clip, max_new_tokens=3)
            list(cap.caption_stream(vec, max_new_tokens=3))
            cap.caption_batch([vec, clip], max_new_tokens=3)
        heavy = sorted(m for m in ("torch", "transformers", "safetensors", "onnx") if m in sys.modules)
        print(len(events), heavy)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[0] == "0 []"


def test_load_manifest_alone_is_pure_python(bundle_copy, no_native_load):
    assert load_manifest(bundle_copy).dims.n_embd == 64
