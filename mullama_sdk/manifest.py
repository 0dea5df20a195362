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
from mullama_sdk.files import atomic_write_text, sha256_file
from mullama_sdk.manifest_fields import need_field, optional_field
from mullama_sdk.manifest_trt import TrtEngines, parse_trt_section

MANIFEST_NAME = "mullama.json"
BUNDLE_FORMAT = "mullama-bundle"
BUNDLE_FORMAT_VERSION = 1

ENCODER_PRECISIONS = ("fp32", "fp16", "int8")
LLM_QUANTS = ("f32", "f16", "q8_0", "q4_k_m")

#: ONNX graph interfaces (input and output names) the runtime relies on, declared once: the exporter's graph
#: specs (``export.graphs``) and every feed and comparison use these names.
WAVEFORM, STATE_MEANS, N_FRAMES = "waveform", "state_means", "n_frames"
INJECTION, MUSIC_QUERY = "injection", "music_query"
ENCODER_INPUTS, ENCODER_OUTPUTS = (WAVEFORM,), (STATE_MEANS, N_FRAMES)
ADAPTER_INPUTS, ADAPTER_OUTPUTS = (STATE_MEANS,), (INJECTION, MUSIC_QUERY)


@dataclasses.dataclass(frozen=True)
class FileEntry:
    """One row of the manifest's ``files`` table: what the runtime checks a bundle file against."""

    size: int
    sha256: str

    @classmethod
    def of(cls, path: Path) -> FileEntry:
        """The entry of the file at ``path`` as it is now (hashed in full)."""
        return cls(size=Path(path).stat().st_size, sha256=sha256_file(path))

    def to_dict(self) -> dict[str, Any]:
        """The manifest form, ``{"size": ..., "sha256": ...}``."""
        return {"size": self.size, "sha256": self.sha256}


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


def parse_manifest(raw: dict[str, Any], *, where: str = MANIFEST_NAME) -> Manifest:
    """Check the manifest's structure and types; raise :class:`BundleError` naming the first problem."""
    if not isinstance(raw, dict) or raw.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{where} is not a mullama bundle manifest (its 'format' is not {BUNDLE_FORMAT!r})")
    version = need_field(raw, "format_version", int, where)
    if version > BUNDLE_FORMAT_VERSION:
        raise BundleError(
            f"{where} has bundle format version {version}, newer than this mullama-sdk reads "
            f"(<= {BUNDLE_FORMAT_VERSION}); upgrade mullama-sdk or re-export the bundle"
        )
    if version < 1:
        raise BundleError(f"{where}: invalid format_version {version}")
    dims_raw = need_field(raw, "dims", dict, where)
    try:
        dims = Dims(**{f.name: int(need_field(dims_raw, f.name, int, f"{where} dims")) for f in dataclasses.fields(Dims)})
    except TypeError as e:
        raise BundleError(f"{where}: bad dims: {e}") from e
    if min(dataclasses.astuple(dims)) <= 0:
        raise BundleError(f"{where}: every dimension must be positive, got {dims}")
    inject = tuple(need_field(raw, "inject_layers", list, where))
    if (len(inject) != dims.n_inject or len(set(inject)) != len(inject)
            or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < dims.n_layer for i in inject)):
        raise BundleError(
            f"{where}: inject_layers {list(inject)} must be {dims.n_inject} layer ids in [0, {dims.n_layer})"
        )
    files_raw = need_field(raw, "files", dict, where)
    files = {}
    for name, entry in files_raw.items():
        if not isinstance(entry, dict):
            raise BundleError(f"{where}: files[{name!r}] must be an object with size and sha256")
        files[name] = FileEntry(size=int(need_field(entry, "size", int, f"{where} files[{name!r}]")),
                                sha256=str(need_field(entry, "sha256", str, f"{where} files[{name!r}]")))
        if files[name].size < 0 or not re.fullmatch(r"[0-9a-f]{64}", files[name].sha256):
            raise BundleError(f"{where}: files[{name!r}] needs a size >= 0 and a sha256 of 64 hex digits")

    def variants(key: str, allowed: tuple[str, ...]) -> dict[str, str]:
        v = need_field(raw, key, dict, where)
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
    default_prec = need_field(raw, "default_encoder_precision", str, where)
    default_quant = need_field(raw, "default_quant", str, where)
    if default_prec not in encoder or default_prec not in adapter:
        raise BundleError(f"{where}: default_encoder_precision {default_prec!r} has no encoder+adapter files")
    if default_quant not in llm:
        raise BundleError(f"{where}: default_quant {default_quant!r} has no GGUF file")
    audio = need_field(raw, "audio", dict, where)
    prompt = need_field(raw, "prompt", dict, where)
    sample_rate = int(need_field(audio, "sample_rate", int, f"{where} audio"))
    if sample_rate != SAMPLE_RATE_HZ:  # first: the minimum window is converted at this rate
        raise BundleError(f"{where}: audio.sample_rate is {sample_rate} Hz; this runtime feeds the encoder "
                          f"{SAMPLE_RATE_HZ} Hz (MERT's rate)")
    min_window, min_samples = _min_window(audio, sample_rate, f"{where} audio")
    max_window = float(need_field(audio, "max_window_seconds", (int, float), f"{where} audio"))
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
        prompt_template=need_field(prompt, "template", str, f"{where} prompt"),
        default_question=need_field(prompt, "default_question", str, f"{where} prompt"),
        bos_id=int(need_field(prompt, "bos_id", int, f"{where} prompt")),
        eos_id=int(need_field(prompt, "eos_id", int, f"{where} prompt")),
        sampling=dict(need_field(raw, "sampling", dict, where)),
        encoder=encoder,
        adapter=adapter,
        llm=llm,
        default_encoder_precision=default_prec,
        default_quant=default_quant,
        files=files,
        versions={str(k): str(v) for k, v in optional_field(raw, "versions", dict, where).items()},
        verification=dict(optional_field(raw, "verification", dict, where)),
        notes=tuple(str(n) for n in optional_field(raw, "notes", list, where)),
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
    section = optional_field(raw, "quantization", dict, where)
    entry = section.get("int8")
    if entry is None:
        return LEGACY_INT8_SCHEME if "int8" in encoder else None
    if not isinstance(entry, dict):
        raise BundleError(f"{where}: quantization.int8 must be an object with a 'scheme'")
    scheme = need_field(entry, "scheme", str, f"{where} quantization.int8")
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
        seconds = float(need_field(audio, "min_window_seconds", (int, float), where))
        if not math.isfinite(seconds) or seconds < 0:
            raise BundleError(f"{where}: min_window_seconds must be a number >= 0, got {seconds}")
        return seconds, round(seconds * sample_rate)
    samples = need_field(audio, "min_window_samples", int, where)
    if samples < 0:
        raise BundleError(f"{where}: min_window_samples must be >= 0, got {samples}")
    if "min_window_seconds" not in audio:
        return samples / sample_rate, samples
    seconds = float(need_field(audio, "min_window_seconds", (int, float), where))
    if not math.isfinite(seconds) or round(seconds * sample_rate) != samples:
        raise BundleError(f"{where}: min_window_samples {samples} and min_window_seconds {seconds} disagree "
                          f"(at {sample_rate} Hz {seconds} s is {seconds * sample_rate:g} samples)")
    return seconds, samples


def _check_values(raw: dict[str, Any], dims: Dims, sample_rate: int, min_window: float, max_window: float,
                  where: str) -> None:
    """Values of the right type that would still fail, or silently mislead, at caption time."""
    if not (math.isfinite(min_window) and math.isfinite(max_window) and 0 <= min_window <= max_window
            and max_window > 0):
        raise BundleError(f"{where}: audio needs 0 <= min_window_seconds <= max_window_seconds, max > 0; got "
                          f"{min_window} and {max_window}")
    prompt = need_field(raw, "prompt", dict, where)
    template = need_field(prompt, "template", str, f"{where} prompt")
    try:
        fields = {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
    except ValueError as e:
        raise BundleError(f"{where}: prompt template is not a format string: {e}") from e
    if fields != {"question"}:
        raise BundleError(f"{where}: the prompt template must contain {{question}} and no other field, it has "
                          f"{sorted(fields)}")
    if not need_field(prompt, "default_question", str, f"{where} prompt").strip():
        raise BundleError(f"{where}: prompt.default_question is empty")
    for key in ("bos_id", "eos_id"):
        token = need_field(prompt, key, int, f"{where} prompt")
        if not 0 <= token < dims.n_vocab:
            raise BundleError(f"{where}: prompt.{key} {token} is not a token id in [0, {dims.n_vocab})")
    sampling = need_field(raw, "sampling", dict, where)
    for key, valid, ok in (("temperature", "a number >= 0", lambda v: v >= 0),
                           ("top_p", "a number in (0, 1]", lambda v: 0 < v <= 1),
                           ("max_new_tokens", "an int >= 0", lambda v: isinstance(v, int) and v >= 0)):
        if key in sampling:
            v = sampling[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
                raise BundleError(f"{where}: sampling.{key} is {v!r}; expected {valid}")


def manifest_text(raw: dict[str, Any]) -> str:
    """The bytes of ``mullama.json`` for ``raw``: two-space JSON, UTF-8 as is, a trailing newline."""
    return json.dumps(raw, indent=2, ensure_ascii=False) + "\n"


def write_manifest(folder: Path, raw: dict[str, Any], *, where: str = "new manifest",
                   atomic: bool = True) -> Manifest:
    """Validate ``raw`` (:func:`parse_manifest`) and write it as ``folder/mullama.json``: the one writer of
    the file (export, re-quantization, TensorRT engines), so every writer produces the same bytes.

    Args:
        where: Names the manifest in a validation error.
        atomic: Replace the file through a temporary name (readers never see half a manifest). ``False`` for
            a folder staged under a temporary name and published whole, where a plain write is enough.

    Returns:
        The parsed manifest. Nothing is written when validation fails.
    """
    manifest = parse_manifest(raw, where=where)
    path = Path(folder) / MANIFEST_NAME
    if not atomic:
        path.write_text(manifest_text(raw), encoding="utf-8")
        return manifest
    atomic_write_text(path, manifest_text(raw))
    return manifest


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
