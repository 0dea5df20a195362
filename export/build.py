"""``mullama-export bundle``: one folder with everything the runtime loads, checked and described.

The folder is assembled under a temporary name beside the target and renamed at the very end, so an
interrupted or failed export never leaves a half bundle at ``out``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mullama_sdk import __version__
from mullama_sdk.constants import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    MAX_WINDOW_SECONDS,
    MIN_WINDOW_SAMPLES,
    SAMPLE_RATE_HZ,
)
from mullama_sdk.errors import BundleError, ConfigError, DiskFullError
from mullama_sdk.files import sha256_file
from mullama_sdk.manifest import (
    BUNDLE_FORMAT,
    BUNDLE_FORMAT_VERSION,
    ENCODER_PRECISIONS,
    LLM_QUANTS,
    MANIFEST_NAME,
    int8_manifest_entry,
    parse_manifest,
)
from mullama_sdk.prompt import DEFAULT_QUESTION, PROMPT_TEMPLATE

log = logging.getLogger(__name__)

#: Models up to this many LLaMA parameters get their GGUFs checked against the torch reference
#: during the export (the reference must fit in memory in float32 next to llama.cpp).
AUTO_VERIFY_LLM_MAX_PARAMS = 1_500_000_000


@dataclasses.dataclass(frozen=True)
class BundleOptions:
    """What goes into a bundle.

    Attributes:
        quants: GGUF types to ship (``f32``, ``f16``, ``q8_0``, ``q4_k_m``); the first is the default.
        encoder_precisions: ONNX variants to ship (``fp32``, ``fp16``, ``int8``).
        default_encoder_precision: Default for the runtime; ``int8`` when shipped (CPU), else the first.
        verify_llm: Check the GGUFs against the torch reference during the export; ``None`` = only for
            models small enough (see :data:`AUTO_VERIFY_LLM_MAX_PARAMS`).
        n_ctx_train: Context length written into the GGUF.
        overwrite: Replace an existing bundle at ``out``.
        strict: Fail the export when a verification row fails (otherwise it is recorded and logged).
        isolate_music_export: Export the float32 ONNX graphs (and compute the torch outputs the checks
            compare them with) in a child process, so that none of the torch model's memory - including
            what the ONNX exporter keeps referenced and the checkpoint pages it touched - is held while
            the variants are quantized; ``None`` = when the music model is big
            (:data:`ISOLATE_MUSIC_EXPORT_PARAMS`).
    """

    quants: tuple[str, ...] = ("q4_k_m",)
    encoder_precisions: tuple[str, ...] = ("fp32", "int8")
    default_encoder_precision: str | None = None
    verify_llm: bool | None = None
    n_ctx_train: int = 4096
    overwrite: bool = False
    strict: bool = True
    isolate_music_export: bool | None = None

    def __post_init__(self) -> None:
        for q in self.quants:
            if q not in LLM_QUANTS:
                raise ConfigError(f"unknown quant {q!r}; valid: {', '.join(LLM_QUANTS)}")
        for p in self.encoder_precisions:
            if p not in ENCODER_PRECISIONS:
                raise ConfigError(f"unknown encoder precision {p!r}; valid: {', '.join(ENCODER_PRECISIONS)}")
        if not self.quants or not self.encoder_precisions:
            raise ConfigError("a bundle needs at least one quant and one encoder precision")
        if self.default_encoder_precision and self.default_encoder_precision not in self.encoder_precisions:
            raise ConfigError(f"default_encoder_precision {self.default_encoder_precision!r} is not shipped")


def _check_out(out: Path, overwrite: bool, inputs: Sequence[Any] = ()) -> None:
    from export.safety import check_out

    check_out(out, overwrite=overwrite, inputs=[Path(p) for p in inputs if isinstance(p, (str, os.PathLike))])


def _check_inputs(checkpoint: Any, llama_dir: Path, mert_dir: Path, audio: Sequence[Path]) -> None:
    """The input paths exist (checked before torch is imported: a typo fails in a fraction of a second)."""
    from mullama_sdk.errors import AudioError, CheckpointError

    if isinstance(checkpoint, (str, os.PathLike)) and not Path(checkpoint).is_file():
        raise CheckpointError(f"checkpoint not found: {checkpoint}" + (" (it is a folder)" if Path(checkpoint).is_dir()
                                                                         else ""))
    if not Path(llama_dir).is_dir():
        raise ConfigError(f"LLaMA folder not found: {llama_dir}")
    if not Path(mert_dir).is_dir():
        raise ConfigError(f"MERT folder not found: {mert_dir}")
    for f in audio:
        if not Path(f).is_file():
            raise AudioError(f"audio file not found: {f}")


def build_bundle(
    checkpoint: Path,
    llama_dir: Path,
    mert_dir: Path,
    out: Path,
    *,
    options: BundleOptions = BundleOptions(),
    audio: Sequence[Path] = (),
    trust_pickle: bool = False,
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Export a checkpoint (published MU-LLaMA or ours) + folders into a verified bundle at ``out``.

    Safe next to a user's files: ``out`` must not exist, or (``overwrite``) hold a previous bundle and
    nothing else; the free space needed is checked first; SIGTERM/SIGHUP unwind like Ctrl-C (when their
    handlers are the default); temporary folders of interrupted runs are reported or removed (see
    :mod:`export.safety`).

    Args:
        audio: Extra clips for the verification (synthetic test signals are always used).
        progress: Called with a short line per step (the CLI prints them); an
            :class:`export.progress.Reporter` also shows a live bar on a terminal.

    Returns:
        ``out``.

    Raises:
        BundleError: unwritable/existing output, a failed verification row (with ``strict``; without it,
            when no variant of a kind passed), not enough disk space (:class:`DiskFullError`).
        CheckpointError, ConfigError: bad inputs (see :func:`training.reference.loading.open_sources`).
    """
    from export import safety
    from export.progress import Reporter

    say = progress if isinstance(progress, Reporter) else Reporter(progress)
    out = Path(out)
    _check_inputs(checkpoint, llama_dir, mert_dir, audio)
    _check_out(out, options.overwrite, [checkpoint, llama_dir, mert_dir, *audio])
    with safety.termination_handlers():
        return _export(checkpoint, llama_dir, mert_dir, out, options, audio, trust_pickle, threads, say)


def _export(checkpoint, llama_dir, mert_dir, out: Path, options: BundleOptions, audio, trust_pickle: bool,
            threads: int | None, say) -> Path:
    """:func:`build_bundle` after its argument checks."""
    import torch

    from export import safety
    from export.gguf_export import write_gguf
    from export.music_export import ADAPTER_FP32, ENCODER_FP32, MusicJob, run_in_child
    from export.onnx_precision import convert_fp16, quantize_int8
    from export.progress import seconds_text
    from export.quantize import quantize_gguf
    from export.verify import check_windows, format_table, llm_checks, onnx_checks
    from training.reference.loading import build_model, open_sources

    t_start = time.perf_counter()
    with say.step("sources: checkpoint, LLaMA and MERT folders"):
        src = open_sources(checkpoint, llama_dir, mert_dir, trust_pickle=trust_pickle)
    cfg = src.config
    if cfg.injection.query_len != 1:
        raise ConfigError(f"query_len {cfg.injection.query_len}: only query_len 1 folds into constant vectors")
    parent = out.parent if str(out.parent) else Path(".")
    safety.sweep_partials(parent, out.name)
    space = estimate_space(cfg, options)
    _check_space(parent, space, say)
    tmp: Path | None = None
    emergency = None
    try:
        with safety.deferred_signals():  # no interruption between creating the folder and registering it
            tmp = safety.make_partial(out, parent)
            emergency = safety.register_emergency(lambda: shutil.rmtree(tmp, ignore_errors=True))
        isolate = options.isolate_music_export
        if isolate is None:
            isolate = _music_params(cfg) > ISOLATE_MUSIC_EXPORT_PARAMS and isinstance(checkpoint, (str, Path))
        windows = check_windows(audio)
        job = MusicJob(checkpoint, llama_dir, mert_dir, trust_pickle, tmp, tuple(windows), torch.get_num_threads())
        with say.step(f"music model: MERT {cfg.adapter.mert_dim}x{cfg.adapter.n_states - 1}, adapter -> "
                      f"{cfg.llama.dim}: float32 ONNX graphs" + (" (in a child process)" if isolate else ""),
                      folder=tmp, expect_bytes=space.files["fp32"], writes=tmp / ENCODER_FP32):
            reference = run_in_child(job) if isolate else job.run()
        encoders, adapters = {"fp32": ENCODER_FP32}, {"fp32": ADAPTER_FP32}
        for p in options.encoder_precisions:
            if p == "fp32":
                continue
            convert = convert_fp16 if p == "fp16" else quantize_int8
            with say.step(f"onnx: {p} variants", folder=tmp, expect_bytes=space.files[p],
                          writes=tmp / f"encoder.{p}.onnx") as step:
                encoders[p] = convert(tmp / "encoder.fp32.onnx", tmp / f"encoder.{p}.onnx").name
                step.writes = tmp / f"adapter.{p}.onnx"
                adapters[p] = convert(tmp / "adapter.fp32.onnx", tmp / f"adapter.{p}.onnx").name

        llms: dict[str, str] = {}
        notes: list[str] = []
        base_type = "f32" if "f32" in options.quants or _llama_params(cfg) < AUTO_VERIFY_LLM_MAX_PARAMS else "f16"
        base = tmp / f"llm.{base_type}.gguf"
        with say.step(f"gguf: {base_type} (LoRA merged, biases, trained norms, tokenizer)", folder=tmp,
                      expect_bytes=space.files[base_type], writes=base):
            write_gguf(src, base, file_type=base_type, n_ctx_train=options.n_ctx_train)
        for q in options.quants:
            if q == base_type:
                llms[q] = base.name
                continue
            with say.step(f"gguf: quantize {q}", folder=tmp, expect_bytes=space.files[q],
                          writes=tmp / f"llm.{q}.gguf"):
                report = quantize_gguf(base, tmp / f"llm.{q}.gguf", q, nthread=threads)
            if report.k_quant_fallback:
                notes.append(f"llm.{q}.gguf: the model's widths are not multiples of 256, so llama.cpp used "
                             f"other types for some tensors: {report.tensor_types}")
            llms[q] = f"llm.{q}.gguf"

        digests: dict[str, tuple[int, int, str]] = {}  # the final manifest re-uses these hashes
        with say.step("checksums: sha256 of every file"):
            manifest_raw = _manifest(cfg, src, encoders, adapters, llms, options, notes, tmp, digests)
        manifest = parse_manifest(manifest_raw, where="new manifest")

        with say.step("verify: ONNX graphs vs torch"):
            checks = onnx_checks(reference, tmp, manifest, threads=threads)
        verify_llm = options.verify_llm
        if verify_llm is None:
            verify_llm = _llama_params(cfg) <= AUTO_VERIFY_LLM_MAX_PARAMS
        if verify_llm:
            with say.step("verify: llama.cpp (hooked) vs torch"):
                full = build_model(src, dtype=torch.float32)
                checks += llm_checks(full, tmp, manifest, windows, quants=llms, threads=threads)
                del full
        else:
            notes.append("llama.cpp outputs were not checked at export time (model too large for the automatic "
                         "check); run `mullama-export verify` on a machine with the memory for it")
        say("\n" + format_table(checks))
        failed = [c.name for c in checks if not c.passed and not c.skipped]
        if failed and options.strict:
            raise BundleError(f"verification failed for {', '.join(failed)}; no bundle was written")
        # Intermediate files that were needed to build the variants but were not asked for.
        if base_type not in options.quants:
            base.unlink()
        if "fp32" not in options.encoder_precisions:
            for stale in tmp.glob("*.fp32.onnx*"):
                stale.unlink()
        manifest_raw = _manifest(cfg, src, encoders, adapters, llms, options, notes, tmp, digests)
        manifest_raw["verification"] = {c.name: c.to_dict() for c in checks}
        if failed:
            _demote_failed(manifest_raw, failed, options)
        if _source_date_epoch() is None:  # a reproducible build records no wall-clock figure
            manifest_raw["export_seconds"] = round(time.perf_counter() - t_start, 1)
        parse_manifest(manifest_raw, where="new manifest")
        with safety.writing(tmp / MANIFEST_NAME, tmp):
            (tmp / MANIFEST_NAME).write_text(json.dumps(manifest_raw, indent=2, ensure_ascii=False) + "\n")
        # Again, now: the folder may have changed during the export (a file added, another bundle written).
        _check_out(out, options.overwrite, [checkpoint, llama_dir, mert_dir, *audio])
        safety.publish(tmp, out)
        size = sum(entry["size"] for entry in manifest_raw["files"].values())
        say(f"bundle written: {out} ({safety.human_bytes(size)}, {seconds_text(time.perf_counter() - t_start)})")
        return out
    except DiskFullError as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise DiskFullError(f"{e}; this export needs about {safety.human_bytes(space.peak)} free in {parent} "
                            f"while it runs") from e
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if emergency is not None:
            safety.unregister_emergency(emergency)


@dataclasses.dataclass(frozen=True)
class SpaceEstimate:
    """Disk space of an export, from the config (see :func:`estimate_space`).

    Attributes:
        peak: Bytes in the temporary folder at the export's fullest (every file, the base GGUF, the
            transient copies of int8 quantization), with a margin.
        final: Bytes of the finished bundle.
        files: Bytes per variant: ``fp32``/``fp16``/``int8`` (encoder + adapter), ``f32``/``f16``/``q8_0``/
            ``q4_k_m`` (the GGUF).
    """

    peak: int
    final: int
    files: dict[str, int]


#: Bytes per parameter of each file type (K-quants of widths that are not multiples of 256 fall back to
#: wider types, hence the q4_k_m figure above its 4.85 bits).
_BYTES_PER_PARAM = {"fp32": 4.0, "fp16": 2.0, "int8": 1.3, "f32": 4.0, "f16": 2.0, "q8_0": 1.07, "q4_k_m": 0.75}


def estimate_space(cfg, options: BundleOptions) -> SpaceEstimate:
    """How much disk an export of ``cfg`` with ``options`` takes, while it runs and when done.

    At LLaMA-2-7B widths with the defaults (q4_k_m; fp32 + int8): about 25 GB while running (the f16 base
    GGUF alone is 13.5 GB), about 10 GB for the bundle.
    """
    music, llama = _music_params(cfg), _llama_params(cfg)  # (MERT's 4M-parameter front end: in the margin)
    files = {k: int(music * b) for k, b in _BYTES_PER_PARAM.items() if k in ENCODER_PRECISIONS}
    files.update({k: int(llama * b) for k, b in _BYTES_PER_PARAM.items() if k in LLM_QUANTS})
    base_type = "f32" if "f32" in options.quants or llama < AUTO_VERIFY_LLM_MAX_PARAMS else "f16"
    onnx = files["fp32"] + sum(files[p] for p in options.encoder_precisions if p != "fp32")
    # int8 quantization stages a copy of each graph before saving it.
    onnx_transient = 2 * files["int8"] if "int8" in options.encoder_precisions else 0
    gguf = files[base_type] + sum(files[q] for q in options.quants if q != base_type)
    peak = onnx + max(onnx_transient, gguf)
    final = (sum(files[p] for p in options.encoder_precisions) + sum(files[q] for q in options.quants))
    margin = lambda n: int(n * 1.05) + (32 << 20)
    return SpaceEstimate(margin(peak), final, files)


def _check_space(parent: Path, space: SpaceEstimate, say) -> None:
    from export.safety import free_bytes, human_bytes

    free = free_bytes(parent)
    if free is None:
        return
    if free < space.peak:
        raise DiskFullError(f"not enough free space in {parent.resolve()}: this export needs about "
                            f"{human_bytes(space.peak)} there while it runs (the finished bundle: about "
                            f"{human_bytes(space.final)}) and {human_bytes(free)} are free; free up space or "
                            f"choose an --out on another disk")
    say(f"space: about {human_bytes(space.peak)} needed in {parent} while exporting, {human_bytes(free)} free")


def _demote_failed(manifest_raw: dict[str, Any], failed: list[str], options: BundleOptions) -> None:
    """``--no-strict`` with failed rows: record them, and make the defaults variants that passed.

    Raises:
        BundleError: no encoder precision (or no GGUF type) passed at all.
    """
    bad_prec = {n.split("/", 1)[1] for n in failed if n.split("/", 1)[0] in ("encoder", "adapter")}
    bad_quant = {n.split("/", 1)[1] for n in failed if n.startswith("llm/")}
    good_prec = [p for p in options.encoder_precisions if p not in bad_prec]
    good_quant = [q for q in options.quants if q not in bad_quant]
    if not good_prec or not good_quant:
        kind = "encoder precision" if not good_prec else "GGUF type"
        raise BundleError(f"verification failed for {', '.join(failed)}: no {kind} passed, so there is no "
                          f"variant to make the default; no bundle was written")
    changed = []
    if manifest_raw["default_encoder_precision"] in bad_prec:
        changed.append(f"default_encoder_precision {manifest_raw['default_encoder_precision']} -> {good_prec[0]}")
        manifest_raw["default_encoder_precision"] = good_prec[0]
    if manifest_raw["default_quant"] in bad_quant:
        changed.append(f"default_quant {manifest_raw['default_quant']} -> {good_quant[0]}")
        manifest_raw["default_quant"] = good_quant[0]
    manifest_raw["failed_verification"] = list(failed)
    manifest_raw.setdefault("notes", []).append(
        f"exported with --no-strict: verification FAILED for {', '.join(failed)}; those variants are shipped but "
        f"are not the default" + (f" ({'; '.join(changed)})" if changed else ""))
    log.warning("--no-strict: verification failed for %s; the bundle ships them, but the defaults are variants "
                "that passed (%s / %s)", ", ".join(failed), manifest_raw["default_encoder_precision"],
                manifest_raw["default_quant"])


#: Music models (MERT + adapter) above this many parameters are exported in a child process by default
#: (:attr:`BundleOptions.isolate_music_export`). Measured at real widths (MERT-330M shape + the 7B adapter, 4
#: LLaMA layers): the ONNX part of the export peaked at 15.4 GB in one process, 14.4 GB when the model was
#: merely deleted before quantizing (the exporter keeps graph modules referenced, and the touched checkpoint
#: pages stay mapped); with the child: 8.0 GB in the child, 9.0 GB in the parent (int8 quantization of the
#: 2.7 GB adapter), identical files. (That model's automatic llama.cpp check then peaks at 12.8 GB: the whole
#: float32 torch model beside an f32 GGUF; a 7B model skips it, see AUTO_VERIFY_LLM_MAX_PARAMS.)
ISOLATE_MUSIC_EXPORT_PARAMS = 200_000_000


def _music_params(cfg) -> int:
    """MERT + adapter parameters, from the config (HuBERT layers ~12 d^2, SwiGLU blocks 3 d h)."""
    a = cfg.adapter
    mert = (a.n_states - 1) * 12 * a.mert_dim * a.mert_dim
    return mert + a.mert_dim * a.dim + a.n_blocks * 3 * a.dim * a.block_hidden


def _source_date_epoch() -> int | None:
    """``SOURCE_DATE_EPOCH`` (the reproducible-builds convention): when set, the manifest's ``created`` is
    that time and no export duration is recorded, so the same inputs give a byte-identical bundle."""
    raw = os.environ.get("SOURCE_DATE_EPOCH")
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError as e:
        raise ConfigError(f"SOURCE_DATE_EPOCH={raw!r} is not an integer (seconds since 1970)") from e


def _llama_params(cfg) -> int:
    p = cfg.llama
    per_layer = 2 * p.dim * p.dim + 2 * p.dim * p.kv_heads * p.head_dim + 3 * p.dim * p.hidden_dim
    return p.n_layers * per_layer + 2 * p.vocab_size * p.dim


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"mullama_sdk": __version__}
    for dist in ("torch", "transformers", "onnx", "onnxruntime", "gguf", "llama-cpp-python"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    from export.graphs import OPSET

    out["onnx_opset"] = str(OPSET)
    return out


def _manifest(cfg, src, encoders, adapters, llms, options: BundleOptions, notes, folder: Path,
              digests: dict[str, tuple[int, int, str]]) -> dict[str, Any]:
    """The manifest dict; ``digests`` caches (size, mtime_ns, sha256) per file so that an unchanged
    file (a 7B GGUF takes tens of seconds) is hashed once across the interim and the final manifest."""
    files = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name != MANIFEST_NAME and not path.name.startswith("."):  # not the owner file
            st = path.stat()
            cached = digests.get(path.name)
            if cached is None or cached[:2] != (st.st_size, st.st_mtime_ns):
                cached = digests[path.name] = (st.st_size, st.st_mtime_ns, sha256_file(path))
            files[path.name] = {"size": st.st_size, "sha256": cached[2]}
    p = cfg.llama
    default_prec = options.default_encoder_precision or (
        "int8" if "int8" in options.encoder_precisions else options.encoder_precisions[0])
    return {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(_source_date_epoch())),
        "source": {"checkpoint": Path(src.checkpoint.path).name, "kind": "mullama" if src.checkpoint.config
                   else "published"},
        "dims": {"n_embd": p.dim, "n_layer": p.n_layers, "n_head": p.n_heads, "n_head_kv": p.kv_heads,
                 "n_ff": p.hidden_dim, "n_vocab": p.vocab_size, "mert_dim": cfg.adapter.mert_dim,
                 "mert_states": cfg.adapter.n_states, "n_inject": cfg.injection.n_layers},
        "inject_layers": cfg.injection.layer_ids(p.n_layers),
        # min_window_samples is exact (one MERT frame); the seconds field is for readers that predate it
        # (round(seconds * sample_rate) gives the same 400 samples back).
        "audio": {"sample_rate": SAMPLE_RATE_HZ, "min_window_samples": MIN_WINDOW_SAMPLES,
                  "min_window_seconds": MIN_WINDOW_SAMPLES / SAMPLE_RATE_HZ,
                  "max_window_seconds": MAX_WINDOW_SECONDS, "channels": "mono (mean after resampling)"},
        "prompt": {"template": PROMPT_TEMPLATE, "default_question": DEFAULT_QUESTION,
                   "bos_id": src.tokenizer.bos_id, "eos_id": src.tokenizer.eos_id, "add_bos": True},
        "sampling": {"temperature": DEFAULT_TEMPERATURE, "top_p": DEFAULT_TOP_P,
                     "max_new_tokens": DEFAULT_MAX_NEW_TOKENS},
        "encoder": {k: encoders[k] for k in options.encoder_precisions},
        "adapter": {k: adapters[k] for k in options.encoder_precisions},
        "llm": {k: v for k, v in llms.items() if (folder / v).exists()},
        "default_encoder_precision": default_prec,
        "default_quant": options.quants[0],
        **({"quantization": {"int8": int8_manifest_entry()}} if "int8" in options.encoder_precisions else {}),
        "files": files,
        "versions": _versions(),
        "verification": {},
        "notes": notes,
    }
