"""How big a model and its export are, from the config alone: parameter counts, the rules that depend
on them (the base GGUF type, the automatic llama.cpp check, the music export's child process) and the disk
space an export needs.

One place for these rules, so that :func:`export.build.build_bundle` and the benchmarks' hand-assembled
bundles (``bench.assets``) cannot drift apart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

from mullama_sdk.errors import DiskFullError
from mullama_sdk.manifest import ENCODER_PRECISIONS, LLM_QUANTS

#: Models up to this many LLaMA parameters get their GGUFs checked against the torch reference
#: during the export (the reference must fit in memory in float32 next to llama.cpp).
AUTO_VERIFY_LLM_MAX_PARAMS = 1_500_000_000

#: Music models (MERT + adapter) above this many parameters are exported in a child process by default
#: (:attr:`export.build.BundleOptions.isolate_music_export`). Measured at real widths (MERT-330M shape + the
#: 7B adapter, 4 LLaMA layers): the ONNX part of the export peaked at 15.4 GB in one process, 14.4 GB when the
#: model was merely deleted before quantizing (the exporter keeps graph modules referenced, and the touched
#: checkpoint pages stay mapped); with the child: 8.0 GB in the child, 9.0 GB in the parent (int8 quantization
#: of the 2.7 GB adapter), identical files. (That model's automatic llama.cpp check then peaks at 12.8 GB: the
#: whole float32 torch model beside an f32 GGUF; a 7B model skips it, see AUTO_VERIFY_LLM_MAX_PARAMS.)
ISOLATE_MUSIC_EXPORT_PARAMS = 200_000_000


def music_params(cfg) -> int:
    """MERT + adapter parameters, from the config (HuBERT layers ~12 d^2, SwiGLU blocks 3 d h)."""
    a = cfg.adapter
    mert = (a.n_states - 1) * 12 * a.mert_dim * a.mert_dim
    return mert + a.mert_dim * a.dim + a.n_blocks * 3 * a.dim * a.block_hidden


def llama_params(cfg) -> int:
    """LLaMA parameters, from the config (attention with grouped KV heads, SwiGLU, embeddings and output)."""
    p = cfg.llama
    per_layer = 2 * p.dim * p.dim + 2 * p.dim * p.kv_heads * p.head_dim + 3 * p.dim * p.hidden_dim
    return p.n_layers * per_layer + 2 * p.vocab_size * p.dim


def base_gguf_type(cfg, quants: Sequence[str]) -> str:
    """The GGUF written from the checkpoint, which the other types are quantized from: ``f32`` when it is
    shipped or the model is below the automatic-verification size (the f32 rows are the exactness claim),
    else ``f16`` (half the disk at 7B)."""
    return "f32" if "f32" in quants or llama_params(cfg) < AUTO_VERIFY_LLM_MAX_PARAMS else "f16"


def verify_llm_by_default(cfg) -> bool:
    """Whether an export checks its GGUFs against the torch reference when not told
    (:attr:`export.build.BundleOptions.verify_llm` is ``None``)."""
    return llama_params(cfg) <= AUTO_VERIFY_LLM_MAX_PARAMS


def isolate_music_by_default(cfg) -> bool:
    """Whether the music export runs in a child process when not told (see :data:`ISOLATE_MUSIC_EXPORT_PARAMS`)."""
    return music_params(cfg) > ISOLATE_MUSIC_EXPORT_PARAMS


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


def estimate_space(cfg, options) -> SpaceEstimate:
    """How much disk an export of ``cfg`` with ``options`` (:class:`export.build.BundleOptions`) takes, while
    it runs and when done.

    At LLaMA-2-7B widths with the defaults (q4_k_m; fp32 + int8): about 25 GB while running (the f16 base
    GGUF alone is 13.5 GB), about 10 GB for the bundle.
    """
    music, llama = music_params(cfg), llama_params(cfg)  # (MERT's 4M-parameter front end: in the margin)
    files = {k: int(music * b) for k, b in _BYTES_PER_PARAM.items() if k in ENCODER_PRECISIONS}
    files.update({k: int(llama * b) for k, b in _BYTES_PER_PARAM.items() if k in LLM_QUANTS})
    base_type = base_gguf_type(cfg, options.quants)
    onnx = files["fp32"] + sum(files[p] for p in options.encoder_precisions if p != "fp32")
    # int8 quantization stages a copy of each graph before saving it.
    onnx_transient = 2 * files["int8"] if "int8" in options.encoder_precisions else 0
    gguf = files[base_type] + sum(files[q] for q in options.quants if q != base_type)
    peak = onnx + max(onnx_transient, gguf)
    final = (sum(files[p] for p in options.encoder_precisions) + sum(files[q] for q in options.quants))
    margin = lambda n: int(n * 1.05) + (32 << 20)
    return SpaceEstimate(margin(peak), final, files)


def check_space(parent: Path, space: SpaceEstimate, say: Callable[[str], None]) -> None:
    """Refuse to start an export that cannot finish for lack of space in ``parent``; report the figures.

    Raises:
        DiskFullError: less free space than :attr:`SpaceEstimate.peak` (nothing is written).
    """
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
