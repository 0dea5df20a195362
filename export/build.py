"""``mullama-export bundle``: one folder with everything the runtime loads, checked and described.

The folder is assembled under a temporary name beside the target and renamed at the very end, so an
interrupted or failed export never leaves a half bundle at ``out``.

:func:`build_bundle` runs public stages in order; each can be used alone (``mullama-export verify`` re-runs
the checks, the benchmarks assemble bundles step by step with the same rules, see ``bench.assets``):

1. :func:`check_inputs` (and the ``--out`` checks of :mod:`export.safety`): before anything heavy is imported;
2. :func:`music_stage`: the float32 ONNX graphs of the torch music model (and its outputs, for the checks),
   then every other precision (:func:`convert_onnx_variant`);
3. :func:`llm_stage`: the base GGUF (:func:`export.sizes.base_gguf_type`) and the quantized types;
4. the manifest stage: :func:`export.bundle_layout.bundle_manifest`, the files' sizes and checksums;
5. :func:`verify_stage`: every file against the torch reference;
6. :func:`finish_stage`: intermediates dropped, the final manifest written, the folder published.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from export.bundle_layout import (
    Digests,
    bundle_manifest,
    demote_failed,
    drop_intermediates,
    gguf_file,
    onnx_file,
    source_date_epoch,
)
from export.sizes import (
    base_gguf_type,
    check_space,
    estimate_space,
    isolate_music_by_default,
    verify_llm_by_default,
)
from mullama_sdk.errors import BundleError, ConfigError, DiskFullError
from mullama_sdk.manifest import (
    ENCODER_PRECISIONS,
    LLM_QUANTS,
    MANIFEST_NAME,
    Manifest,
    parse_manifest,
    write_manifest,
)


@dataclasses.dataclass(frozen=True)
class BundleOptions:
    """What goes into a bundle.

    Attributes:
        quants: GGUF types to ship (``f32``, ``f16``, ``q8_0``, ``q4_k_m``); the first is the default.
        encoder_precisions: ONNX variants to ship (``fp32``, ``fp16``, ``int8``).
        default_encoder_precision: Default for the runtime; ``int8`` when shipped (CPU), else the first.
        verify_llm: Check the GGUFs against the torch reference during the export; ``None`` = only for
            models small enough (see :data:`export.sizes.AUTO_VERIFY_LLM_MAX_PARAMS`).
        n_ctx_train: Context length written into the GGUF.
        overwrite: Replace an existing bundle at ``out``.
        strict: Fail the export when a verification row fails (otherwise it is recorded and logged).
        isolate_music_export: Export the float32 ONNX graphs (and compute the torch outputs the checks
            compare them with) in a child process, so that none of the torch model's memory - including
            what the ONNX exporter keeps referenced and the checkpoint pages it touched - is held while
            the variants are quantized; ``None`` = when the music model is big
            (:data:`export.sizes.ISOLATE_MUSIC_EXPORT_PARAMS`).
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


def check_inputs(checkpoint: Any, llama_dir: Path, mert_dir: Path, audio: Sequence[Path]) -> None:
    """Stage 1: the input paths exist (checked before torch is imported: a typo fails in a fraction of a
    second). ``mullama-export verify`` runs it too."""
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
        CheckpointError, ConfigError: bad inputs (see :func:`training.reference.model_sources.open_sources`).
    """
    from export.interrupts import termination_handlers
    from export.progress import Reporter

    say = progress if isinstance(progress, Reporter) else Reporter(progress)
    out = Path(out)
    check_inputs(checkpoint, llama_dir, mert_dir, audio)
    _check_out(out, options.overwrite, [checkpoint, llama_dir, mert_dir, *audio])
    with termination_handlers():
        return _export(checkpoint, llama_dir, mert_dir, out, options, audio, trust_pickle, threads, say)


def _export(checkpoint, llama_dir, mert_dir, out: Path, options: BundleOptions, audio, trust_pickle: bool,
            threads: int | None, say) -> Path:
    """:func:`build_bundle` after its argument checks: the stages, in a temporary folder removed on failure."""
    import torch

    from export import interrupts, safety
    from export.music_export import MusicJob
    from export.verify import check_windows
    from training.reference.model_sources import open_sources

    t_start = time.perf_counter()
    with say.step("sources: checkpoint, LLaMA and MERT folders"):
        src = open_sources(checkpoint, llama_dir, mert_dir, trust_pickle=trust_pickle)
    cfg = src.config
    if cfg.injection.query_len != 1:
        raise ConfigError(f"query_len {cfg.injection.query_len}: only query_len 1 folds into constant vectors")
    parent = out.parent if str(out.parent) else Path(".")
    safety.sweep_partials(parent, out.name)
    space = estimate_space(cfg, options)
    check_space(parent, space, say)
    tmp: Path | None = None
    emergency = None
    try:
        with interrupts.deferred_signals():  # no interruption between creating the folder and registering it
            tmp = safety.make_partial(out, parent)
            emergency = interrupts.register_emergency(lambda: shutil.rmtree(tmp, ignore_errors=True))
        isolate = options.isolate_music_export
        if isolate is None:
            isolate = isolate_music_by_default(cfg) and isinstance(checkpoint, (str, Path))
        windows = check_windows(audio)
        job = MusicJob(checkpoint, llama_dir, mert_dir, trust_pickle, tmp, tuple(windows), torch.get_num_threads())
        reference = music_stage(job, cfg, options, isolate=isolate, say=say, space=space)
        base_type, notes = llm_stage(src, tmp, options, threads=threads, say=say, space=space)

        digests: Digests = {}  # the final manifest re-uses these hashes
        with say.step("checksums: sha256 of every file"):
            manifest = parse_manifest(bundle_manifest(src, options, notes, tmp, digests), where="new manifest")
        checks = verify_stage(reference, src, tmp, manifest, windows, options, notes, threads=threads, say=say)
        return finish_stage(src, tmp, out, options, notes, checks, base_type=base_type, digests=digests,
                            started=t_start, inputs=[checkpoint, llama_dir, mert_dir, *audio], say=say)
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
            interrupts.unregister_emergency(emergency)


def convert_onnx_variant(folder: Path, graph: str, precision: str) -> Path:
    """One ONNX variant (``fp16`` or ``int8``) of ``graph`` (``encoder``/``adapter``) from its float32 graph
    in ``folder``, named by :func:`export.bundle_layout.onnx_file`; returns its path."""
    from export import onnx_precision

    convert = onnx_precision.convert_fp16 if precision == "fp16" else onnx_precision.quantize_int8
    return convert(folder / onnx_file(graph, "fp32"), folder / onnx_file(graph, precision))


def music_stage(job, cfg, options: BundleOptions, *, isolate: bool, say, space):
    """Stage 2: the float32 ONNX graphs (:class:`export.music_export.MusicJob`, in a child process with
    ``isolate``) and every other precision of ``options``, in ``job.folder``.

    Returns:
        The torch music model's outputs on ``job.windows`` (:class:`export.verify.OnnxReference`).
    """
    from export.music_export import run_in_child

    folder = Path(job.folder)
    with say.step(f"music model: MERT {cfg.adapter.mert_dim}x{cfg.adapter.n_states - 1}, adapter -> "
                  f"{cfg.llama.dim}: float32 ONNX graphs" + (" (in a child process)" if isolate else ""),
                  folder=folder, expect_bytes=space.files["fp32"], writes=folder / onnx_file("encoder", "fp32")):
        reference = run_in_child(job) if isolate else job.run()
    for p in options.encoder_precisions:
        if p == "fp32":
            continue
        with say.step(f"onnx: {p} variants", folder=folder, expect_bytes=space.files[p],
                      writes=folder / onnx_file("encoder", p)) as step:
            convert_onnx_variant(folder, "encoder", p)
            step.writes = folder / onnx_file("adapter", p)
            convert_onnx_variant(folder, "adapter", p)
    return reference


def llm_stage(src, folder: Path, options: BundleOptions, *, threads: int | None, say,
              space) -> tuple[str, list[str]]:
    """Stage 3: the base GGUF (:func:`export.sizes.base_gguf_type`) from the checkpoint, then each other type
    of ``options.quants`` quantized from it, in ``folder``.

    Returns:
        The base type (dropped by :func:`finish_stage` when not asked for) and notes for the manifest (K-quant
        fallbacks).
    """
    from export.gguf_export import write_gguf
    from export.quantize import quantize_gguf

    base_type = base_gguf_type(src.config, options.quants)
    base = folder / gguf_file(base_type)
    with say.step(f"gguf: {base_type} (LoRA merged, biases, trained norms, tokenizer)", folder=folder,
                  expect_bytes=space.files[base_type], writes=base):
        write_gguf(src, base, file_type=base_type, n_ctx_train=options.n_ctx_train)
    notes: list[str] = []
    for q in options.quants:
        if q == base_type:
            continue
        with say.step(f"gguf: quantize {q}", folder=folder, expect_bytes=space.files[q],
                      writes=folder / gguf_file(q)):
            report = quantize_gguf(base, folder / gguf_file(q), q, nthread=threads)
        if report.k_quant_fallback:
            notes.append(f"{gguf_file(q)}: the model's widths are not multiples of 256, so llama.cpp used "
                         f"other types for some tensors: {report.tensor_types}")
    return base_type, notes


def verify_stage(reference, src, folder: Path, manifest: Manifest, windows, options: BundleOptions,
                 notes: list[str], *, threads: int | None, say) -> list:
    """Stage 5: the ONNX graphs, and (``options.verify_llm``, by default for models small enough) the GGUFs,
    against the torch reference; prints the table. A note is added when the GGUFs were not checked.

    Returns:
        The rows (:class:`export.verify.Check`).

    Raises:
        BundleError: a row failed and ``options.strict``.
    """
    import torch

    from export.verify import failed_rows, format_table, llm_checks, onnx_checks
    from training.reference.build import build_model

    with say.step("verify: ONNX graphs vs torch"):
        checks = onnx_checks(reference, folder, manifest, threads=threads)
    verify_llm = options.verify_llm
    if verify_llm is None:
        verify_llm = verify_llm_by_default(src.config)
    if verify_llm:
        with say.step("verify: llama.cpp (hooked) vs torch"):
            full = build_model(src, dtype=torch.float32)
            checks += llm_checks(full, folder, manifest, windows, quants=options.quants, threads=threads)
            del full
    else:
        notes.append("llama.cpp outputs were not checked at export time (model too large for the automatic "
                     "check); run `mullama-export verify` on a machine with the memory for it")
    say("\n" + format_table(checks))
    failed = failed_rows(checks)
    if failed and options.strict:
        raise BundleError(f"verification failed for {', '.join(failed)}; no bundle was written")
    return checks


def finish_stage(src, folder: Path, out: Path, options: BundleOptions, notes: list[str], checks, *,
                 base_type: str, digests: Digests, started: float, inputs: Sequence[Any], say) -> Path:
    """Stage 6: drop the intermediate files, write the final manifest (rows, failed variants demoted, the
    export's duration unless ``SOURCE_DATE_EPOCH`` is set), check ``out`` again and publish ``folder`` there."""
    from export import safety
    from export.progress import seconds_text
    from export.verify import failed_rows

    drop_intermediates(folder, options, base_type)
    manifest_raw = bundle_manifest(src, options, notes, folder, digests)
    manifest_raw["verification"] = {c.name: c.to_dict() for c in checks}
    failed = failed_rows(checks)
    if failed:
        demote_failed(manifest_raw, failed, options)
    if source_date_epoch() is None:  # a reproducible build records no wall-clock figure
        manifest_raw["export_seconds"] = round(time.perf_counter() - started, 1)
    parse_manifest(manifest_raw, where="new manifest")  # before the write: a bad manifest is not a full disk
    with safety.writing(folder / MANIFEST_NAME, folder):
        write_manifest(folder, manifest_raw, atomic=False)  # the folder is published whole
    # Again, now: the folder may have changed during the export (a file added, another bundle written).
    _check_out(out, options.overwrite, inputs)
    safety.publish(folder, out)
    size = sum(entry["size"] for entry in manifest_raw["files"].values())
    say(f"bundle written: {out} ({safety.human_bytes(size)}, {seconds_text(time.perf_counter() - started)})")
    return out
