"""Meta LLaMA + MU-LLaMA's trained deltas -> one llama.cpp GGUF (``general.architecture = llama``).

What goes in (docs/model.md sections 2-4, docs/llamacpp.md sections 2-3):

* base Meta matrices with the LoRA deltas merged in float32 (``W + L2 @ L1``, no scaling);
* the trained biases as the optional bias tensors llama.cpp's LLaMA graph loads (``blk.N.attn_q.bias``,
  ``attn_output.bias``, ``ffn_gate.bias`` (w1), ``ffn_down.bias`` (w2), ``ffn_up.bias`` (w3));
* the trained RMSNorm weights;
* Q/K unpermuted: Meta's interleaved RoPE *is* llama.cpp's "normal" rope (only HF checkpoints need the
  permutation);
* the SentencePiece vocabulary of ``tokenizer.model``;
* our own keys under ``mullama.*`` (:class:`MullamaKeys`): which layers receive the music injection.

What stays out: the per-head gates, the prefix queries and the adapter. The injection is added at run time
by the ``cb_eval`` hook (native_bridge), which needs the *unmerged* base ``wv``: take it from the checkpoint,
not from this file.

Memory: tensors are converted and written one at a time from the memory-mapped sources (GGUFWriter's
tensor-info-first API), so peak memory is about one float32 tensor plus its output copy. Source pages that
were read are handed back to the kernel (``MADV_PAGEOUT``) so a 13 GB shard does not pile up as resident
memory. The file is written under a temporary name in the output folder and renamed at the end
(:func:`mullama_sdk.files.atomic_path`): an error or interruption never leaves a partial file at ``out_path``.

CLI: ``python -m export.gguf_export CHECKPOINT LLAMA_DIR MERT_DIR OUT.gguf [--type f16] [--n-ctx 4096]``.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import logging
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from export.gguf_tensors import PlannedTensor, plan_tensors
from export.gguf_vocab import sentencepiece_vocab
from mullama_sdk.errors import BundleError, CheckpointError, ConfigError
from mullama_sdk.files import atomic_path
from training.reference.dims import LlamaParams

if TYPE_CHECKING:  # pragma: no cover
    import gguf

    from training.reference.model_sources import ModelSources

log = logging.getLogger(__name__)

__all__ = [
    "FILE_TYPES",
    "FORMAT_VERSION",
    "GgufReport",
    "GgufSource",
    "MullamaKeys",
    "write_gguf",
    "write_llama_gguf",
]

#: Version of our ``mullama.*`` metadata; bump when its meaning changes.
FORMAT_VERSION = 1
ARCH = "llama"
#: Output precisions of the converter (quantise afterwards with :mod:`export.quantize`).
FILE_TYPES = ("f32", "f16")


class MullamaKeys:
    """GGUF metadata keys of the ``mullama`` namespace (the standard ones come from ``gguf.Keys``)."""

    FORMAT_VERSION = "mullama.format_version"  #: uint32, :data:`FORMAT_VERSION`
    INJECT_LAYERS = "mullama.inject_layers"  #: int32 array: LLaMA layers that receive the music vector
    #: The same list as text ("12,13,...,31"): llama.cpp's ``llama_model_meta_val_str`` skips array
    #: values, so a runtime that reads metadata through llama.cpp (no gguf package) needs this form.
    INJECT_LAYERS_CSV = "mullama.inject_layers_csv"
    N_INJECT = "mullama.n_inject"  #: uint32, len(inject_layers)
    LORA_RANK = "mullama.lora_rank"  #: uint32, rank of the LoRA deltas merged into the matrices (0: none)


# --------------------------------------------------------------------------------------------- source
@dataclasses.dataclass(frozen=True)
class GgufSource:
    """What the converter reads: LLaMA dims, Meta-named tensors (still mmap'd), tokenizer, injection.

    Attributes:
        params: LLaMA dimensions.
        tensors: Meta-named LLaMA tensors: base matrices, biases, LoRA factors, norms, gates (gates are
            skipped). Read one at a time; never modified.
        tokenizer_path: SentencePiece ``tokenizer.model``.
        inject_layers: LLaMA layer ids that receive the music vector at run time.
        name: ``general.name`` of the GGUF.
    """

    params: LlamaParams
    tensors: Mapping[str, torch.Tensor]
    tokenizer_path: Path
    inject_layers: tuple[int, ...]
    name: str = "MU-LLaMA"

    @classmethod
    def from_model_sources(cls, sources: ModelSources) -> GgufSource:
        """The LLaMA part of :func:`training.reference.model_sources.open_sources`' result."""
        cfg = sources.config
        return cls(
            params=cfg.llama,
            tensors=sources.llama,
            tokenizer_path=Path(sources.tokenizer.path),
            inject_layers=tuple(cfg.injection.layer_ids(cfg.llama.n_layers)),
        )


@dataclasses.dataclass(frozen=True)
class GgufReport:
    """What :func:`write_gguf` wrote.

    Attributes:
        path: The GGUF file.
        file_type: ``"f32"`` or ``"f16"``.
        n_tensors: Tensors in the file.
        n_bytes: File size.
        seconds: Wall time of the conversion.
        n_lora_merged: Matrices that had a LoRA delta merged in.
        n_biases: Bias tensors written.
        n_skipped: Source tensors deliberately left out (gates: applied at run time).
        largest_tensor_bytes: Largest single tensor as float32 (the unit of the streaming memory bound).
        peak_rss_delta_bytes: Highest resident set size seen during the write minus the one at the start
            (includes file-backed pages of the mmap'd sources); ``None`` where ``/proc`` is unavailable.
        peak_anon_delta_bytes: Same for anonymous memory only (the real allocation cost); ``None`` likewise.
        inject_layers: Value of ``mullama.inject_layers``.
    """

    path: Path
    file_type: str
    n_tensors: int
    n_bytes: int
    seconds: float
    n_lora_merged: int
    n_biases: int
    n_skipped: int
    largest_tensor_bytes: int
    peak_rss_delta_bytes: int | None
    peak_anon_delta_bytes: int | None
    inject_layers: tuple[int, ...]


# ------------------------------------------------------------------------------------------ conversion
def _convert(src: GgufSource, item: PlannedTensor, out_dtype: np.dtype) -> np.ndarray:
    """One tensor, merged and cast; the only place data is read.

    Peak memory is one float32 copy when a LoRA is merged or F32 is written, else one output copy
    (bf16/fp16 -> f16 converts directly).
    """
    t = src.tensors[item.base_key]
    if item.lora is not None:
        w = t.to(torch.float32, copy=True)  # copy: never write into the (possibly shared) source
        l1 = src.tensors[item.lora[0]].to(torch.float32)
        l2 = src.tensors[item.lora[1]].to(torch.float32)
        w.addmm_(l2, l1)
    else:
        w = t
    # aminmax propagates NaN/inf and allocates nothing big (torch.isfinite is ~100x slower on CPU).
    lo, hi = (float(v) for v in torch.aminmax(w))
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise CheckpointError(f"{item.base_key} has non-finite values (after merging its LoRA, if any)")
    if w.dim() > 1 and out_dtype == np.float16:
        if max(-lo, hi) > float(np.finfo(np.float16).max):
            raise CheckpointError(f"{item.base_key} has values beyond float16's range ({lo}, {hi}); export as f32")
        out = w.to(torch.float16)
    else:
        out = w.to(torch.float32)
    del w
    return np.ascontiguousarray(out.numpy())


class _PageReleaser:
    """Advise the kernel to drop pages of memory-mapped source files once a tensor is converted.

    Pages of a file mapping that were only read are clean: ``MADV_PAGEOUT`` reclaims them without
    changing any value (they are read again from the file if touched). Anonymous memory is left alone, so
    this never pushes a caller's in-memory tensors to swap. Linux >= 5.4 only; a no-op elsewhere.
    """

    MADV_PAGEOUT = 21

    def __init__(self, enabled: bool) -> None:
        self._ranges: list[tuple[int, int]] = []
        self._madvise = None
        if not (enabled and sys.platform.startswith("linux")):
            return
        try:
            with open("/proc/self/maps") as f:
                for line in f:
                    parts = line.split(maxsplit=5)
                    if len(parts) == 6 and parts[5].startswith("/") and not parts[5].rstrip().endswith(
                            "(deleted)"):
                        lo, hi = (int(x, 16) for x in parts[0].split("-"))
                        self._ranges.append((lo, hi))
            libc = ctypes.CDLL(None, use_errno=True)
            self._madvise = libc.madvise
            self._madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            self._madvise.restype = ctypes.c_int
            self._page = os.sysconf("SC_PAGE_SIZE")
        except (OSError, AttributeError, ValueError):
            self._madvise = None

    def release(self, tensors: Iterable[torch.Tensor]) -> None:
        if self._madvise is None:
            return
        for t in tensors:
            start = t.data_ptr()
            end = start + t.numel() * t.element_size()
            for lo, hi in self._ranges:
                a, b = max(start, lo), min(end, hi)
                if a < b:
                    a -= a % self._page
                    b = min(hi, b + (-b) % self._page)
                    self._madvise(a, b - a, self.MADV_PAGEOUT)  # advisory: failure changes nothing


def _proc_status() -> tuple[int, int] | None:
    """(VmRSS, RssAnon) in bytes, or None without /proc."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["RssAnon"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def _check_output(out_path: Path) -> None:
    parent = out_path.parent
    if not parent.is_dir():
        raise BundleError(f"cannot write {out_path}: the folder {parent} does not exist (or is not a folder)")
    if out_path.is_dir():
        raise BundleError(f"cannot write {out_path}: it is a folder")


def write_gguf(
    sources: ModelSources,
    out_path: Path,
    *,
    file_type: str = "f32",
    n_ctx_train: int = 4096,
    release_source_pages: bool = True,
) -> GgufReport:
    """Convert the LLaMA part of a MU-LLaMA model (base + merged deltas) into a llama.cpp GGUF.

    Args:
        sources: From :func:`training.reference.model_sources.open_sources` (nothing is loaded in full).
        out_path: The ``.gguf`` to write; its folder must exist. An existing file is replaced only
            when the new one is complete.
        file_type: ``"f32"`` or ``"f16"`` for the matrices (1-D tensors are always F32). Quantise
            afterwards with :func:`export.quantize.quantize_gguf`.
        n_ctx_train: ``llama.context_length`` (LLaMA-2: 4096).
        release_source_pages: Hand pages of the mmap'd sources back to the kernel once read.

    Returns:
        A :class:`GgufReport`.

    Raises:
        ConfigError: unknown ``file_type`` or a bad ``n_ctx_train``.
        CheckpointError: a tensor with no GGUF name, a missing or misshapen tensor, non-finite values.
        BundleError: the output cannot be written (missing folder, permissions, disk full).
    """
    return write_llama_gguf(
        GgufSource.from_model_sources(sources), out_path, file_type=file_type, n_ctx_train=n_ctx_train,
        release_source_pages=release_source_pages,
    )


def write_llama_gguf(
    src: GgufSource,
    out_path: Path,
    *,
    file_type: str = "f32",
    n_ctx_train: int = 4096,
    release_source_pages: bool = True,
) -> GgufReport:
    """:func:`write_gguf` for a :class:`GgufSource` (e.g. a bare Meta LLaMA folder in benchmarks)."""
    import gguf

    if file_type not in FILE_TYPES:
        raise ConfigError(f"unknown GGUF file type {file_type!r}; valid: {', '.join(FILE_TYPES)}")
    if int(n_ctx_train) <= 0:
        raise ConfigError(f"n_ctx_train must be positive, got {n_ctx_train}")
    out_path = Path(out_path)
    _check_output(out_path)
    for layer in src.inject_layers:
        if not 0 <= layer < src.params.n_layers:
            raise ConfigError(f"inject layer {layer} outside 0..{src.params.n_layers - 1}")

    t0 = time.perf_counter()
    status0 = _proc_status()
    peak = status0
    planned, skipped = plan_tensors(src.params, src.tensors)
    vocab = sentencepiece_vocab(src.tokenizer_path)
    if len(vocab["tokens"]) != src.params.vocab_size:
        raise ConfigError(
            f"{src.tokenizer_path} has {len(vocab['tokens'])} pieces, the model vocab is {src.params.vocab_size}"
        )
    mat_dtype = np.dtype(np.float16 if file_type == "f16" else np.float32)
    lora_rank = next((src.tensors[it.lora[0]].shape[0] for it in planned if it.lora), 0)

    releaser = _PageReleaser(release_source_pages)
    try:
        with atomic_path(out_path) as tmp:  # removed on any error: never a partial file at out_path
            writer = gguf.GGUFWriter(str(tmp), arch=ARCH)
            try:
                _add_metadata(writer, src, vocab, file_type, int(n_ctx_train), lora_rank)
                for item in planned:
                    dt = mat_dtype if len(item.shape) > 1 else np.dtype(np.float32)
                    writer.add_tensor_info(item.gguf_name, item.shape, dt, int(np.prod(item.shape)) * dt.itemsize)
                writer.write_header_to_file()
                writer.write_kv_data_to_file()
                writer.write_ti_data_to_file()
                for item in planned:
                    arr = _convert(src, item, mat_dtype if len(item.shape) > 1 else np.dtype(np.float32))
                    writer.write_tensor_data(arr)
                    now = _proc_status()  # sampled while the converted copy is alive: the per-tensor peak
                    if now is not None and peak is not None:
                        peak = (max(peak[0], now[0]), max(peak[1], now[1]))
                    del arr
                    used = [src.tensors[item.base_key]] + [src.tensors[k] for k in item.lora or ()]
                    releaser.release(used)
            finally:
                writer.close()
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    except OSError as e:
        raise BundleError(f"cannot write {out_path}: {e}") from e

    n_bias = sum(1 for it in planned if it.gguf_name.endswith(".bias"))
    largest = max(int(np.prod(it.shape)) * 4 for it in planned)
    report = GgufReport(
        path=out_path,
        file_type=file_type,
        n_tensors=len(planned),
        n_bytes=out_path.stat().st_size,
        seconds=time.perf_counter() - t0,
        n_lora_merged=sum(1 for it in planned if it.lora),
        n_biases=n_bias,
        n_skipped=len(skipped),
        largest_tensor_bytes=largest,
        peak_rss_delta_bytes=None if status0 is None or peak is None else peak[0] - status0[0],
        peak_anon_delta_bytes=None if status0 is None or peak is None else peak[1] - status0[1],
        inject_layers=tuple(src.inject_layers),
    )
    log.info("wrote %s: %d tensors, %.1f MB, %.1f s", out_path, report.n_tensors, report.n_bytes / 1e6,
             report.seconds)
    return report


def _add_metadata(
    writer: gguf.GGUFWriter, src: GgufSource, vocab: Mapping[str, Any], file_type: str, n_ctx_train: int,
    lora_rank: int,
) -> None:
    import gguf

    p = src.params
    writer.add_name(src.name)
    writer.add_context_length(n_ctx_train)
    writer.add_embedding_length(p.dim)
    writer.add_block_count(p.n_layers)
    writer.add_feed_forward_length(p.hidden_dim)
    writer.add_head_count(p.n_heads)
    writer.add_head_count_kv(p.kv_heads)
    writer.add_layer_norm_rms_eps(p.norm_eps)
    writer.add_rope_freq_base(p.rope_theta)
    writer.add_rope_dimension_count(p.head_dim)
    writer.add_vocab_size(p.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if file_type == "f16" else gguf.LlamaFileType.ALL_F32)

    writer.add_tokenizer_model("llama")
    writer.add_token_list(vocab["tokens"])
    writer.add_token_scores(vocab["scores"])
    writer.add_token_types(vocab["types"])
    writer.add_bos_token_id(vocab["bos"])
    writer.add_eos_token_id(vocab["eos"])
    writer.add_unk_token_id(vocab["unk"])
    if vocab["pad"] is not None:
        writer.add_pad_token_id(vocab["pad"])
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(vocab["add_space_prefix"])

    writer.add_uint32(MullamaKeys.FORMAT_VERSION, FORMAT_VERSION)
    writer.add_array(MullamaKeys.INJECT_LAYERS, [int(i) for i in src.inject_layers])
    writer.add_string(MullamaKeys.INJECT_LAYERS_CSV, ",".join(str(int(i)) for i in src.inject_layers))
    writer.add_uint32(MullamaKeys.N_INJECT, len(src.inject_layers))
    writer.add_uint32(MullamaKeys.LORA_RANK, int(lora_rank))


# ----------------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    from training.reference.model_sources import open_sources

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("llama_dir", type=Path)
    ap.add_argument("mert_dir", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--type", choices=FILE_TYPES, default="f16")
    ap.add_argument("--n-ctx", type=int, default=4096)
    ap.add_argument("--trust-checkpoint", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    src = open_sources(args.checkpoint, args.llama_dir, args.mert_dir, trust_pickle=args.trust_checkpoint)
    r = write_gguf(src, args.out, file_type=args.type, n_ctx_train=args.n_ctx)
    print(f"{r.path}: {r.n_tensors} tensors, {r.n_bytes / 2**20:.1f} MiB, {r.seconds:.1f} s, "
          f"{r.n_lora_merged} LoRA merged, {r.n_biases} biases, inject layers {list(r.inject_layers)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
