"""ONNX export of the encoder and adapter graphs against the torch reference, on the tiny assets.

Tolerances: float32 graphs <= 1e-4 relative (``max|onnx - torch| / max|torch|``, the graph specs' value;
measured ~1e-6). float16 and int8 are lossy by design: they are asserted loosely (float16 <= 1e-2
relative; int8 keeps every injection vector's direction, cosine >= 0.999) and their errors are printed.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import export.onnx_export as onnx_export
from export.graphs import (
    ADAPTER_GRAPH,
    ENCODER_GRAPH,
    AdapterGraph,
    adapter_dims,
    fold_injection,
)
from export.onnx_compare import (
    ErrorReport,
    OutputError,
    compare_adapter,
    compare_encoder,
    compare_onnx,
)
from export.onnx_export import check_graph, export_adapter, export_encoder, read_metadata
from export.onnx_precision import convert_fp16, quantize_int8
from mullama_sdk.audio import load_audio
from mullama_sdk.constants import MIN_WINDOW_SAMPLES, SAMPLE_RATE_HZ
from mullama_sdk.errors import ConfigError, ExportError
from training.reference.build import load_reference
from training.reference.model import MullamaModel

FP32_TOL = 1e-4
FP16_TOL = 1e-2
INT8_MIN_COSINE = 0.999  # int8 weights within [-64, 64]: the same numbers on every CPU kernel (mullama_sdk.cpu)
TEST_SECONDS = (0.5, 1.0, 4.0, 10.0)


@pytest.fixture(scope="module")
def model(tiny_assets) -> MullamaModel:
    return load_reference(tiny_assets.checkpoint, tiny_assets.llama_dir, tiny_assets.mert_dir)


@pytest.fixture(scope="module")
def clips(tiny_assets) -> dict[str, np.ndarray]:
    """The test clips (one per content; FLAC/OGG repeat the stereo WAV), mono 24 kHz."""
    return {name: load_audio(path) for name, path in sorted(tiny_assets.audio.items()) if name.endswith(".wav")}


@pytest.fixture(scope="module")
def waveforms(clips) -> list[np.ndarray]:
    """Windows of 0.5, 1, 4, 10 s cut from the 10 s clip, plus every test clip whole."""
    long = clips["music_24k_mono_10s.wav"]
    cut = [long[: round(s * SAMPLE_RATE_HZ)] for s in TEST_SECONDS]
    assert [len(w) for w in cut] == [round(s * SAMPLE_RATE_HZ) for s in TEST_SECONDS]
    return cut + list(clips.values())


@pytest.fixture(scope="module")
def state_means(model, clips) -> list[np.ndarray]:
    """Frame-weighted state means of the test clips (the adapter graph's real inputs) + two random ones."""
    with torch.no_grad():
        out = [model.state_means(w)[0].numpy() for w in clips.values()]
    rng = np.random.default_rng(0)
    d = model.config.adapter
    out += [rng.standard_normal((d.n_states, d.mert_dim)).astype(np.float32) for _ in range(2)]
    return out


@pytest.fixture(scope="module")
def graphs(model, tmp_path_factory) -> dict[str, Path]:
    """Every graph in every precision: keys ``encoder``, ``encoder.fp16``, ``adapter.int8`` ..."""
    out = tmp_path_factory.mktemp("onnx")
    paths = {
        "encoder": export_encoder(model, out / "encoder.onnx"),
        "adapter": export_adapter(model, out / "adapter.onnx"),
    }
    for g in ("encoder", "adapter"):
        paths[f"{g}.fp16"] = convert_fp16(paths[g], out / f"{g}.fp16.onnx")
        paths[f"{g}.int8"] = quantize_int8(paths[g], out / f"{g}.int8.onnx")
    assert not any(m.training for m in model.modules())  # exporting left the reference in eval mode
    return paths


def _cos_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    x, y = x.astype(np.float64), y.astype(np.float64)
    return (x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))


# ------------------------------------------------------------------------------------- interfaces
def _io(path: Path) -> dict[str, tuple[str, list]]:
    m = onnx.load(str(path), load_external_data=False)
    out = {}
    for v in [*m.graph.input, *m.graph.output]:
        tt = v.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in tt.shape.dim]
        out[v.name] = (np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)).name, dims)
    return out


@pytest.mark.parametrize("precision", ["", ".fp16", ".int8"])
def test_graph_interfaces_are_as_specified(graphs, model, precision):
    enc, ad = graphs[f"encoder{precision}"], graphs[f"adapter{precision}"]
    d = adapter_dims(model)
    assert [i.name for i in onnx.load(str(enc)).graph.input] == ["waveform"]
    assert _io(enc) == {
        "waveform": ("float32", [1, "n_samples"]),
        "state_means": ("float32", [d["n_states"], d["mert_dim"]]),
        "n_frames": ("int64", []),
    }
    assert [o.name for o in onnx.load(str(ad)).graph.output] == ["injection", "music_query"]
    assert _io(ad) == {
        "state_means": ("float32", [d["n_states"], d["mert_dim"]]),
        "injection": ("float32", [d["n_inject"], d["n_embd"]]),
        "music_query": ("float32", [d["n_embd"]]),
    }
    for path, spec in ((enc, ENCODER_GRAPH), (ad, ADAPTER_GRAPH)):
        check_graph(path, spec, d)  # names, dtypes, shapes, opset
        m = onnx.load(str(path), load_external_data=False)
        assert m.opset_import[0].version >= 17
        graph, dims = read_metadata(path)
        assert graph == spec.name and dims.items() <= d.items()
    assert ENCODER_GRAPH.dynamic_axes() == {"waveform": {1: "n_samples"}}
    assert ADAPTER_GRAPH.dynamic_axes() == {}


def test_check_graph_names_mismatches(graphs, model):
    d = adapter_dims(model)
    wrong = dataclasses.replace(ADAPTER_GRAPH, outputs=tuple(reversed(ADAPTER_GRAPH.outputs)))
    with pytest.raises(ExportError, match="outputs"):
        check_graph(graphs["adapter"], wrong, d)
    with pytest.raises(ExportError, match="shape"):
        check_graph(graphs["adapter"], ADAPTER_GRAPH, {**d, "n_embd": d["n_embd"] + 1})


# ------------------------------------------------------------------------------------------ float32
def test_encoder_fp32_matches_torch(graphs, model, waveforms):
    report = compare_encoder(model, graphs["encoder"], waveforms)
    print(report.summary())
    assert report.n_cases == len(waveforms)
    assert report.passed(FP32_TOL), report.summary()
    assert report["n_frames"].max_abs == 0
    # 75 frames per second (HuBERT's conv stack: 400-sample receptive field, hop 320).
    sess = ort.InferenceSession(str(graphs["encoder"]), providers=["CPUExecutionProvider"])
    for w in waveforms:
        n_frames = sess.run(["n_frames"], {"waveform": w[None]})[0]
        assert n_frames.dtype == np.int64 and n_frames.shape == ()
        assert int(n_frames) == (len(w) - 400) // 320 + 1


def test_encoder_accepts_30_s_window(graphs, model, clips):
    """The longest window the runtime sends (30 s) runs through the graph traced at 1 s."""
    w = np.tile(clips["music_24k_mono_10s.wav"], 3)[: 30 * SAMPLE_RATE_HZ]
    assert compare_encoder(model, graphs["encoder"], [w]).passed(FP32_TOL)


def test_encoder_fp32_matches_torch_on_one_shot_lengths(graphs, model, clips):
    """Down to one MERT frame: 400 samples (1 frame) and a 50 ms one-shot (1200 samples, 3 frames) run on their
    real samples (no padding) and equal the torch reference within the graph's stated tolerance."""
    assert ENCODER_GRAPH.dynamic["n_samples"].min == MIN_WINDOW_SAMPLES == 400
    long = clips["music_24k_mono_10s.wav"]
    rng = np.random.default_rng(7)
    t = np.arange(1200) / SAMPLE_RATE_HZ
    hit = (np.exp(-t / 0.015) * (0.5 * rng.standard_normal(1200) + 0.4 * np.sin(2 * np.pi * 90 * t)))
    waves = [long[:400], long[5000:5400], long[:1200], hit.astype(np.float32), hit[:400].astype(np.float32)]
    report = compare_encoder(model, graphs["encoder"], waves)
    print(report.summary())
    assert report.n_cases == len(waves)
    assert report.passed(ENCODER_GRAPH.tolerance), report.summary()
    assert report["n_frames"].max_abs == 0
    sess = ort.InferenceSession(str(graphs["encoder"]), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        for w in waves:
            means, n_frames = sess.run(["state_means", "n_frames"], {"waveform": w[None]})
            assert int(n_frames) == {400: 1, 1200: 3}[len(w)]
            ref, ref_frames = model.mert(torch.from_numpy(w)[None])
            assert ref_frames == int(n_frames)
            ref = ref[0].numpy()
            assert np.isfinite(means).all() and np.abs(means - ref).max() <= ENCODER_GRAPH.tolerance * np.abs(ref).max()
    # One frame is not the mean of anything else: a different 400-sample clip gives different means.
    a, b = (sess.run(["state_means"], {"waveform": w[None]})[0] for w in waves[:2])
    assert np.abs(a - b).max() > 1e-3


def test_adapter_fp32_matches_reference(graphs, model, state_means):
    """``injection`` = model.injection_vectors(a) (unfolded reference) and ``music_query`` = model.music_query."""
    report = compare_adapter(model, graphs["adapter"], state_means)
    print(report.summary())
    assert report.passed(FP32_TOL), report.summary()
    assert report["injection"].min_cosine > 0.99999


def test_fold_matches_reference_in_float64(model, state_means):
    """d_l = M_l a + c_l with the folded float32 weights equals Wo'_l (gate * Wv_l (a + p_l))."""
    folded = fold_injection(model)
    assert folded.layers == tuple(model.inject_layers)
    with torch.no_grad():
        for h in state_means:
            a = model.music_query(torch.from_numpy(h))
            ref = model.injection_vectors(a).double()
            for i in range(folded.n_inject):
                d = folded.matrix(i).double() @ a[0].double() + folded.offset(i).double()
                rel = (d - ref[i]).abs().max() / ref[i].abs().max()
                assert rel < 1e-5, (i, float(rel))


def test_fold_repeats_kv_heads_for_grouped_query_attention(model):
    """A GQA LLaMA (2 kv heads for 4 heads): the fold repeats Wv's heads as the reference does."""
    cfg = model.config
    gqa = dataclasses.replace(cfg, llama=dataclasses.replace(cfg.llama, n_kv_heads=2))
    torch.manual_seed(0)
    m = MullamaModel(gqa).eval()
    with torch.no_grad():
        for l in m.inject_layers:
            m.llama.layers[l].attention.gate.normal_()
        for layer in m.llama.layers:
            layer.attention.lora_wo_l2.weight.normal_(std=0.1)
        a = torch.randn(1, gqa.llama.dim)
        ref = m.injection_vectors(a)
        graph = AdapterGraph.from_model(m)
        d = torch.matmul(a, graph.injection_weight) + graph.injection_bias
    np.testing.assert_allclose(d.view_as(ref).numpy(), ref.numpy(), rtol=1e-4, atol=1e-5)


def test_query_len_other_than_1_is_refused(model, tmp_path):
    other = copy.copy(model)  # shallow: shares the weights, own config
    other.config = dataclasses.replace(model.config, injection=dataclasses.replace(model.config.injection, query_len=2))
    with pytest.raises(ConfigError, match=r"query_len == 1.*query_len 2"):
        export_adapter(other, tmp_path / "adapter.onnx")
    with pytest.raises(ConfigError, match="query_len"):
        fold_injection(other)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ fp16 and int8
def test_fp16_error_is_reported(graphs, model, waveforms, state_means):
    for report in (compare_encoder(model, graphs["encoder.fp16"], waveforms),
                   compare_adapter(model, graphs["adapter.fp16"], state_means)):
        print(report.summary())
        assert not report.passed(1e-7)  # it is float16: the comparison does see a difference
        assert report.passed(FP16_TOL, min_cosine=0.9999), report.summary()


def test_int8_keeps_injection_direction(graphs, model, clips, state_means):
    """cosine(d_l int8, d_l fp32) >= 0.999 for every injected layer, on each test clip.

    End to end (encoder then adapter, both int8 vs both float32) and adapter alone.
    """
    sess = {k: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for k, p in graphs.items()}
    for name, w in clips.items():  # every clip is <= 30 s: a single window
        d = {}
        for variant in ("", ".int8"):
            h, _ = sess[f"encoder{variant}"].run(None, {"waveform": w[None]})
            d[variant] = sess[f"adapter{variant}"].run(["injection"], {"state_means": h})[0]
        cos = _cos_rows(d[".int8"], d[""])
        print(f"int8 end to end {name}: cosine(d_l) per layer {np.round(cos, 6).tolist()}")
        assert cos.min() >= INT8_MIN_COSINE, (name, cos)

    report = compare_onnx(graphs["adapter"], graphs["adapter.int8"], [{"state_means": h} for h in state_means])
    print(report.summary())
    assert report.reference == "adapter.onnx"
    assert report["injection"].min_cosine >= INT8_MIN_COSINE
    assert report.passed(0.1, min_cosine=INT8_MIN_COSINE), report.summary()
    enc = compare_encoder(model, graphs["encoder.int8"], list(clips.values()))
    print(enc.summary())
    assert enc["n_frames"].max_abs == 0 and enc["state_means"].min_cosine >= INT8_MIN_COSINE


def test_int8_quantizes_only_constant_matmuls(graphs):
    for g in ("encoder", "adapter"):
        ops = [n.op_type for n in onnx.load(str(graphs[f"{g}.int8"])).graph.node]
        fp32_matmuls = [n for n in onnx.load(str(graphs[g])).graph.node if n.op_type == "MatMul"]
        assert ops.count("MatMulInteger") > 0
        assert "ConvInteger" not in ops
        # What is left as float MatMul is attention's activation x activation products (encoder only).
        assert ops.count("MatMulInteger") + ops.count("MatMul") == len(fp32_matmuls)
    assert "MatMul" not in [n.op_type for n in onnx.load(str(graphs["adapter.int8"])).graph.node]


# ---------------------------------------------------------------------------------- files and reports
def test_external_data_above_threshold(model, tmp_path, monkeypatch, state_means):
    """Weights over the threshold go to ``<name>.onnx.data``; a later small export removes the stale file."""
    path = tmp_path / "adapter.onnx"
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD_BYTES", 10_000)
    export_adapter(model, path)
    data = tmp_path / "adapter.onnx.data"
    assert data.is_file() and data.stat().st_size > path.stat().st_size
    assert any(i.data_location == onnx.TensorProto.EXTERNAL
               for i in onnx.load(str(path), load_external_data=False).graph.initializer)
    assert compare_adapter(model, path, state_means[:2]).passed(FP32_TOL)
    q = quantize_int8(path, tmp_path / "adapter.int8.onnx")  # reads external data, writes by size
    assert (tmp_path / "adapter.int8.onnx.data").is_file()
    assert compare_onnx(path, q, [{"state_means": state_means[0]}])["injection"].min_cosine > INT8_MIN_COSINE

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD_BYTES", 1_500_000_000)
    export_adapter(model, path)
    assert not data.exists()
    # Nothing but the results is left in the folder (the staging folders are gone).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.int8.onnx", "adapter.int8.onnx.data",
                                                           "adapter.onnx"]


def test_error_report_semantics():
    ok = OutputError("injection", max_abs=1e-6, max_rel=2e-5, mean_cosine=1.0, min_cosine=0.9999)
    frames = OutputError("n_frames", max_abs=0.0, max_rel=0.0, mean_cosine=None, min_cosine=None, exact=True)
    r = ErrorReport("adapter", "a.onnx", "torch", 3, (ok, frames))
    assert r.passed() and r.passed(1e-4) and not r.passed(1e-5)
    assert not r.passed(1e-4, min_cosine=0.99999)
    assert r["n_frames"] is frames
    with pytest.raises(KeyError, match="outputs"):
        r["nope"]
    d = json.loads(json.dumps(r.to_dict()))
    assert d["outputs"]["injection"]["max_rel"] == 2e-5 and d["outputs"]["n_frames"]["min_cosine"] is None
    off_by_one = dataclasses.replace(frames, max_abs=1.0, max_rel=1 / 2250)
    assert not ErrorReport("encoder", "e.onnx", "torch", 1, (ok, off_by_one)).passed(1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.n_cases = 4


@pytest.mark.slow
def test_real_width_adapter_goes_past_protobuf_limit(model, tmp_path):
    """A real-width adapter (4096 wide, 3 blocks of 16384) + 2 folded layers: ~2.6 GB of float32 weights.

    Only the export path beyond 2 GB is checked here (external data, checker by path, ORT loading, fp16 and
    int8 conversion); about 10 GB of RAM and a few minutes.
    """
    from training.reference.dims import AdapterDims, InjectionDims, LlamaParams

    cfg = dataclasses.replace(
        model.config,
        llama=LlamaParams(dim=4096, n_layers=2, n_heads=32, vocab_size=64, hidden_dim=11008),
        adapter=dataclasses.replace(model.config.adapter, dim=4096, block_hidden=16384),
        injection=InjectionDims(n_layers=2),
    )
    assert isinstance(cfg.adapter, AdapterDims)
    torch.manual_seed(0)
    big = MullamaModel(cfg).eval()
    with torch.no_grad():
        for l in big.inject_layers:
            big.llama.layers[l].attention.gate.normal_()
    path = export_adapter(big, tmp_path / "adapter.onnx")
    data = tmp_path / "adapter.onnx.data"
    assert data.stat().st_size > 2**31 and path.stat().st_size < 2**20
    rng = np.random.default_rng(0)
    h = [rng.standard_normal((cfg.adapter.n_states, cfg.adapter.mert_dim)).astype(np.float32)]
    report = compare_adapter(big, path, h)
    print(report.summary())
    assert report.passed(FP32_TOL)
    q = quantize_int8(path, tmp_path / "adapter.int8.onnx")
    print(compare_onnx(path, q, [{"state_means": h[0]}]).summary())
    assert compare_onnx(path, q, [{"state_means": h[0]}])["injection"].min_cosine >= INT8_MIN_COSINE
    f16 = convert_fp16(path, tmp_path / "adapter.fp16.onnx")  # ~1.3 GB: below the threshold, one file
    assert not (tmp_path / "adapter.fp16.onnx.data").exists()
    print(compare_onnx(path, f16, [{"state_means": h[0]}]).summary())


def test_exported_graphs_carry_no_debug_records_or_local_paths(graphs):
    """The exporter's stack traces would ship this checkout's paths and make builds differ between folders."""
    root = str(Path(__file__).resolve().parents[1]).encode()
    for name, path in graphs.items():
        assert root not in path.read_bytes(), f"{name} embeds {root!r}"
        m = onnx.load(str(path), load_external_data=False)
        keys = {p.key for n in m.graph.node for p in n.metadata_props}
        keys |= {p.key for v in m.graph.value_info for p in v.metadata_props}
        assert not {k for k in keys if k.startswith("pkg.")}, f"{name}: {sorted(keys)}"
