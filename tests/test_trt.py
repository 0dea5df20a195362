"""TensorRT engines: profiles, the manifest's ``trt`` section, backend choice and fallbacks, the CLI.

Without a GPU (this file's default) the probes are replaced where a test needs them to succeed, and a
small stand-in for ``tensorrt`` + cuda-python exercises the runtime wrapper's own logic (buffers,
shapes, host/device tensors, out-of-profile fallback, close). Tests marked ``gpu`` build real
engines for the tiny bundle and compare them with ONNX Runtime; they skip without a usable NVIDIA
GPU + TensorRT (tests/conftest.py).
"""

from __future__ import annotations

import base64
import ctypes
import dataclasses
import json
import logging
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from export.trt import TrtBuildOptions, waveform_profile
from mullama_sdk import encoder_backend, encoder_trt
from mullama_sdk.encoder_backend import choose_encoder_backend
from mullama_sdk.encoder_trt import GpuInfo, TensorRTMusicEncoder, engine_incompatibility
from mullama_sdk.errors import BackendUnavailableError, BundleError, ConfigError
from mullama_sdk.files import sha256_file
from mullama_sdk.manifest import MANIFEST_NAME, parse_manifest
from mullama_sdk.manifest_trt import TrtEngines, WaveformProfile

ROOT = Path(__file__).parents[1]
SR = 24_000


# --------------------------------------------------------------------------------------- helpers
def _raw_manifest(trt: dict | None = None) -> dict:
    """A structurally valid manifest (files need not exist: only the parser looks at it)."""
    files = {n: {"size": 1, "sha256": "0" * 64} for n in (
        "encoder.fp32.onnx", "adapter.fp32.onnx", "encoder.fp16.onnx", "adapter.fp16.onnx", "llm.f32.gguf",
        "encoder.trt.fp16.engine", "adapter.trt.fp16.engine", "encoder.trt.fp32.engine", "adapter.trt.fp32.engine")}
    raw = {
        "format": "mullama-bundle", "format_version": 1,
        "dims": {"n_embd": 64, "n_layer": 4, "n_head": 4, "n_head_kv": 4, "n_ff": 128, "n_vocab": 100,
                 "mert_dim": 32, "mert_states": 3, "n_inject": 2},
        "inject_layers": [2, 3],
        "audio": {"sample_rate": SR, "min_window_seconds": 0.5, "max_window_seconds": 30.0},
        "prompt": {"template": "{question}", "default_question": "Describe the audio", "bos_id": 1, "eos_id": 2},
        "sampling": {"temperature": 0.6, "top_p": 0.8, "max_new_tokens": 16},
        "encoder": {"fp32": "encoder.fp32.onnx", "fp16": "encoder.fp16.onnx"},
        "adapter": {"fp32": "adapter.fp32.onnx", "fp16": "adapter.fp16.onnx"},
        "llm": {"f32": "llm.f32.gguf"},
        "default_encoder_precision": "fp32", "default_quant": "f32",
        "files": files,
    }
    if trt is not None:
        raw["trt"] = trt
    return raw


def _trt_entry(precision: str = "fp16", *, version: str = "10.13.0.35", cc: str = "8.6",
               profile=(12_000, 240_000, 720_000)) -> dict:
    return {
        "encoder": f"encoder.trt.{precision}.engine", "adapter": f"adapter.trt.{precision}.engine",
        "tensorrt_version": version, "gpu": {"name": "NVIDIA A10G", "compute_capability": cc},
        "profile": {"waveform": dict(zip(("min", "opt", "max"), profile))},
        "build_seconds": 12.5, "built": "2026-01-01T00:00:00Z", "workspace_gb": None,
    }


GPU_86 = GpuInfo(0, "NVIDIA A10G", "8.6", 24 << 30)


@pytest.fixture
def gpu_machine(monkeypatch):
    """Probes of a machine with TensorRT 10.13, an sm_86 GPU and onnxruntime-gpu."""
    monkeypatch.setattr(encoder_trt, "tensorrt_version", lambda: "10.13.0.35")
    monkeypatch.setattr(encoder_trt, "cuda_device", lambda index=0: GPU_86)
    monkeypatch.setattr(encoder_backend, "ort_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])


def _no(what: str):
    def probe(*_a, **_k):
        raise BackendUnavailableError(what)
    return probe


# --------------------------------------------------------------------------------------- profiles
def test_waveform_profile_from_seconds():
    assert waveform_profile() == WaveformProfile(400, 240_000, 720_000)  # one MERT frame / 10 / 30 s
    assert waveform_profile(400 / SR, 400 / SR, 400 / SR) == WaveformProfile(400, 400, 400)
    assert waveform_profile(1, 5, 20) == WaveformProfile(24_000, 120_000, 480_000)
    assert waveform_profile(0.5, 0.5, 0.5) == WaveformProfile(12_000, 12_000, 12_000)
    assert waveform_profile(30, 30, 30) == WaveformProfile(720_000, 720_000, 720_000)
    assert waveform_profile(2.00001, 3, 4).min == 48_000  # rounded to whole samples


@pytest.mark.parametrize(("args", "match"), [
    ((3, 2, 30), "min <= opt <= max"),
    ((0.5, 20, 10), "min <= opt <= max"),
    ((0.01, 10, 30), r"--min-seconds 0.01 is outside the encoder's window range 0.0167..30 s \(400..720000 samples\)"),
    ((0.0166, 10, 30), r"--min-seconds 0.0166 is outside"),  # 398.4 samples: below one MERT frame
    ((0.5, 10, 30.5), r"--max-seconds 30.5 is outside"),
    ((0.5, float("nan"), 30), "--opt-seconds nan is outside"),
    ((0.5, 10, float("inf")), "--max-seconds inf is outside"),
])
def test_waveform_profile_rejects(args, match):
    with pytest.raises(ConfigError, match=match):
        waveform_profile(*args)


def test_build_options_are_validated():
    assert TrtBuildOptions().precision == "fp32" and TrtBuildOptions().profile.opt == 240_000
    with pytest.raises(ConfigError, match="unknown TensorRT precision 'int8'; valid: fp32, fp16"):
        TrtBuildOptions(precision="int8")
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="--workspace-gb must be a positive number"):
            TrtBuildOptions(workspace_gb=bad)


def test_profile_contains():
    p = WaveformProfile(100, 200, 300)
    assert p.contains(100) and p.contains(300) and not p.contains(99) and not p.contains(301)
    assert p.seconds(100) == "1..3 s (opt 2 s)"


def test_profile_min_is_raised_to_an_older_bundles_minimum():
    """A bundle exported for >= 0.5 s (12000 samples) gets engines whose profile starts there, not at one frame:
    its manifest refuses a profile reaching below its own minimum."""
    from export.trt import _fit_profile_to_bundle

    said = []
    default = TrtBuildOptions()
    assert default.profile.min == 400
    raised = _fit_profile_to_bundle(default, 12_000, Path("old.bundle"), said.append)
    assert raised.profile == WaveformProfile(12_000, 240_000, 720_000) and raised.precision == default.precision
    assert said == ["the bundle takes windows of at least 12000 samples (0.5 s): the profile's min is raised from "
                    "400 to 12000 samples"]
    assert _fit_profile_to_bundle(default, 400, Path("new.bundle"), said.append) is default and len(said) == 1
    with pytest.raises(ConfigError, match=r"old\.bundle takes windows of at least 12000 samples \(0\.5 s\); "
                                          r"--opt-seconds must be at least that, got 0\.1 s"):
        _fit_profile_to_bundle(TrtBuildOptions(profile=waveform_profile(opt_seconds=0.1)), 12_000,
                               Path("old.bundle"), said.append)
    old = _raw_manifest({"fp16": _trt_entry("fp16", profile=(400, 240_000, 720_000))})
    with pytest.raises(BundleError, match="12000..720000 samples"):
        parse_manifest(old)
    new = _raw_manifest({"fp16": _trt_entry("fp16", profile=(400, 240_000, 720_000))})
    new["audio"].update(min_window_samples=400, min_window_seconds=400 / SR)
    assert parse_manifest(new).trt["fp16"].profile.min == 400


# ------------------------------------------------------------------------------ manifest trt section
def test_manifest_without_trt_section():
    assert parse_manifest(_raw_manifest()).trt == {}


def test_manifest_trt_section_parses_and_round_trips():
    raw = _raw_manifest({"fp16": _trt_entry("fp16"), "fp32": _trt_entry("fp32", profile=(24_000, 48_000, 96_000))})
    m = parse_manifest(raw)
    e = m.trt["fp16"]
    assert e == TrtEngines("fp16", "encoder.trt.fp16.engine", "adapter.trt.fp16.engine", "10.13.0.35",
                           "NVIDIA A10G", "8.6", WaveformProfile(12_000, 240_000, 720_000), 12.5,
                           "2026-01-01T00:00:00Z", None)
    assert m.trt["fp32"].profile == WaveformProfile(24_000, 48_000, 96_000)
    assert e.to_dict() == raw["trt"]["fp16"]
    assert m.to_json()["trt"] == raw["trt"]


def _edit(entry_edit):
    raw = _raw_manifest({"fp16": _trt_entry()})
    entry_edit(raw)
    return raw


@pytest.mark.parametrize(("edit", "match"), [
    (lambda r: r.update(trt=[]), "field 'trt' has type list"),
    (lambda r: r["trt"].update(int8=_trt_entry("fp16")), "trt precision 'int8' is unknown"),
    (lambda r: r["files"].pop("encoder.trt.fp16.engine"), "encoder engine 'encoder.trt.fp16.engine' is not listed"),
    (lambda r: r["trt"]["fp16"].pop("adapter"), "missing field 'adapter'"),
    (lambda r: r["trt"]["fp16"].update(tensorrt_version="ten"), "tensorrt_version 'ten' is not a version"),
    (lambda r: r["trt"]["fp16"]["gpu"].update(compute_capability="86"), "compute_capability '86' is not"),
    (lambda r: r["trt"]["fp16"]["gpu"].pop("name"), "missing field 'name'"),
    (lambda r: r["trt"]["fp16"].pop("gpu"), "missing field 'gpu'"),
    (lambda r: r["trt"]["fp16"]["profile"]["waveform"].update(min=300_000), "0 < min <= opt <= max"),
    (lambda r: r["trt"]["fp16"]["profile"]["waveform"].update(max=720_001), r"outside the encoder's 12000\.\.720000"),
    (lambda r: r["trt"]["fp16"]["profile"]["waveform"].update(min=11_999), "outside the encoder's"),
    (lambda r: r["trt"]["fp16"]["profile"]["waveform"].update(opt=1.5), "field 'opt' has type float"),
    (lambda r: r["trt"]["fp16"].update(workspace_gb=-2), "workspace_gb must be a positive number"),
    (lambda r: r["trt"]["fp16"].update(build_seconds="long"), "field 'build_seconds' has type str"),
])
def test_manifest_trt_section_invalid(edit, match):
    with pytest.raises(BundleError, match=match):
        parse_manifest(_edit(edit))


# ----------------------------------------------------------------------------------- compatibility
def test_engine_compatibility():
    e = parse_manifest(_raw_manifest({"fp16": _trt_entry()})).trt["fp16"]
    assert engine_incompatibility(e, tensorrt_version="10.13.0.35", gpu=GPU_86) is None
    assert engine_incompatibility(e, tensorrt_version="10.13.3.9", gpu=GPU_86) is None  # patch may differ
    why = engine_incompatibility(e, tensorrt_version="10.12.0.36", gpu=GPU_86)
    assert "built with TensorRT 10.13.0.35, this machine has TensorRT 10.12.0.36 (major.minor must match)" in why
    why = engine_incompatibility(e, tensorrt_version="11.4.0.106", gpu=GPU_86)
    assert "TensorRT 11.4.0.106" in why
    why = engine_incompatibility(e, tensorrt_version="10.13.0.35", gpu=GpuInfo(0, "NVIDIA H100", "9.0", 80 << 30))
    assert "built for compute capability 8.6 (NVIDIA A10G), this GPU (NVIDIA H100) has 9.0" in why
    assert "mullama-export trt" in why


# ---------------------------------------------------------------------------------- backend choice
def _manifest(**trt):
    return parse_manifest(_raw_manifest(trt or None))


def test_tensorrt_chosen_when_compatible(gpu_machine):
    m = _manifest(fp16=_trt_entry("fp16"), fp32=_trt_entry("fp32"))
    c = choose_encoder_backend(m, device="cuda")
    assert (c.backend, c.trt.precision, c.onnx_precision, c.on_gpu) == ("tensorrt", "fp16", "fp16", True)
    assert c.reasons == () and c.providers[0] == "CUDAExecutionProvider"
    assert {"encoder.trt.fp16.engine", "adapter.trt.fp16.engine", "encoder.fp16.onnx"} <= set(c.files(m))
    c = choose_encoder_backend(m, device="auto", encoder_precision="fp32")
    assert (c.backend, c.trt.precision, c.onnx_precision) == ("tensorrt", "fp32", "fp32")
    assert c.describe() == "TensorRT fp32 engines"


def test_no_tensorrt_falls_back_to_ort_cuda(gpu_machine, monkeypatch, caplog):
    monkeypatch.setattr(encoder_trt, "tensorrt_version", _no("TensorRT is not available: `import tensorrt` failed"))
    m = _manifest(fp16=_trt_entry())
    with caplog.at_level(logging.INFO, logger="mullama_sdk.encoder_backend"):
        c = choose_encoder_backend(m, device="cuda")
    assert (c.backend, c.providers[0], c.onnx_precision) == ("onnxruntime", "CUDAExecutionProvider", "fp16")
    assert c.reasons == ("TensorRT not used: TensorRT is not available: `import tensorrt` failed",)
    assert "import tensorrt" in caplog.text and caplog.records[-1].levelno == logging.INFO


def test_no_tensorrt_no_cuda_provider_falls_back_to_cpu_with_warning(gpu_machine, monkeypatch, caplog):
    monkeypatch.setattr(encoder_trt, "tensorrt_version", _no("TensorRT is not available"))
    monkeypatch.setattr(encoder_backend, "ort_providers", lambda: ["CPUExecutionProvider"])
    with caplog.at_level(logging.INFO, logger="mullama_sdk.encoder_backend"):
        c = choose_encoder_backend(_manifest(fp16=_trt_entry()), device="cuda")
    assert (c.backend, c.providers, c.on_gpu) == ("onnxruntime", ("CPUExecutionProvider",), False)
    assert c.onnx_precision == "fp32"  # the manifest's default, not the GPU's fp16
    rec = caplog.records[-1]
    assert rec.levelno == logging.WARNING
    assert "TensorRT not used: TensorRT is not available" in rec.getMessage()
    assert "CUDA provider not used: this ONNX Runtime offers only ['CPUExecutionProvider']" in rec.getMessage()


def test_no_gpu_falls_back(gpu_machine, monkeypatch):
    monkeypatch.setattr(encoder_trt, "cuda_device", _no("no usable CUDA device: cudaGetDeviceCount() failed"))
    c = choose_encoder_backend(_manifest(fp16=_trt_entry()), device="auto")
    assert c.backend == "onnxruntime" and "cudaGetDeviceCount" in c.reasons[0]


@pytest.mark.parametrize(("entry", "expect"), [
    (_trt_entry(version="10.12.0.36"), "major.minor must match"),
    (_trt_entry(cc="9.0"), "built for compute capability 9.0 (NVIDIA A10G), this GPU (NVIDIA A10G) has 8.6"),
])
def test_incompatible_engines_fall_back_with_reason(gpu_machine, caplog, entry, expect):
    with caplog.at_level(logging.INFO, logger="mullama_sdk.encoder_backend"):
        c = choose_encoder_backend(_manifest(fp16=entry), device="cuda")
    assert c.backend == "onnxruntime" and c.providers[0] == "CUDAExecutionProvider"
    assert expect in c.reasons[0] and expect in caplog.text
    with pytest.raises(BackendUnavailableError, match="encoder_backend='tensorrt' cannot run: .*" + expect[:20]):
        choose_encoder_backend(_manifest(fp16=entry), device="cuda", encoder_backend="tensorrt")


def test_an_incompatible_fp16_pair_does_not_hide_a_compatible_fp32_pair(gpu_machine):
    c = choose_encoder_backend(_manifest(fp16=_trt_entry("fp16", cc="9.0"), fp32=_trt_entry("fp32")), device="cuda")
    assert c.backend == "tensorrt" and c.trt.precision == "fp32"


def test_forced_backends(gpu_machine, monkeypatch):
    m = _manifest(fp16=_trt_entry())
    with pytest.raises(BackendUnavailableError, match="has no TensorRT engines"):
        choose_encoder_backend(_manifest(), device="cuda", encoder_backend="tensorrt")
    with pytest.raises(BackendUnavailableError, match=r"engines for \['fp16'\], not for encoder_precision='fp32'"):
        choose_encoder_backend(m, device="cuda", encoder_backend="tensorrt", encoder_precision="fp32")
    with pytest.raises(BackendUnavailableError, match="runs on an NVIDIA GPU"):
        choose_encoder_backend(m, device="cpu", encoder_backend="tensorrt")
    monkeypatch.setattr(encoder_trt, "tensorrt_version", _no("TensorRT is not available: `import tensorrt` failed"))
    with pytest.raises(BackendUnavailableError, match="cannot run: TensorRT is not available: `import tensorrt`"):
        choose_encoder_backend(m, device="auto", encoder_backend="tensorrt")
    # onnxruntime forced: TensorRT is not even probed.
    monkeypatch.setattr(encoder_trt, "tensorrt_version", lambda: pytest.fail("TensorRT probed"))
    c = choose_encoder_backend(m, device="cuda", encoder_backend="onnxruntime")
    assert (c.backend, c.providers[0], c.forced, c.reasons) == ("onnxruntime", "CUDAExecutionProvider", True, ())


def test_cpu_device_probes_nothing(monkeypatch):
    for mod, name in ((encoder_trt, "tensorrt_version"), (encoder_trt, "cuda_device"),
                      (encoder_backend, "ort_providers")):
        monkeypatch.setattr(mod, name, lambda *a, **k: pytest.fail("probed"))
    c = choose_encoder_backend(_manifest(fp16=_trt_entry()), device="cpu")
    assert (c.backend, c.providers, c.onnx_precision) == ("onnxruntime", ("CPUExecutionProvider",), "fp32")


def test_bad_arguments():
    m = _manifest()
    with pytest.raises(ValueError, match="encoder_backend must be one of 'auto', 'tensorrt', 'onnxruntime'"):
        choose_encoder_backend(m, encoder_backend="trt")
    with pytest.raises(ValueError, match="device must be one of"):
        choose_encoder_backend(m, device="gpu")
    with pytest.raises(BundleError, match="encoder_precision='int8' is not in this bundle"):
        choose_encoder_backend(m, device="cpu", encoder_precision="int8")


def test_real_probes_name_what_is_missing():
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError):
        with pytest.raises(BackendUnavailableError, match=r"`import tensorrt` failed \(No module named 'tensorrt'\)"):
            encoder_trt.tensorrt_version()
    try:
        encoder_trt.cuda_device()
    except BackendUnavailableError as e:
        assert "cuda-python is not available" in str(e) or "no usable CUDA device" in str(e)


def test_modules_import_without_tensorrt_cuda_or_torch():
    code = ("import sys, mullama_sdk.encoder_trt, mullama_sdk.encoder_backend, mullama_sdk.captioner; "
            "bad = [m for m in ('tensorrt', 'cuda', 'torch') if m in sys.modules]; "
            "import export.trt, export.verify, export.cli; "
            "bad += [m for m in ('tensorrt', 'cuda') if m in sys.modules]; print(bad)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


# ----------------------------------------------------------------- runtime wrapper on stand-ins
class _FakeCudart:
    """cuda-python's runtime module, with host memory standing in for device memory."""

    class cudaError_t:  # noqa: N801 - cuda-python's names
        cudaSuccess = 0

    class cudaMemcpyKind:  # noqa: N801
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    def __init__(self):
        self.live: dict[int, ctypes.Array] = {}
        self.streams = set()
        self.copies = 0

    def cudaMalloc(self, n):  # noqa: N802
        buf = ctypes.create_string_buffer(n)
        self.live[ctypes.addressof(buf)] = buf
        return 0, ctypes.addressof(buf)

    def cudaFree(self, ptr):  # noqa: N802
        del self.live[ptr]
        return (0,)

    def cudaStreamCreate(self):  # noqa: N802
        s = len(self.streams) + 100
        self.streams.add(s)
        return 0, s

    def cudaStreamDestroy(self, s):  # noqa: N802
        self.streams.remove(s)
        return (0,)

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):  # noqa: N802
        assert stream in self.streams
        ctypes.memmove(dst, src, n)
        self.copies += 1
        return (0,)

    def cudaStreamSynchronize(self, s):  # noqa: N802
        return (0,)


def _fake_tensorrt(rt: _FakeCudart):
    """Just the TensorRT runtime API the wrapper calls; 'engines' are JSON describing a toy graph."""
    trt = types.SimpleNamespace(__version__="10.13.0.35")
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    trt.TensorLocation = types.SimpleNamespace(DEVICE="dev", HOST="host")
    trt.nptype = lambda t: t

    class ILogger:
        Severity = types.SimpleNamespace(INTERNAL_ERROR=0, ERROR=1, WARNING=2, INFO=3, VERBOSE=4)

        def __init__(self):
            pass

    trt.ILogger = ILogger

    class Context:
        def __init__(self, engine):
            self.e, self.shapes, self.addr = engine, {}, {}

        def set_input_shape(self, name, shape):
            lo, _, hi = self.e.get_tensor_profile_shape(name, 0)
            if not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
                return False
            self.shapes[name] = tuple(shape)
            return True

        def get_tensor_shape(self, name):
            return self.e.spec[name][2]

        def set_tensor_address(self, name, ptr):
            self.addr[name] = ptr
            return True

        def execute_async_v3(self, stream):
            assert stream in rt.streams
            io = self.e.spec
            if self.e.session is not None:  # an 'engine' built by the stand-in Builder: ONNX Runtime inside
                feeds = {}
                for name, (mode, dtype, _shape, _loc) in io.items():
                    if mode == "in":
                        n = int(np.prod(self.shapes[name])) * dtype.itemsize
                        feeds[name] = np.frombuffer(ctypes.string_at(self.addr[name], n), dtype).reshape(
                            self.shapes[name])
                outs = dict(zip([o.name for o in self.e.session.get_outputs()], self.e.session.run(None, feeds)))
                for name, (mode, dtype, _shape, _loc) in io.items():
                    if mode == "out":
                        val = np.ascontiguousarray(outs[name], dtype)
                        ctypes.memmove(self.addr[name], val.ctypes.data, val.nbytes)
                return True
            inp = next(n for n in io if io[n][0] == "in")
            x = np.frombuffer(ctypes.string_at(self.addr[inp], 4 * int(np.prod(self.shapes[inp]))), np.float32)
            for name, (mode, dtype, shape, _loc) in io.items():
                if mode == "out":
                    val = np.full(shape, float(x.mean()) * (1 + len(name)), dtype) if dtype == np.float32 \
                        else np.asarray(x.size // 320, dtype).reshape(shape)
                    ctypes.memmove(self.addr[name], np.ascontiguousarray(val).ctypes.data, val.nbytes)
            return True

    class Engine:
        def __init__(self, desc):
            self.spec = {n: (m, np.dtype(d), tuple(s), loc) for n, (m, d, s, loc) in desc["io"].items()}
            self.profile = desc.get("profile")
            self.num_io_tensors = len(self.spec)
            self.session = None
            if "onnx" in desc:
                import onnxruntime

                self.session = onnxruntime.InferenceSession(base64.b64decode(desc["onnx"]),
                                                            providers=["CPUExecutionProvider"])

        def get_tensor_name(self, i):
            return list(self.spec)[i]

        def get_tensor_mode(self, n):
            return self.spec[n][0]

        def get_tensor_dtype(self, n):
            return self.spec[n][1]

        def get_tensor_location(self, n):
            return self.spec[n][3]

        def get_tensor_profile_shape(self, n, i):
            if self.profile:
                return [(1, self.profile[0]), (1, self.profile[1]), (1, self.profile[2])]
            return [self.spec[n][2]] * 3

        def create_execution_context(self):
            return Context(self)

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, data):
            try:
                return Engine(json.loads(data))
            except ValueError:
                self.logger.log(ILogger.Severity.ERROR, "engine plan is not compatible")
                return None

    trt.Runtime = Runtime
    _fake_builder(trt)
    return trt


def _fake_builder(trt):
    """The builder API ``export.trt.build_engine`` calls; an 'engine' is the ONNX file + its I/O table."""
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=3)
    trt.BuilderFlag = types.SimpleNamespace(TF32=7)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE=0)

    class Network:
        def __init__(self, flags):
            assert flags == 1 << 3  # strongly typed
            self.inputs, self.outputs, self.onnx = [], [], None

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return self.inputs[i]

    class Parser:
        def __init__(self, network, logger):
            self.network, self.num_errors = network, 0

        def parse_from_file(self, path):
            import onnx
            import onnxruntime

            model = onnx.load(path)  # external data next to the file, as TensorRT's parser reads it
            sess = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
            self.network.onnx = model.SerializeToString()
            dt = {"tensor(float)": "float32", "tensor(int64)": "int64", "tensor(float16)": "float16"}
            shape = lambda t: [d if isinstance(d, int) else -1 for d in t.shape]
            self.network.inputs = [types.SimpleNamespace(name=t.name, shape=shape(t), dtype=dt[t.type])
                                   for t in sess.get_inputs()]
            self.network.outputs = [types.SimpleNamespace(name=t.name, shape=shape(t), dtype=dt[t.type])
                                    for t in sess.get_outputs()]
            return True

    class Config:
        def __init__(self):
            self.cleared, self.pools, self.profiles = set(), {}, []

        def clear_flag(self, flag):
            self.cleared.add(flag)

        def set_memory_pool_limit(self, pool, n):
            self.pools[pool] = n

        def add_optimization_profile(self, p):
            self.profiles.append(p)
            return len(self.profiles) - 1

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            assert trt.BuilderFlag.TF32 in config.cleared  # fp32 must not silently become TF32
            io = {t.name: ["in", t.dtype, t.shape, "dev"] for t in network.inputs}
            # The frame count as a host-side shape tensor, the rest on the device.
            io.update({t.name: ["out", t.dtype, t.shape, "host" if t.name == "n_frames" else "dev"]
                       for t in network.outputs})
            desc = {"io": io, "onnx": base64.b64encode(network.onnx).decode()}
            if any(-1 in t.shape for t in network.inputs):
                (lo, opt, hi), = config.profiles[0].shapes.values()
                desc["profile"] = [lo[1], opt[1], hi[1]]
            return json.dumps(desc).encode()

    trt.Builder, trt.OnnxParser = Builder, Parser


@pytest.fixture
def fake_trt(monkeypatch, tmp_path):
    rt = _FakeCudart()
    trt = _fake_tensorrt(rt)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(encoder_trt, "import_cudart", lambda: rt)
    monkeypatch.setattr(encoder_trt, "_LOGGER", None)
    enc = tmp_path / "encoder.trt.fp32.engine"
    enc.write_text(json.dumps({"profile": [12_000, 48_000, 96_000], "io": {
        "waveform": ["in", "float32", [1, -1], "dev"], "state_means": ["out", "float32", [3, 4], "dev"],
        "n_frames": ["out", "int64", [], "host"]}}))
    ad = tmp_path / "adapter.trt.fp32.engine"
    ad.write_text(json.dumps({"io": {
        "state_means": ["in", "float32", [3, 4], "dev"], "injection": ["out", "float32", [2, 8], "dev"],
        "music_query": ["out", "float32", [8], "dev"]}}))
    return rt, enc, ad


class _FallbackEncoder:
    def __init__(self):
        self.calls, self.closed = [], False

    def window_means(self, w):
        self.calls.append(len(w))
        return np.zeros((3, 4)), -1

    def close(self):
        self.closed = True


def test_trt_encoder_runs_binds_and_frees(fake_trt):
    rt, enc_path, ad_path = fake_trt
    fallbacks = []

    def make_fallback():
        fallbacks.append(_FallbackEncoder())
        return fallbacks[-1]

    enc = TensorRTMusicEncoder(enc_path, ad_path, profile=WaveformProfile(12_000, 48_000, 96_000),
                               fallback=make_fallback)
    assert enc.profile == WaveformProfile(12_000, 48_000, 96_000)
    w = np.linspace(0, 1, 24_000, dtype=np.float32)
    means, frames = enc.window_means(w)
    assert means.dtype == np.float64 and means.shape == (3, 4) and frames == 24_000 // 320
    np.testing.assert_allclose(means, np.full((3, 4), w.mean() * (1 + len("state_means"))), rtol=1e-6)
    # A longer window reuses (grows) the buffers; the host-located frame count is read back too.
    means2, frames2 = enc.window_means(np.ones(90_000, np.float32))
    assert frames2 == 90_000 // 320 and np.allclose(means2, 1 + len("state_means"))
    injection, query = enc.adapt(means)
    assert injection.shape == (2, 8) and injection.dtype == np.float32 and query.shape == (8,)
    assert not fallbacks  # nothing outside the profile yet
    # Outside the profile: ONNX Runtime (the fallback, made once) encodes it; no padding.
    assert enc.window_means(np.ones(6_000, np.float32)) == (pytest.approx(np.zeros((3, 4))), -1)
    enc.window_means(np.ones(100_000, np.float32))
    assert len(fallbacks) == 1 and fallbacks[0].calls == [6_000, 100_000]
    assert rt.live and rt.streams
    enc.close()
    enc.close()  # idempotent
    assert rt.live == {} and rt.streams == set() and fallbacks[0].closed
    with pytest.raises(RuntimeError, match="closed"):
        enc.window_means(w)


def test_trt_encoder_checks_profile_and_interface(fake_trt, tmp_path):
    rt, enc_path, ad_path = fake_trt
    with pytest.raises(BundleError, match="the engine was replaced or the manifest edited"):
        TensorRTMusicEncoder(enc_path, ad_path, profile=WaveformProfile(12_000, 240_000, 720_000))
    assert rt.live == {} and rt.streams == set()  # everything made so far was freed
    with pytest.raises(BundleError, match=r"has inputs \('state_means',\).*expected \('waveform',\)"):
        TensorRTMusicEncoder(ad_path, ad_path)
    enc = TensorRTMusicEncoder(enc_path, ad_path)
    with pytest.raises(ValueError, match="outside the TensorRT profile 12000..96000"):
        enc.window_means(np.ones(1000, np.float32))  # no fallback given
    enc.close()
    bad = tmp_path / "bad.engine"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(BackendUnavailableError, match="cannot load bad.engine: engine plan is not compatible"):
        TensorRTMusicEncoder(bad, ad_path)
    assert rt.live == {} and rt.streams == set()


# ------------------------------------------------------------------------- bundle + Captioner + CLI
@pytest.fixture
def bundle_with_fake_engines(tiny_bundle, tmp_path) -> Path:
    """The tiny bundle plus a ``trt`` section whose engines are not real (built 'for sm_90')."""
    dst = tmp_path / "b"
    shutil.copytree(tiny_bundle, dst)
    raw = json.loads((dst / MANIFEST_NAME).read_text())
    for p in ("fp32",):
        for g in ("encoder", "adapter"):
            f = dst / f"{g}.trt.{p}.engine"
            f.write_bytes(b"not an engine")
            raw["files"][f.name] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
        raw.setdefault("trt", {})[p] = _trt_entry(p, cc="9.0")
    (dst / MANIFEST_NAME).write_text(json.dumps(raw))
    return dst


def test_captioner_cuda_falls_back_to_cpu_with_same_tokens(bundle_with_fake_engines, exact_captioner,
                                                            tiny_assets, gpu_machine, monkeypatch, caplog):
    from mullama_sdk import Captioner

    monkeypatch.setattr(encoder_backend, "ort_providers", lambda: ["CPUExecutionProvider"])
    clip = tiny_assets.audio["music_24k_mono.wav"]
    want = exact_captioner.caption(clip, max_new_tokens=16, temperature=0).tokens
    kw = dict(quant="f32", encoder_precision="fp32", exact=True, n_threads=2)
    with caplog.at_level(logging.INFO, logger="mullama_sdk"):
        with Captioner.from_pretrained(bundle_with_fake_engines, device="cuda", **kw) as cap:
            assert type(cap._encoder).__name__ == "OnnxMusicEncoder"
            assert cap.caption(clip, max_new_tokens=16, temperature=0).tokens == want
    warning = next(r for r in caplog.records if r.levelno == logging.WARNING and "encoder on" in r.getMessage())
    assert "built for compute capability 9.0 (NVIDIA A10G), this GPU (NVIDIA A10G) has 8.6" in warning.getMessage()
    with pytest.raises(BackendUnavailableError, match="compute capability 9.0"):
        Captioner.from_pretrained(bundle_with_fake_engines, device="cuda", encoder_backend="tensorrt", **kw)


def test_captioner_engines_that_do_not_load_fall_back(bundle_with_fake_engines, tiny_assets, gpu_machine,
                                                      monkeypatch, caplog):
    """The probes say 'compatible', but the engine files are garbage (or tensorrt is missing after all)."""
    from mullama_sdk import Captioner

    raw = json.loads((bundle_with_fake_engines / MANIFEST_NAME).read_text())
    raw["trt"]["fp32"]["gpu"]["compute_capability"] = "8.6"
    (bundle_with_fake_engines / MANIFEST_NAME).write_text(json.dumps(raw))
    monkeypatch.setattr(encoder_backend, "ort_providers", lambda: ["CPUExecutionProvider"])
    kw = dict(quant="f32", encoder_precision="fp32", n_threads=2)
    with caplog.at_level(logging.WARNING, logger="mullama_sdk.encoder_backend"):
        with Captioner.from_pretrained(bundle_with_fake_engines, device="cuda", **kw) as cap:
            assert type(cap._encoder).__name__ == "OnnxMusicEncoder"
    assert "TensorRT engines could not be loaded" in caplog.text
    with pytest.raises(BackendUnavailableError, match="encoder_backend='tensorrt' cannot run"):
        Captioner.from_pretrained(bundle_with_fake_engines, device="cuda", encoder_backend="tensorrt", **kw)


def test_verify_rows_skip_with_reason(bundle_with_fake_engines, monkeypatch):
    from export.verify import format_table, trt_checks
    from mullama_sdk.manifest import load_manifest

    m = load_manifest(bundle_with_fake_engines)
    monkeypatch.setattr(encoder_trt, "tensorrt_version", _no("TensorRT is not available: `import tensorrt` failed"))
    rows = trt_checks(bundle_with_fake_engines, m)
    assert [r.name for r in rows] == ["trt-encoder/fp32", "trt-adapter/fp32"]
    assert all(r.skipped and not r.passed and r.note.startswith("skipped: TensorRT is not available") for r in rows)
    assert "SKIP" in format_table(rows)
    monkeypatch.setattr(encoder_trt, "tensorrt_version", lambda: "10.13.0.35")
    monkeypatch.setattr(encoder_trt, "cuda_device", lambda index=0: GPU_86)
    rows = trt_checks(bundle_with_fake_engines, m)
    assert all(r.skipped and "compute capability 9.0" in r.note for r in rows)
    assert trt_checks(bundle_with_fake_engines, dataclasses.replace(m, trt={})) == []


def test_cli_trt_says_why_it_cannot_run(tiny_bundle, tmp_path, capsys):
    """Here (no tensorrt, no GPU) `mullama-export trt` names the failed checks and exits 2, no traceback."""
    from export.cli import main

    if _gpu_usable():
        pytest.skip("this machine can build engines")
    before = (tiny_bundle / MANIFEST_NAME).read_bytes()
    assert main(["trt", str(tiny_bundle), "--fp16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mullama-export: error: cannot build TensorRT engines on this machine: ")
    assert "`import tensorrt` failed" in err or "TensorRT" in err
    assert "cuda-python is not available" in err or "no usable CUDA device" in err
    assert "Traceback" not in err
    assert (tiny_bundle / MANIFEST_NAME).read_bytes() == before and not list(tiny_bundle.glob("*.engine"))
    assert not list(tiny_bundle.glob(".trt-build-*"))
    # Bad profiles and bad bundles fail before anything is probed.
    assert main(["trt", str(tiny_bundle), "--min-seconds", "5", "--opt-seconds", "2"]) == 2
    assert "min <= opt <= max" in capsys.readouterr().err
    assert main(["trt", str(tiny_bundle), "--max-seconds", "60"]) == 2
    assert "--max-seconds 60.0 is outside the encoder's window range 0.0167..30 s" in capsys.readouterr().err
    assert main(["trt", str(tmp_path / "nope")]) == 2
    assert "bundle folder not found" in capsys.readouterr().err


def test_cli_trt_subprocess_one_line_error(tiny_bundle):
    if _gpu_usable():
        pytest.skip("this machine can build engines")
    r = subprocess.run([sys.executable, "-m", "export.cli", "trt", str(tiny_bundle)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "cannot build TensorRT engines on this machine" in r.stderr
    assert "Traceback" not in r.stderr


def _gpu_usable() -> bool:
    from tests.conftest import _gpu_unusable_reason

    return _gpu_unusable_reason() is None


def test_export_verify_and_run_on_stand_in(tiny_bundle, tmp_path, fake_trt, monkeypatch, exact_captioner,
                                           tiny_assets, capsys):
    """The whole path - `mullama-export trt`, manifest, verify rows, Captioner(device="cuda") - on the
    stand-in whose 'engines' run ONNX Runtime: what is checked is our orchestration, not TensorRT."""
    from export.cli import main
    from export.verify import trt_checks
    from mullama_sdk import Captioner
    from mullama_sdk.bundle_files import check_files
    from mullama_sdk.manifest import load_manifest

    rt = fake_trt[0]
    monkeypatch.setattr(encoder_trt, "cuda_device", lambda index=0: GPU_86)
    monkeypatch.setattr(encoder_backend, "ort_providers", lambda: ["CPUExecutionProvider"])
    dst = tmp_path / "b"
    shutil.copytree(tiny_bundle, dst)
    assert main(["trt", str(dst), "--min-seconds", "1", "--opt-seconds", "2", "--max-seconds", "5"]) == 0
    out = capsys.readouterr().out
    assert "TensorRT 10.13.0.35 on NVIDIA A10G (compute capability 8.6): fp32 engines" in out
    assert "trt-encoder/fp32" in out and "trt-adapter/fp32" in out and "FAIL" not in out
    assert main(["trt", str(dst), "--fp16", "--workspace-gb", "2"]) == 0
    m = load_manifest(dst)
    assert set(m.trt) == {"fp32", "fp16"}
    e32, e16 = m.trt["fp32"], m.trt["fp16"]
    assert e32.profile == WaveformProfile(24_000, 48_000, 120_000)
    assert e16.profile == WaveformProfile(400, 240_000, 720_000) and e16.workspace_gb == 2.0  # default min: 1 frame
    assert (e32.tensorrt_version, e32.gpu_name, e32.compute_capability) == ("10.13.0.35", "NVIDIA A10G", "8.6")
    assert e32.build_seconds >= 0 and e32.built.endswith("Z") and m.versions["tensorrt"] == "10.13.0.35"
    check_files(dst, m, list(m.files), sha256=True)  # the file table covers the engines
    for p, tol in (("fp32", 1e-4), ("fp16", 1e-2)):
        for g in ("encoder", "adapter"):
            row = m.verification[f"trt-{g}/{p}"]
            assert row["passed"] and row["max_rel"] <= tol and not row["skipped"]
        assert (dst / f"encoder.trt.{p}.engine").stat().st_mode & 0o777 == 0o644
    assert not list(dst.glob(".trt-build-*")) and not list(dst.glob(".mullama.json.*"))
    rows = trt_checks(dst, m)
    assert len(rows) == 4 and all(r.passed and not r.skipped for r in rows)

    kw = dict(quant="f32", encoder_precision="fp32", exact=True, n_threads=2)
    with Captioner.from_pretrained(dst, device="cuda", encoder_backend="tensorrt", **kw) as cap:
        assert isinstance(cap._encoder, TensorRTMusicEncoder) and cap._encoder.profile == e32.profile
        for name in ("music_24k_mono.wav", "music_44k_stereo.flac", "music_24k_mono_10s.wav"):
            clip = tiny_assets.audio[name]
            want = exact_captioner.caption(clip, max_new_tokens=16, temperature=0).tokens
            assert cap.caption(clip, max_new_tokens=16, temperature=0).tokens == want
            # The 10 s clip is one window longer than the profile's 5 s: ONNX Runtime encodes it.
            assert (cap._encoder._fallback is not None) == name.endswith("10s.wav")
    assert rt.live == {} and rt.streams == set()  # close() freed every buffer and stream
    # auto prefers the fp16 engines
    with Captioner.from_pretrained(dst, device="cuda", quant="f32", n_threads=2) as cap:
        assert isinstance(cap._encoder, TensorRTMusicEncoder) and cap._encoder.profile == e16.profile
    # an unchanged source is still verified from scratch: a rebuild replaces the engines and rows
    assert main(["-q", "trt", str(dst), "--max-seconds", "20"]) == 0
    assert load_manifest(dst).trt["fp32"].profile.max == 480_000
    check_files(dst, load_manifest(dst), list(m.files), sha256=True)


def test_build_failures_are_reported(tiny_bundle, tmp_path, fake_trt, monkeypatch, capsys):
    from export.cli import main

    trt = sys.modules["tensorrt"]
    monkeypatch.setattr(encoder_trt, "cuda_device", lambda index=0: GPU_86)
    dst = tmp_path / "b"
    shutil.copytree(tiny_bundle, dst)
    before = (dst / MANIFEST_NAME).read_bytes()
    err = types.SimpleNamespace(desc=lambda: "Unsupported operator Foo", node_name=lambda: "/mert/Foo_3")
    parse = trt.OnnxParser.parse_from_file
    monkeypatch.setattr(trt.OnnxParser, "parse_from_file", lambda self, path: setattr(self, "num_errors", 1))
    monkeypatch.setattr(trt.OnnxParser, "get_error", lambda self, i: err, raising=False)
    assert main(["trt", str(dst)]) == 2
    assert ("TensorRT's ONNX parser rejects encoder.fp32.onnx: Unsupported operator Foo (node /mert/Foo_3)"
            in capsys.readouterr().err)
    monkeypatch.setattr(trt.OnnxParser, "parse_from_file", parse)

    def no_engine(self, network, config):
        encoder_trt.trt_logger(trt).log(trt.ILogger.Severity.ERROR, "out of memory while tuning")
        return None

    monkeypatch.setattr(trt.Builder, "build_serialized_network", no_engine)
    assert main(["trt", str(dst)]) == 2
    assert "TensorRT could not build an engine from encoder.fp32.onnx: out of memory while tuning" in \
        capsys.readouterr().err
    assert (dst / MANIFEST_NAME).read_bytes() == before
    assert not list(dst.glob("*.engine")) and not list(dst.glob(".trt-build-*"))


# ------------------------------------------------------------------------------------- real GPU
@pytest.fixture(scope="module")
def trt_bundle(tiny_bundle, tmp_path_factory):
    """The tiny bundle with fp32 and fp16 engines built on this GPU (profile 0.5 / 2 / 30 s)."""
    from export.trt import build_bundle_engines

    dst = tmp_path_factory.mktemp("trt") / "tiny.bundle"
    shutil.copytree(tiny_bundle, dst)
    for p in ("fp32", "fp16"):
        build_bundle_engines(dst, TrtBuildOptions(precision=p, profile=waveform_profile(0.5, 2, 30)))
    return dst


@pytest.mark.gpu
def test_gpu_manifest_records_the_engines(trt_bundle):
    import tensorrt

    from mullama_sdk.bundle_files import check_files
    from mullama_sdk.manifest import load_manifest

    m = load_manifest(trt_bundle)
    gpu = encoder_trt.cuda_device()
    assert set(m.trt) == {"fp32", "fp16"}
    for p, e in m.trt.items():
        assert (e.encoder, e.adapter) == (f"encoder.trt.{p}.engine", f"adapter.trt.{p}.engine")
        assert e.tensorrt_version == tensorrt.__version__ and e.compute_capability == gpu.compute_capability
        assert e.profile == WaveformProfile(12_000, 48_000, 720_000) and e.build_seconds > 0
        assert m.verification[f"trt-encoder/{p}"]["passed"] and m.verification[f"trt-adapter/{p}"]["passed"]
    check_files(trt_bundle, m, list(m.files), sha256=True)


@pytest.mark.gpu
@pytest.mark.parametrize(("precision", "tol"), [("fp16", 1e-2), ("fp32", 1e-4)])
def test_gpu_engines_match_ort_fp32(trt_bundle, tiny_assets, precision, tol):
    from export.onnx_compare import cpu_session as _session
    from export.onnx_compare import run_session as _run
    from export.verify import trt_checks
    from mullama_sdk.audio import load_audio
    from mullama_sdk.manifest import load_manifest

    m = load_manifest(trt_bundle)
    rows = trt_checks(trt_bundle, m, precisions=[precision], audio_files=[tiny_assets.audio["music_24k_mono.wav"]])
    assert [r.name for r in rows] == [f"trt-encoder/{precision}", f"trt-adapter/{precision}"]
    assert all(r.passed and not r.skipped and r.max_rel <= tol for r in rows), rows
    # And directly, on a real clip: encoder then adapter, end to end.
    e = m.trt[precision]
    enc = TensorRTMusicEncoder(trt_bundle / e.encoder, trt_bundle / e.adapter, profile=e.profile)
    try:
        w = load_audio(tiny_assets.audio["music_24k_mono.wav"])[:5 * SR]
        ref_means, ref_frames = _run(_session(trt_bundle / m.encoder["fp32"], 2), {"waveform": w[None]}).values()
        means, frames = enc.window_means(w)
        assert frames == int(ref_frames)
        assert np.abs(means - ref_means).max() <= tol * np.abs(ref_means).max()
        ref_inj = _run(_session(trt_bundle / m.adapter["fp32"], 2), {"state_means": ref_means})["injection"]
        inj, _ = enc.adapt(ref_means)
        assert np.abs(inj - ref_inj).max() <= tol * np.abs(ref_inj).max()
    finally:
        enc.close()


@pytest.mark.gpu
def test_gpu_out_of_profile_windows_use_onnx_runtime(trt_bundle, tmp_path):
    import tensorrt

    from export.trt import build_engine
    from mullama_sdk.encoder_ort import OnnxMusicEncoder
    from mullama_sdk.manifest import load_manifest

    m = load_manifest(trt_bundle)
    eng = tmp_path / "encoder.engine"
    build_engine(tensorrt, trt_bundle / m.encoder["fp32"], eng, profile=waveform_profile(2, 3, 4))
    ort = OnnxMusicEncoder(trt_bundle / m.encoder["fp32"], trt_bundle / m.adapter["fp32"],
                           providers=["CPUExecutionProvider"], n_threads=2)
    enc = TensorRTMusicEncoder(eng, trt_bundle / m.trt["fp32"].adapter,
                               fallback=lambda: OnnxMusicEncoder(trt_bundle / m.encoder["fp32"],
                                                                 trt_bundle / m.adapter["fp32"],
                                                                 providers=["CPUExecutionProvider"], n_threads=2))
    try:
        for seconds in (1.0, 6.0):  # below min, above max: bit-identical to ONNX Runtime's result
            w = np.random.default_rng(0).standard_normal(int(seconds * SR)).astype(np.float32) * 0.1
            got, want = enc.window_means(w), ort.window_means(w)
            assert got[1] == want[1] and np.array_equal(got[0], want[0])
    finally:
        enc.close()
        ort.close()


@pytest.mark.gpu
@pytest.mark.parametrize("question", [None, "What is the tempo?"])
def test_gpu_captioner_cuda_same_greedy_tokens_as_cpu(trt_bundle, tiny_assets, question):
    from mullama_sdk import Captioner

    clips = [tiny_assets.audio[n] for n in ("music_24k_mono.wav", "music_44k_stereo.flac", "music_24k_mono_10s.wav")]
    kw = dict(quant="f32", encoder_precision="fp32", exact=True, n_threads=2)
    with Captioner.from_pretrained(trt_bundle, device="cpu", **kw) as cpu, \
            Captioner.from_pretrained(trt_bundle, device="cuda", encoder_backend="tensorrt", **kw) as gpu:
        assert type(gpu._encoder).__name__ == "TensorRTMusicEncoder"
        for clip in clips:
            want = cpu.caption(clip, question=question, max_new_tokens=32, temperature=0)
            got = gpu.caption(clip, question=question, max_new_tokens=32, temperature=0)
            assert got.tokens == want.tokens
