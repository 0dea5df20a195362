"""The bundle folder is the contract between the export and the runtime: ``mullama.json`` names every
file (with size and sha256), every dimension and every default; this module reads and validates it.

Validation happens before anything native is loaded, so a broken or mismatched bundle gives a
:class:`BundleError` naming the file, never a crash inside ONNX Runtime or llama.cpp.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import string
from pathlib import Path
from typing import Any

from mullama_sdk.constants import SAMPLE_RATE_HZ
from mullama_sdk.cpu import INT8_SCHEME, INT8_SCHEMES, INT8_WEIGHT_LIMIT, LEGACY_INT8_SCHEME
from mullama_sdk.errors import BundleError

MANIFEST_NAME = "mullama.json"
BUNDLE_FORMAT = "mullama-bundle"
BUNDLE_FORMAT_VERSION = 1

ENCODER_PRECISIONS = ("fp32", "fp16", "int8")
LLM_QUANTS = ("f32", "f16", "q8_0", "q4_k_m")
#: Precisions of TensorRT engines (``mullama-export trt``); int8 would need Q/DQ nodes in the graph.
TRT_PRECISIONS = ("fp32", "fp16")

#: ONNX graph interfaces (input and output names) the runtime relies on.
ENCODER_INPUTS, ENCODER_OUTPUTS = ("waveform",), ("state_means", "n_frames")
ADAPTER_INPUTS, ADAPTER_OUTPUTS = ("state_means",), ("injection", "music_query")


@dataclasses.dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class Dims:
    """Model dimensions, in llama.cpp's words for the LLM and ours for the music side."""

    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int
    mert_dim: int
    mert_states: int
    n_inject: int


@dataclasses.dataclass(frozen=True)
class WaveformProfile:
    """A TensorRT optimization profile of the encoder input ``waveform (1, n_samples)``, in samples.

    The engine accepts ``min <= n_samples <= max`` and is tuned for ``opt``.
    """

    min: int
    opt: int
    max: int

    def contains(self, n_samples: int) -> bool:
        return self.min <= n_samples <= self.max

    def seconds(self, sample_rate: int) -> str:
        return f"{self.min / sample_rate:g}..{self.max / sample_rate:g} s (opt {self.opt / sample_rate:g} s)"


@dataclasses.dataclass(frozen=True)
class TrtEngines:
    """One pair of TensorRT engines (encoder + adapter) from the manifest's optional ``trt`` section.

    Serialized engines only run with the TensorRT release and the GPU architecture they were built
    for, so both are recorded (see :func:`mullama_sdk.encoder_trt.engine_incompatibility`).

    Attributes:
        precision: ``fp32`` or ``fp16``.
        encoder, adapter: Engine file names (listed under ``files``).
        tensorrt_version: ``tensorrt.__version__`` of the build (e.g. ``"10.13.0.35"``).
        gpu_name: Name of the GPU the engines were built on.
        compute_capability: Its compute capability, ``"major.minor"`` (e.g. ``"8.6"``).
        profile: The encoder's waveform-length profile.
        build_seconds: Wall time of the build.
        built: UTC time stamp of the build.
        workspace_gb: Builder workspace limit, ``None`` = TensorRT's default (the GPU's memory).
    """

    precision: str
    encoder: str
    adapter: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    profile: WaveformProfile
    build_seconds: float
    built: str = ""
    workspace_gb: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The manifest form (inverse of the parser)."""
        return {
            "encoder": self.encoder, "adapter": self.adapter, "tensorrt_version": self.tensorrt_version,
            "gpu": {"name": self.gpu_name, "compute_capability": self.compute_capability},
            "profile": {"waveform": dataclasses.asdict(self.profile)},
            "build_seconds": self.build_seconds, "built": self.built, "workspace_gb": self.workspace_gb,
        }


@dataclasses.dataclass(frozen=True)
class Manifest:
    """Parsed ``mullama.json``. File names are relative to the bundle folder."""

    format_version: int
    dims: Dims
    inject_layers: tuple[int, ...]
    sample_rate: int
    min_window_seconds: float
    #: Shortest clip the bundle's encoder was exported and verified for, in samples at ``sample_rate``:
    #: ``audio.min_window_samples``, or ``round(min_window_seconds * sample_rate)`` for bundles that predate it.
    min_window_samples: int
    max_window_seconds: float
    prompt_template: str
    default_question: str
    bos_id: int
    eos_id: int
    sampling: dict[str, float]
    encoder: dict[str, str]
    adapter: dict[str, str]
    llm: dict[str, str]
    default_encoder_precision: str
    default_quant: str
    files: dict[str, FileEntry]
    versions: dict[str, str]
    verification: dict[str, Any]
    notes: tuple[str, ...] = ()
    #: TensorRT engines by precision (optional ``trt`` section, written by ``mullama-export trt``).
    trt: dict[str, TrtEngines] = dataclasses.field(default_factory=dict)
    #: How the int8 graphs were quantized (``quantization.int8.scheme``, one of
    #: :data:`mullama_sdk.cpu.INT8_SCHEMES`); bundles that record none have the legacy full-range scheme.
    #: ``None`` when the bundle ships no int8 graphs.
    int8_scheme: str | None = None
    raw: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("raw")
        d["format"] = BUNDLE_FORMAT
        d["inject_layers"] = list(self.inject_layers)
        d["notes"] = list(self.notes)
        d["trt"] = {k: v.to_dict() for k, v in self.trt.items()}
        return {"format": BUNDLE_FORMAT, **{k: v for k, v in d.items() if k != "format"}}


def _need(d: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise BundleError(f"{where}: missing field {key!r}")
    value = d[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind in (int, float, (int, float)):
        raise BundleError(f"{where}: field {key!r} has type {type(value).__name__}, expected {kind}")
    return value


def parse_manifest(raw: dict[str, Any], *, where: str = MANIFEST_NAME) -> Manifest:
    """Check the manifest's structure and types; raise :class:`BundleError` naming the first problem."""
    if not isinstance(raw, dict) or raw.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{where} is not a mullama bundle manifest (its 'format' is not {BUNDLE_FORMAT!r})")
    version = _need(raw, "format_version", int, where)
    if version > BUNDLE_FORMAT_VERSION:
        raise BundleError(
            f"{where} has bundle format version {version}, newer than this mullama-sdk reads "
            f"(<= {BUNDLE_FORMAT_VERSION}); upgrade mullama-sdk or re-export the bundle"
        )
    if version < 1:
        raise BundleError(f"{where}: invalid format_version {version}")
    dims_raw = _need(raw, "dims", dict, where)
    try:
        dims = Dims(**{f.name: int(_need(dims_raw, f.name, int, f"{where} dims")) for f in dataclasses.fields(Dims)})
    except TypeError as e:
        raise BundleError(f"{where}: bad dims: {e}") from e
    if min(dataclasses.astuple(dims)) <= 0:
        raise BundleError(f"{where}: every dimension must be positive, got {dims}")
    inject = tuple(_need(raw, "inject_layers", list, where))
    if (len(inject) != dims.n_inject or len(set(inject)) != len(inject)
            or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < dims.n_layer for i in inject)):
        raise BundleError(
            f"{where}: inject_layers {list(inject)} must be {dims.n_inject} layer ids in [0, {dims.n_layer})"
        )
    files_raw = _need(raw, "files", dict, where)
    files = {}
    for name, entry in files_raw.items():
        if not isinstance(entry, dict):
            raise BundleError(f"{where}: files[{name!r}] must be an object with size and sha256")
        files[name] = FileEntry(size=int(_need(entry, "size", int, f"{where} files[{name!r}]")),
                                sha256=str(_need(entry, "sha256", str, f"{where} files[{name!r}]")))
        if files[name].size < 0 or not re.fullmatch(r"[0-9a-f]{64}", files[name].sha256):
            raise BundleError(f"{where}: files[{name!r}] needs a size >= 0 and a sha256 of 64 hex digits")

    def variants(key: str, allowed: tuple[str, ...]) -> dict[str, str]:
        v = _need(raw, key, dict, where)
        if not v:
            raise BundleError(f"{where}: {key!r} lists no files")
        for name, file in v.items():
            if name not in allowed:
                raise BundleError(f"{where}: {key} variant {name!r} is unknown (valid: {', '.join(allowed)})")
            if not isinstance(file, str) or file not in files:
                raise BundleError(f"{where}: {key}[{name!r}] = {file!r} is not listed under 'files'")
        return dict(v)

    encoder = variants("encoder", ENCODER_PRECISIONS)
    adapter = variants("adapter", ENCODER_PRECISIONS)
    llm = variants("llm", LLM_QUANTS)
    default_prec = _need(raw, "default_encoder_precision", str, where)
    default_quant = _need(raw, "default_quant", str, where)
    if default_prec not in encoder or default_prec not in adapter:
        raise BundleError(f"{where}: default_encoder_precision {default_prec!r} has no encoder+adapter files")
    if default_quant not in llm:
        raise BundleError(f"{where}: default_quant {default_quant!r} has no GGUF file")
    audio = _need(raw, "audio", dict, where)
    prompt = _need(raw, "prompt", dict, where)
    sample_rate = int(_need(audio, "sample_rate", int, f"{where} audio"))
    if sample_rate != SAMPLE_RATE_HZ:  # first: the minimum window is converted at this rate
        raise BundleError(f"{where}: audio.sample_rate is {sample_rate} Hz; this runtime feeds the encoder "
                          f"{SAMPLE_RATE_HZ} Hz (MERT's rate)")
    min_window, min_samples = _min_window(audio, sample_rate, f"{where} audio")
    max_window = float(_need(audio, "max_window_seconds", (int, float), f"{where} audio"))
    _check_values(raw, dims, sample_rate, min_window, max_window, where)
    trt = parse_trt_section(raw.get("trt", {}), files, where=where,
                            samples=(min_samples, round(max_window * sample_rate)))
    return Manifest(
        format_version=version,
        dims=dims,
        inject_layers=inject,
        sample_rate=sample_rate,
        min_window_seconds=min_window,
        min_window_samples=min_samples,
        max_window_seconds=max_window,
        prompt_template=_need(prompt, "template", str, f"{where} prompt"),
        default_question=_need(prompt, "default_question", str, f"{where} prompt"),
        bos_id=int(_need(prompt, "bos_id", int, f"{where} prompt")),
        eos_id=int(_need(prompt, "eos_id", int, f"{where} prompt")),
        sampling=dict(_need(raw, "sampling", dict, where)),
        encoder=encoder,
        adapter=adapter,
        llm=llm,
        default_encoder_precision=default_prec,
        default_quant=default_quant,
        files=files,
        versions={str(k): str(v) for k, v in _optional(raw, "versions", dict, where).items()},
        verification=dict(_optional(raw, "verification", dict, where)),
        notes=tuple(str(n) for n in _optional(raw, "notes", list, where)),
        trt=trt,
        int8_scheme=_int8_scheme(raw, encoder, where),
        raw=raw,
    )


def int8_manifest_entry(scheme: str = INT8_SCHEME) -> dict[str, Any]:
    """The manifest's ``quantization.int8`` object for graphs quantized with ``scheme``."""
    if scheme not in INT8_SCHEMES:
        raise ValueError(f"unknown int8 scheme {scheme!r}; known: {', '.join(INT8_SCHEMES)}")
    return {"scheme": scheme, "activations": "uint8, quantized per call",
            "weights": f"int8, symmetric per output channel, |w| <= {INT8_WEIGHT_LIMIT if scheme == INT8_SCHEME else 127}",
            "exact_on_every_cpu": INT8_SCHEMES[scheme]}


def _int8_scheme(raw: dict[str, Any], encoder: dict[str, str], where: str) -> str | None:
    """``quantization.int8.scheme``: checked against the known schemes; the legacy one when absent."""
    section = _optional(raw, "quantization", dict, where)
    entry = section.get("int8")
    if entry is None:
        return LEGACY_INT8_SCHEME if "int8" in encoder else None
    if not isinstance(entry, dict):
        raise BundleError(f"{where}: quantization.int8 must be an object with a 'scheme'")
    scheme = _need(entry, "scheme", str, f"{where} quantization.int8")
    if scheme not in INT8_SCHEMES:
        raise BundleError(f"{where}: quantization.int8.scheme {scheme!r} is unknown to this mullama-sdk "
                          f"(known: {', '.join(INT8_SCHEMES)}); upgrade mullama-sdk or re-export the bundle")
    return scheme


def _min_window(audio: dict[str, Any], sample_rate: int, where: str) -> tuple[float, int]:
    """(seconds, samples) of the audio section's minimum window.

    Bundles since the 400-sample minimum state ``min_window_samples`` (exact) next to ``min_window_seconds``
    (``samples / sample_rate``, for older readers); older bundles state seconds only (0.5 s). When both are
    given they must name the same number of samples.
    """
    if "min_window_samples" not in audio:
        seconds = float(_need(audio, "min_window_seconds", (int, float), where))
        if not math.isfinite(seconds) or seconds < 0:
            raise BundleError(f"{where}: min_window_seconds must be a number >= 0, got {seconds}")
        return seconds, round(seconds * sample_rate)
    samples = _need(audio, "min_window_samples", int, where)
    if samples < 0:
        raise BundleError(f"{where}: min_window_samples must be >= 0, got {samples}")
    if "min_window_seconds" not in audio:
        return samples / sample_rate, samples
    seconds = float(_need(audio, "min_window_seconds", (int, float), where))
    if not math.isfinite(seconds) or round(seconds * sample_rate) != samples:
        raise BundleError(f"{where}: min_window_samples {samples} and min_window_seconds {seconds} disagree "
                          f"(at {sample_rate} Hz {seconds} s is {seconds * sample_rate:g} samples)")
    return seconds, samples


def _optional(raw: dict[str, Any], key: str, kind: type, where: str) -> Any:
    value = raw.get(key, kind())
    if not isinstance(value, kind):
        raise BundleError(f"{where}: field {key!r} has type {type(value).__name__}, expected {kind.__name__}")
    return value


def _check_values(raw: dict[str, Any], dims: Dims, sample_rate: int, min_window: float, max_window: float,
                  where: str) -> None:
    """Values of the right type that would still fail, or silently mislead, at caption time."""
    if not (math.isfinite(min_window) and math.isfinite(max_window) and 0 <= min_window <= max_window
            and max_window > 0):
        raise BundleError(f"{where}: audio needs 0 <= min_window_seconds <= max_window_seconds, max > 0; got "
                          f"{min_window} and {max_window}")
    prompt = _need(raw, "prompt", dict, where)
    template = _need(prompt, "template", str, f"{where} prompt")
    try:
        fields = {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
    except ValueError as e:
        raise BundleError(f"{where}: prompt template is not a format string: {e}") from e
    if fields != {"question"}:
        raise BundleError(f"{where}: the prompt template must contain {{question}} and no other field, it has "
                          f"{sorted(fields)}")
    if not _need(prompt, "default_question", str, f"{where} prompt").strip():
        raise BundleError(f"{where}: prompt.default_question is empty")
    for key in ("bos_id", "eos_id"):
        token = _need(prompt, key, int, f"{where} prompt")
        if not 0 <= token < dims.n_vocab:
            raise BundleError(f"{where}: prompt.{key} {token} is not a token id in [0, {dims.n_vocab})")
    sampling = _need(raw, "sampling", dict, where)
    for key, valid, ok in (("temperature", "a number >= 0", lambda v: v >= 0),
                           ("top_p", "a number in (0, 1]", lambda v: 0 < v <= 1),
                           ("max_new_tokens", "an int >= 0", lambda v: isinstance(v, int) and v >= 0)):
        if key in sampling:
            v = sampling[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
                raise BundleError(f"{where}: sampling.{key} is {v!r}; expected {valid}")


_COMPUTE_CAPABILITY = re.compile(r"^[0-9]+\.[0-9]+$")


def parse_trt_section(section: Any, files: dict[str, FileEntry], *, where: str = MANIFEST_NAME,
                      samples: tuple[int, int] | None = None) -> dict[str, TrtEngines]:
    """Check the optional ``trt`` section: ``{precision: {encoder, adapter, tensorrt_version, gpu, profile, ...}}``.

    Args:
        section: ``raw["trt"]`` (``{}`` when the bundle has no engines).
        files: The manifest's file table; every engine must be listed there.
        samples: ``(min, max)`` waveform lengths the encoder graph accepts; the profile must lie inside.

    Raises:
        BundleError: naming the first problem.
    """
    if not isinstance(section, dict):
        raise BundleError(f"{where}: field 'trt' has type {type(section).__name__}, expected an object")
    out = {}
    for precision, entry in section.items():
        at = f"{where} trt[{precision!r}]"
        if precision not in TRT_PRECISIONS:
            raise BundleError(f"{where}: trt precision {precision!r} is unknown (valid: {', '.join(TRT_PRECISIONS)})")
        if not isinstance(entry, dict):
            raise BundleError(f"{at} must be an object")
        names = {}
        for graph in ("encoder", "adapter"):
            name = _need(entry, graph, str, at)
            if name not in files:
                raise BundleError(f"{at}: {graph} engine {name!r} is not listed under 'files'")
            names[graph] = name
        version = _need(entry, "tensorrt_version", str, at)
        if not re.match(r"^[0-9]+\.[0-9]+", version):
            raise BundleError(f"{at}: tensorrt_version {version!r} is not a version like '10.13.0.35'")
        gpu = _need(entry, "gpu", dict, at)
        cc = _need(gpu, "compute_capability", str, f"{at} gpu")
        if not _COMPUTE_CAPABILITY.match(cc):
            raise BundleError(f"{at}: gpu compute_capability {cc!r} is not 'major.minor' (e.g. '8.6')")
        prof_raw = _need(_need(entry, "profile", dict, at), "waveform", dict, f"{at} profile")
        profile = WaveformProfile(*(int(_need(prof_raw, k, int, f"{at} profile.waveform"))
                                    for k in ("min", "opt", "max")))
        if not 0 < profile.min <= profile.opt <= profile.max:
            raise BundleError(f"{at}: profile {dataclasses.asdict(profile)} must have 0 < min <= opt <= max")
        if samples is not None and not (samples[0] <= profile.min and profile.max <= samples[1]):
            raise BundleError(f"{at}: profile {dataclasses.asdict(profile)} lies outside the encoder's "
                              f"{samples[0]}..{samples[1]} samples")
        build_seconds = float(_need(entry, "build_seconds", (int, float), at))
        workspace = entry.get("workspace_gb")
        if workspace is not None and (not isinstance(workspace, (int, float)) or isinstance(workspace, bool)
                                      or workspace <= 0):
            raise BundleError(f"{at}: workspace_gb must be a positive number or null, got {workspace!r}")
        out[precision] = TrtEngines(
            precision=precision, encoder=names["encoder"], adapter=names["adapter"], tensorrt_version=version,
            gpu_name=str(_need(gpu, "name", str, f"{at} gpu")), compute_capability=cc, profile=profile,
            build_seconds=build_seconds, built=str(entry.get("built", "")),
            workspace_gb=None if workspace is None else float(workspace),
        )
    return out


def load_manifest(bundle_dir: Path) -> Manifest:
    """Read and parse ``bundle_dir/mullama.json``."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise BundleError(f"bundle folder not found: {bundle_dir}")
    path = bundle_dir / MANIFEST_NAME
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise BundleError(f"{bundle_dir} is not a bundle: it has no {MANIFEST_NAME}") from e
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: JSON, huge ints
        raise BundleError(f"cannot read {path}: {e}") from e
    return parse_manifest(raw, where=str(path))


def failed_verification(manifest: Manifest) -> list[str]:
    """Verification rows the export recorded as failed (a bundle written with ``--no-strict``), e.g.
    ``["encoder/int8", "adapter/int8"]``: from ``failed_verification`` and from the rows themselves."""
    recorded = manifest.raw.get("failed_verification", [])
    failed = [n for n in recorded if isinstance(n, str)] if isinstance(recorded, list) else []
    for name, row in manifest.verification.items():
        if isinstance(row, dict) and row.get("passed") is False and not row.get("skipped") and name not in failed:
            failed.append(str(name))
    return failed
