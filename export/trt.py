"""``mullama-export trt``: TensorRT engines (encoder + adapter) for the GPU of this machine, into a bundle.

    mullama-export trt BUNDLE [--fp16] [--min-seconds S --opt-seconds 10 --max-seconds 30] [--workspace-gb N]

Engines are built with NVIDIA's ``tensorrt`` Python API (Builder, OnnxParser, BuilderConfig, one
optimization profile) from the bundle's float32 ONNX graphs:

* the encoder's input ``waveform (1, n_samples)`` gets an explicit min/opt/max profile, given in
  seconds, converted at 24 kHz and clamped to the encoder graph spec's range (400 samples, one MERT frame,
  .. 30 s; the default min is that frame, raised to the bundle's own minimum for bundles exported for
  0.5 s and more); the adapter is static;
* networks are strongly typed (the precision is the graph's, TensorRT does not pick lower types on
  its own) and TF32 is off, so an fp32 engine computes in float32. An fp16 engine is built from the
  float16 conversion of the fp32 graph made by :func:`export.onnx_precision.convert_fp16` (the same
  conversion as the bundle's ONNX fp16 variant: the time-mean and the RMS statistics stay float32).
  TensorRT 11 removed the weakly typed ``BuilderFlag.FP16`` route; this one works on 10 and 11.

Before anything is published the engines are compared with ONNX Runtime fp32 (:func:`export.verify.compare_trt`;
fp16 within 1e-2 relative, fp32 within 1e-4). Then ``encoder.trt.<precision>.engine`` and
``adapter.trt.<precision>.engine`` are moved into the bundle (temporary file + rename) and
``mullama.json`` is rewritten atomically with their sizes and sha256, the ``trt`` section (file
names, TensorRT version, GPU name and compute capability, profile, build time) and the verification rows.

An engine only runs with the TensorRT major.minor and the GPU architecture it was built for; the
runtime checks both (:func:`mullama_sdk.encoder_trt.engine_incompatibility`) and falls back to ONNX
Runtime otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mullama_sdk import encoder_trt
from mullama_sdk.bundle_files import check_files, safe_member
from mullama_sdk.constants import MAX_WINDOW_SECONDS, MIN_WINDOW_SAMPLES, SAMPLE_RATE_HZ
from mullama_sdk.encoder_trt import INSTALL_HINT, GpuInfo, trt_logger
from mullama_sdk.errors import BackendUnavailableError, BundleError, ConfigError, ExportError
from mullama_sdk.manifest import MANIFEST_NAME, WAVEFORM, FileEntry, load_manifest, write_manifest
from mullama_sdk.manifest_trt import TRT_PRECISIONS, TrtEngines, WaveformProfile

log = logging.getLogger(__name__)

#: One MERT frame (400 samples = 1/60 s): ``round(DEFAULT_MIN_SECONDS * SAMPLE_RATE_HZ) == MIN_WINDOW_SAMPLES``.
DEFAULT_MIN_SECONDS = MIN_WINDOW_SAMPLES / SAMPLE_RATE_HZ
DEFAULT_OPT_SECONDS = 10.0
DEFAULT_MAX_SECONDS = MAX_WINDOW_SECONDS


def engine_name(graph: str, precision: str) -> str:
    """``encoder.trt.fp16.engine`` etc."""
    return f"{graph}.trt.{precision}.engine"


def waveform_profile(min_seconds: float = DEFAULT_MIN_SECONDS, opt_seconds: float = DEFAULT_OPT_SECONDS,
                     max_seconds: float = DEFAULT_MAX_SECONDS) -> WaveformProfile:
    """The encoder's min/opt/max ``n_samples`` at 24 kHz, clamped to the graph spec's range.

    Raises:
        ConfigError: a value outside 400 samples (1/60 s) .. 30 s once rounded to samples (or not finite), or
            not ``min <= opt <= max``.
    """
    from export.graphs import ENCODER_GRAPH

    values = {"min": min_seconds, "opt": opt_seconds, "max": max_seconds}
    max_samples = round(MAX_WINDOW_SECONDS * SAMPLE_RATE_HZ)
    for name, v in values.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) \
                or not MIN_WINDOW_SAMPLES <= round(v * SAMPLE_RATE_HZ) <= max_samples:
            raise ConfigError(f"--{name}-seconds {v!r} is outside the encoder's window range "
                              f"{DEFAULT_MIN_SECONDS:.3g}..{MAX_WINDOW_SECONDS:g} s "
                              f"({MIN_WINDOW_SAMPLES}..{max_samples} samples)")
    if not min_seconds <= opt_seconds <= max_seconds:
        raise ConfigError(f"the profile needs min <= opt <= max, got --min-seconds {min_seconds:g} "
                          f"--opt-seconds {opt_seconds:g} --max-seconds {max_seconds:g}")
    spec = ENCODER_GRAPH.dynamic["n_samples"]
    lo, opt, hi = (min(max(round(v * SAMPLE_RATE_HZ), spec.min), spec.max) for v in values.values())
    return WaveformProfile(lo, opt, hi)


@dataclasses.dataclass(frozen=True)
class TrtBuildOptions:
    """What ``mullama-export trt`` builds.

    Attributes:
        precision: ``fp32`` or ``fp16``.
        profile: The encoder's waveform profile (see :func:`waveform_profile`).
        workspace_gb: Builder workspace limit (``set_memory_pool_limit(WORKSPACE)``); ``None`` = TensorRT's
            default, the GPU's memory.
        strict: Keep nothing when the comparison with ONNX Runtime fails.
    """

    precision: str = "fp32"
    profile: WaveformProfile = dataclasses.field(default_factory=waveform_profile)
    workspace_gb: float | None = None
    strict: bool = True

    def __post_init__(self) -> None:
        if self.precision not in TRT_PRECISIONS:
            raise ConfigError(f"unknown TensorRT precision {self.precision!r}; valid: {', '.join(TRT_PRECISIONS)}")
        ws = self.workspace_gb
        if ws is not None and (not isinstance(ws, (int, float)) or not math.isfinite(ws) or ws <= 0):
            raise ConfigError(f"--workspace-gb must be a positive number of GiB, got {ws!r}")


def build_environment() -> tuple[Any, GpuInfo]:
    """``tensorrt`` and the CUDA device, or :class:`BackendUnavailableError` naming every failed check."""
    problems, trt, gpu = [], None, None
    try:
        trt = encoder_trt.import_tensorrt()
    except BackendUnavailableError as e:
        problems.append(str(e))
    try:
        gpu = encoder_trt.cuda_device()
    except BackendUnavailableError as e:
        problems.append(str(e))
    if problems:
        hint = "; " + INSTALL_HINT
        text = "; ".join(p.replace(hint, "") for p in problems)
        raise BackendUnavailableError(f"cannot build TensorRT engines on this machine: {text}"
                                      + (hint if any(hint in p for p in problems) else ""))
    return trt, gpu


def build_engine(trt: Any, onnx_path: Path, out_path: Path, *, profile: WaveformProfile | None,
                 workspace_gb: float | None = None) -> float:
    """Parse one ONNX graph, build and serialize its engine to ``out_path``; returns the build seconds.

    Raises:
        ExportError: TensorRT cannot parse or build the graph (with its error messages).
    """
    logger = trt_logger(trt)
    t0 = time.perf_counter()
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):  # always on (and ignored) in TensorRT 11
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # By path: the parser finds external weight files (``.onnx.data``) next to the graph.
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(_parser_error(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT's ONNX parser rejects {onnx_path.name}: {errors or logger.recent_errors()}")
    config = builder.create_builder_config()
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # TF32 has a 10-bit mantissa: fp32 must mean fp32
    if workspace_gb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    dynamic = []
    for i in range(network.num_inputs):
        t = network.get_input(i)
        shape = tuple(t.shape)
        if any(d < 0 for d in shape):
            dynamic.append((t.name, shape))
    if dynamic:
        if profile is None or [n for n, _ in dynamic] != [WAVEFORM]:
            raise ExportError(f"{onnx_path.name} has dynamic inputs {dynamic}; only the encoder's waveform "
                              f"length has a profile")
        _, shape = dynamic[0]
        opt_profile = builder.create_optimization_profile()
        opt_profile.set_shape(WAVEFORM, (shape[0] if shape[0] > 0 else 1, profile.min),
                              (shape[0] if shape[0] > 0 else 1, profile.opt),
                              (shape[0] if shape[0] > 0 else 1, profile.max))
        config.add_optimization_profile(opt_profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT could not build an engine from {onnx_path.name}: {logger.recent_errors()}")
    out_path.write_bytes(bytes(serialized))
    return time.perf_counter() - t0


def _parser_error(err: Any) -> str:
    """One ``nvonnxparser`` error: its description and, where known, the ONNX node."""
    try:
        text, node = err.desc(), err.node_name()
    except AttributeError:
        return str(err)
    return f"{text} (node {node})" if node else str(text)


def build_bundle_engines(bundle: Path, options: TrtBuildOptions = TrtBuildOptions(), *,
                         threads: int | None = None, progress: Callable[[str], None] | None = None) -> TrtEngines:
    """Build, verify and add the TensorRT engines of ``options.precision`` to a bundle.

    Returns:
        The manifest's new ``trt`` entry.

    Raises:
        BackendUnavailableError: no tensorrt / cuda-python / CUDA device here (the message names which).
        BundleError: not a bundle, no fp32 graphs, unwritable folder, or (``strict``) verification failed.
    """
    from export.verify import compare_trt, failed_rows, format_table, trt_check_windows

    say = progress or (lambda msg: log.info("%s", msg))
    bundle = Path(bundle)
    manifest = load_manifest(bundle)
    if "fp32" not in manifest.encoder or "fp32" not in manifest.adapter:
        raise BundleError(f"{bundle} has no fp32 ONNX graphs (it has {sorted(manifest.encoder)}): engines are built "
                          f"from them; re-export the bundle with --encoder-precision fp32 ...")
    if not os.access(bundle, os.W_OK | os.X_OK):
        raise BundleError(f"cannot add engines: the bundle folder {bundle} is not writable")
    options = _fit_profile_to_bundle(options, manifest.min_window_samples, bundle, say)
    trt, gpu = build_environment()
    sources = {"encoder": manifest.encoder["fp32"], "adapter": manifest.adapter["fp32"]}
    names = list(sources.values())
    names += [f for f in manifest.files if f.endswith(".data") and any(f.startswith(x) for x in names)]
    check_files(bundle, manifest, names, sha256=True)  # the source must be the verified one
    p = options.precision
    say(f"TensorRT {trt.__version__} on {gpu.name} (compute capability {gpu.compute_capability}): {p} engines, "
        f"waveform profile {options.profile.seconds(SAMPLE_RATE_HZ)}")
    with tempfile.TemporaryDirectory(prefix=".trt-build-", dir=bundle) as tmp_name:
        tmp = Path(tmp_name)
        built: dict[str, Path] = {}
        seconds = 0.0
        for graph, name in sources.items():
            src = safe_member(bundle, name)
            if p == "fp16":
                from export.onnx_precision import convert_fp16

                say(f"{graph}: float16 conversion of {name}")
                src = convert_fp16(src, tmp / f"{graph}.fp16.onnx")
            say(f"{graph}: building {engine_name(graph, p)} (this can take minutes)")
            built[graph] = tmp / engine_name(graph, p)
            seconds += build_engine(trt, src, built[graph], profile=options.profile if graph == "encoder" else None,
                                    workspace_gb=options.workspace_gb)
        say(f"verify: TensorRT {p} vs ONNX Runtime fp32")
        checks = compare_trt(built["encoder"], built["adapter"], safe_member(bundle, sources["encoder"]),
                             safe_member(bundle, sources["adapter"]),
                             trt_check_windows(options.profile), precision=p, threads=threads)
        say("\n" + format_table(checks))
        failed = failed_rows(checks)
        if failed and options.strict:
            raise BundleError(f"TensorRT verification failed for {', '.join(failed)}; no engine was added to {bundle}")
        entry = TrtEngines(
            precision=p, encoder=engine_name("encoder", p), adapter=engine_name("adapter", p),
            tensorrt_version=str(trt.__version__), gpu_name=gpu.name, compute_capability=gpu.compute_capability,
            profile=options.profile, build_seconds=round(seconds, 1),
            built=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), workspace_gb=options.workspace_gb,
        )
        # Publish: engines first (renames within one folder), then the manifest that lists them.
        for graph, path in built.items():
            path.chmod(0o644)
            os.replace(path, bundle / engine_name(graph, p))
    _update_manifest(bundle, entry, checks)
    say(f"engines added to {bundle}: {entry.encoder}, {entry.adapter}")
    return entry


def _fit_profile_to_bundle(options: TrtBuildOptions, bundle_min: int, bundle: Path,
                           say: Callable[[str], None]) -> TrtBuildOptions:
    """Raise the profile's min to the bundle's own minimum window (0.5 s in bundles exported before the
    400-sample minimum): the runtime never sends shorter windows, and the manifest refuses a profile
    reaching below what the bundle's encoder was exported and verified for.

    Raises:
        ConfigError: the raised min would exceed the profile's opt.
    """
    profile = options.profile
    if profile.min >= bundle_min:
        return options
    if bundle_min > profile.opt:
        raise ConfigError(f"{bundle} takes windows of at least {bundle_min} samples "
                          f"({bundle_min / SAMPLE_RATE_HZ:g} s); --opt-seconds must be at least that, got "
                          f"{profile.opt / SAMPLE_RATE_HZ:g} s")
    say(f"the bundle takes windows of at least {bundle_min} samples ({bundle_min / SAMPLE_RATE_HZ:g} s): the "
        f"profile's min is raised from {profile.min} to {bundle_min} samples")
    return dataclasses.replace(options, profile=dataclasses.replace(profile, min=bundle_min))


def _update_manifest(bundle: Path, entry: TrtEngines, checks) -> None:
    """Add the engines to ``files``, ``trt`` and ``verification``; validate; replace mullama.json atomically."""
    raw = json.loads((bundle / MANIFEST_NAME).read_text(encoding="utf-8"))
    for name in (entry.encoder, entry.adapter):
        raw["files"][name] = FileEntry.of(bundle / name).to_dict()
    raw.setdefault("trt", {})[entry.precision] = entry.to_dict()
    raw.setdefault("verification", {}).update({c.name: c.to_dict() for c in checks})
    raw.setdefault("versions", {})["tensorrt"] = entry.tensorrt_version
    write_manifest(bundle, raw, where="updated manifest")
