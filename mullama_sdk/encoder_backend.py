"""Which encoder backend runs a bundle's music encoder, and why: TensorRT -> ONNX Runtime CUDA -> CPU.

``device="cuda"`` / ``"auto"`` try, in order:

1. TensorRT engines (``encoder_backend`` ``"auto"`` or ``"tensorrt"``), when the bundle has them for
   the precision asked for, ``tensorrt`` and cuda-python import, a CUDA device answers, and the
   engines were built with the same TensorRT major.minor for the same compute capability;
2. ONNX Runtime with the CUDA execution provider (onnxruntime-gpu);
3. ONNX Runtime on the CPU.

Each step that is skipped adds its reason to :attr:`EncoderChoice.reasons`; they are logged (a
warning when ``device="cuda"`` ends on the CPU). ``encoder_backend="tensorrt"`` that cannot be met
raises :class:`BackendUnavailableError` with the reason instead of falling back.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from mullama_sdk import encoder_trt
from mullama_sdk.bundle_files import safe_member
from mullama_sdk.cpu import INT8_SCHEMES, LEGACY_INT8_SCHEME, int8_kernel
from mullama_sdk.errors import BackendUnavailableError, BundleError
from mullama_sdk.manifest import ENCODER_PRECISIONS, Manifest, TrtEngines

if TYPE_CHECKING:
    from mullama_sdk.encoding import MusicEncoder

log = logging.getLogger(__name__)

ENCODER_BACKENDS = ("auto", "tensorrt", "onnxruntime")
DEVICES = ("auto", "cpu", "cuda")
_CPU = "CPUExecutionProvider"
_CUDA = "CUDAExecutionProvider"


@dataclasses.dataclass(frozen=True)
class EncoderChoice:
    """The outcome of :func:`choose_encoder_backend`.

    Attributes:
        backend: ``"tensorrt"`` or ``"onnxruntime"``.
        providers: ONNX Runtime providers (of the ORT backend, or of TensorRT's out-of-profile fallback).
        onnx_precision: ONNX variant ORT loads (``fp32`` / ``fp16`` / ``int8``).
        trt: The engines used (backend ``"tensorrt"``), else ``None``.
        forced: The user asked for this backend by name (no fallback when loading fails).
        reasons: Why each better backend was not chosen.
    """

    backend: str
    providers: tuple[str, ...]
    onnx_precision: str
    trt: TrtEngines | None = None
    forced: bool = False
    reasons: tuple[str, ...] = ()

    @property
    def on_gpu(self) -> bool:
        return self.backend == "tensorrt" or self.providers[0] == _CUDA

    def files(self, manifest: Manifest) -> list[str]:
        """Bundle files this choice loads (for :func:`~mullama_sdk.bundle_files.check_files`)."""
        names = [manifest.encoder[self.onnx_precision], manifest.adapter[self.onnx_precision]]
        names += [f for f in manifest.files if f.endswith(".data") and any(f.startswith(x) for x in names)]
        if self.trt is not None:
            names += [self.trt.encoder, self.trt.adapter]
        return names

    def describe(self) -> str:
        if self.backend == "tensorrt":
            assert self.trt is not None
            return f"TensorRT {self.trt.precision} engines"
        return f"ONNX Runtime {self.onnx_precision} on {self.providers[0]}"


# Probes, module-level so that tests can replace them.
def ort_providers() -> list[str]:
    """ONNX Runtime's available execution providers (BackendUnavailableError without onnxruntime)."""
    from mullama_sdk.encoder_ort import _import_ort

    return list(_import_ort().get_available_providers())


def _usable_trt(manifest: Manifest, precision: str | None) -> TrtEngines:
    """The bundle's TensorRT engines that can run here, or BackendUnavailableError saying why none can."""
    if not manifest.trt:
        raise BackendUnavailableError("this bundle has no TensorRT engines (build them on the target GPU with "
                                      "`mullama-export trt BUNDLE`)")
    if precision is not None:
        if precision not in manifest.trt:
            raise BackendUnavailableError(f"this bundle has TensorRT engines for {sorted(manifest.trt)}, not for "
                                          f"encoder_precision={precision!r}")
        candidates = [manifest.trt[precision]]
    else:
        candidates = [manifest.trt[p] for p in ("fp16", "fp32") if p in manifest.trt]
    version = encoder_trt.tensorrt_version()
    gpu = encoder_trt.cuda_device()
    problems = []
    for entry in candidates:
        why = encoder_trt.engine_incompatibility(entry, tensorrt_version=version, gpu=gpu)
        if why is None:
            return entry
        problems.append(why)
    raise BackendUnavailableError("; ".join(problems))


def choose_encoder_backend(manifest: Manifest, *, device: str = "auto", encoder_backend: str = "auto",
                           encoder_precision: str | None = None) -> EncoderChoice:
    """Pick the encoder backend for ``device`` (see the module docstring for the order).

    Args:
        manifest: The bundle's manifest.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        encoder_backend: ``"auto"``, ``"tensorrt"`` or ``"onnxruntime"``.
        encoder_precision: ``fp32`` / ``fp16`` / ``int8`` or ``None`` (TensorRT: fp16 engines first;
            ONNX Runtime: the TensorRT precision, else fp16 on CUDA, else the manifest's default).

    Raises:
        ValueError: an unknown device or backend name.
        BackendUnavailableError: the forced backend cannot run here (the message says why).
        BundleError: ``encoder_precision`` is not in the bundle.
    """
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(map(repr, DEVICES))}, got {device!r}")
    if encoder_backend not in ENCODER_BACKENDS:
        raise ValueError(f"encoder_backend must be one of {', '.join(map(repr, ENCODER_BACKENDS))}, "
                         f"got {encoder_backend!r}")
    if encoder_precision is not None and encoder_precision not in manifest.encoder:
        raise BundleError(f"encoder_precision={encoder_precision!r} is not in this bundle (it has "
                          f"{sorted(manifest.encoder)}; known: {ENCODER_PRECISIONS})")
    forced = encoder_backend != "auto"
    reasons: list[str] = []
    trt = None
    if encoder_backend == "tensorrt" and device == "cpu":
        raise BackendUnavailableError("encoder_backend='tensorrt' runs on an NVIDIA GPU: use device='cuda' or "
                                      "'auto', or encoder_backend='onnxruntime' for the CPU")
    if device != "cpu" and encoder_backend in ("auto", "tensorrt"):
        try:
            trt = _usable_trt(manifest, encoder_precision)
        except BackendUnavailableError as e:
            if encoder_backend == "tensorrt":
                raise BackendUnavailableError(f"encoder_backend='tensorrt' cannot run: {e}") from e
            reasons.append(f"TensorRT not used: {e}")
    providers: tuple[str, ...] = (_CPU,)
    if device != "cpu":
        available = ort_providers()
        if _CUDA in available:
            providers = (_CUDA, _CPU)
        else:
            reasons.append(f"ONNX Runtime's CUDA provider not used: this ONNX Runtime offers only {available} "
                           f"(install onnxruntime-gpu: pip install 'mullama-sdk[cuda]')")
    if encoder_precision is not None:
        precision = encoder_precision
    elif trt is not None and trt.precision in manifest.encoder:
        precision = trt.precision
    elif providers[0] == _CUDA and "fp16" in manifest.encoder:
        precision = "fp16"
    else:
        precision = manifest.default_encoder_precision
    if precision == "int8" and providers[0] == _CPU:
        precision = _int8_here(manifest, forced=encoder_precision is not None)
    choice = EncoderChoice("tensorrt" if trt is not None else "onnxruntime", providers, precision, trt, forced,
                           tuple(reasons))
    if reasons:
        level = logging.WARNING if device == "cuda" and not choice.on_gpu else logging.INFO
        log.log(level, "encoder on %s (device=%r): %s", choice.describe(), device, "; ".join(reasons))
    return choice


def _int8_here(manifest: Manifest, *, forced: bool) -> str:
    """``int8``, unless the bundle's int8 graphs saturate on this CPU's kernel: then fp32 (or fp16), with a
    one-line warning. Graphs of the legacy scheme (bundles made before int8 weights were limited to 7 bits)
    are right only where int8 products accumulate exactly (VNNI, non-x86); see :mod:`mullama_sdk.cpu`."""
    scheme = manifest.int8_scheme or LEGACY_INT8_SCHEME
    kernel = int8_kernel()
    if INT8_SCHEMES.get(scheme, False) or kernel.exact:
        return "int8"
    fallback = next((p for p in ("fp32", "fp16") if p in manifest.encoder and p in manifest.adapter), None)
    why = (f"this bundle's int8 graphs use full-range weights ({scheme}), which this CPU's int8 kernel "
           f"({kernel.describe()}) can saturate, giving wrong music vectors")
    fix = "re-quantize the bundle once with `mullama-export requantize BUNDLE`"
    if forced or fallback is None:
        log.warning("%s; int8 is used because %s; %s", why,
                    "it was asked for" if forced else "the bundle has no fp32/fp16 graphs", fix)
        return "int8"
    log.warning("%s; using the %s graphs instead (%s)", why, fallback, fix)
    return fallback


def open_encoder(choice: EncoderChoice, bundle_dir: Path, manifest: Manifest, *, n_threads: int | None,
                 low_memory: bool = False) -> MusicEncoder:
    """Load the chosen encoder (either backend implements :class:`~mullama_sdk.encoding.MusicEncoder`); TensorRT that fails to load falls back to ONNX Runtime unless forced.
    ``low_memory`` applies to ONNX Runtime (see :func:`mullama_sdk.encoder_ort.session_options`)."""
    from mullama_sdk.encoder_ort import OnnxMusicEncoder

    enc_onnx = safe_member(bundle_dir, manifest.encoder[choice.onnx_precision])
    ad_onnx = safe_member(bundle_dir, manifest.adapter[choice.onnx_precision])

    def onnx_encoder() -> OnnxMusicEncoder:
        return OnnxMusicEncoder(enc_onnx, ad_onnx, providers=list(choice.providers), n_threads=n_threads,
                                low_memory=low_memory)

    if choice.trt is not None:
        try:
            enc = encoder_trt.TensorRTMusicEncoder(
                safe_member(bundle_dir, choice.trt.encoder), safe_member(bundle_dir, choice.trt.adapter),
                profile=choice.trt.profile, fallback=onnx_encoder)
        except (BackendUnavailableError, RuntimeError) as e:
            if choice.forced:
                raise BackendUnavailableError(f"encoder_backend='tensorrt' cannot run: {e}") from e
            log.warning("TensorRT engines could not be loaded (%s); the encoder runs on ONNX Runtime %s on %s",
                        e, choice.onnx_precision, choice.providers[0])
            return onnx_encoder()
        if (enc.profile.max < round(manifest.max_window_seconds * manifest.sample_rate)
                or enc.profile.min > manifest.min_window_samples):
            log.info("TensorRT profile covers %s; windows outside it run on ONNX Runtime (%s)",
                     enc.profile.seconds(manifest.sample_rate), choice.providers[0])
        return enc
    return onnx_encoder()
