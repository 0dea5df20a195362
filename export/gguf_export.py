"""Meta LLaMA + MU-LLaMA's trained deltas -> one llama.cpp GGUF (``general.architecture = llama``).

What goes in (spec sections 2-4, llamacpp_notes sections 2-3):

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
memory. The file is written under a temporary name in the output folder and renamed at the end: an error
or interruption never leaves a partial file at ``out_path``.

CLI: ``python -m export.gguf_export CHECKPOINT LLAMA_DIR MERT_DIR OUT.gguf [--type f16] [--n-ctx 4096]``.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import logging
import os
import re
import sys
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mullama_sdk.errors import BundleError, CheckpointError, ConfigError
from training.reference.dims import LlamaParams

if TYPE_CHECKING:  # pragma: no cover
    import gguf

    from training.reference.loading import ModelSources

log = logging.getLogger(__name__)

__all__ = [
    "FILE_TYPES",
    "FORMAT_VERSION",
    "GgufReport",
    "GgufSource",
    "MullamaKeys",
    "gguf_tensor_name",
    "sentencepiece_vocab",
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


# ----------------------------------------------------------------------------------------- tensor names
_GLOBAL_NAMES = {
    "tok_embeddings.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "output.weight": "output.weight",
}
# Meta name inside ``layers.N.`` -> GGUF name inside ``blk.N.``. Biases: the published finetune trains
# them on wq, wo, w1, w2, w3 only (spec section 2); wk/wv biases would be a different model.
_LAYER_NAMES = {
    "attention_norm.weight": "attn_norm.weight",
    "attention.wq.weight": "attn_q.weight",
    "attention.wk.weight": "attn_k.weight",
    "attention.wv.weight": "attn_v.weight",
    "attention.wo.weight": "attn_output.weight",
    "attention.wq.bias": "attn_q.bias",
    "attention.wo.bias": "attn_output.bias",
    "ffn_norm.weight": "ffn_norm.weight",
    "feed_forward.w1.weight": "ffn_gate.weight",
    "feed_forward.w2.weight": "ffn_down.weight",
    "feed_forward.w3.weight": "ffn_up.weight",
    "feed_forward.w1.bias": "ffn_gate.bias",
    "feed_forward.w2.bias": "ffn_down.bias",
    "feed_forward.w3.bias": "ffn_up.bias",
}
_REQUIRED_LAYER = tuple(v for k, v in _LAYER_NAMES.items() if k.endswith(".weight"))
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_LORA_RE = re.compile(r"^(attention|feed_forward)\.lora_(w[a-z0-9]+)_l([12])\.weight$")
_RUNTIME_ONLY_RE = re.compile(r"^attention\.gate$")


def gguf_tensor_name(meta_name: str) -> str:
    """The GGUF tensor name llama.cpp's LLaMA architecture loads for a Meta-layout LLaMA tensor.

    Args:
        meta_name: e.g. ``layers.3.feed_forward.w2.bias`` or ``tok_embeddings.weight``.

    Returns:
        e.g. ``blk.3.ffn_down.bias`` or ``token_embd.weight``.

    Raises:
        CheckpointError: for any name that has no GGUF counterpart (LoRA factors and gates included:
            they are merged or left out by the caller, never written under a name).
    """
    if meta_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[meta_name]
    m = _LAYER_RE.match(meta_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"blk.{int(m.group(1))}.{_LAYER_NAMES[m.group(2)]}"
    raise CheckpointError(
        f"no GGUF name for LLaMA tensor {meta_name!r}; known: {sorted(_GLOBAL_NAMES)} and "
        f"layers.N.{{{', '.join(sorted(_LAYER_NAMES))}}}"
    )


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
        """The LLaMA part of :func:`training.reference.loading.open_sources`' result."""
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


@dataclasses.dataclass(frozen=True)
class _Planned:
    """One output tensor: where it comes from and what it becomes."""

    gguf_name: str
    base_key: str
    lora: tuple[str, str] | None  # (l1, l2) keys
    shape: tuple[int, ...]  # Meta/PyTorch (out, in) order; the writer reverses it into ggml's ne


# ------------------------------------------------------------------------------------------- tokenizer
def sentencepiece_vocab(path: Path) -> dict[str, Any]:
    """Read a SentencePiece model into the GGUF tokenizer fields (``tokenizer.ggml.*``).

    Token types come from ``is_unknown / is_control / is_byte / is_unused`` (plus ``USER_DEFINED`` from
    the model proto), which number like ``gguf.TokenType``.

    Returns:
        ``{"tokens", "scores", "types", "bos", "eos", "unk", "pad", "add_space_prefix"}``
        (``pad`` is ``None`` when the model has none).

    Raises:
        ConfigError: unreadable model.
    """
    import gguf
    import sentencepiece as spm

    path = Path(path)
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (OSError, RuntimeError) as e:
        raise ConfigError(f"{path} is not a SentencePiece model: {e}") from e
    user_defined: set[int] = set()
    add_space_prefix = True
    try:
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(path.read_bytes())
        ud = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
        user_defined = {i for i, p in enumerate(proto.pieces) if p.type == ud}
        add_space_prefix = bool(proto.normalizer_spec.add_dummy_prefix)
    except ImportError:  # protobuf missing: user-defined pieces become NORMAL, prefix stays the default
        log.warning("protobuf unavailable: cannot read user-defined pieces / add_dummy_prefix of %s", path)

    tokens, scores, types = [], [], []
    for i in range(sp.GetPieceSize()):
        tokens.append(sp.IdToPiece(i))
        scores.append(float(sp.GetScore(i)))
        if sp.IsUnknown(i):
            t = gguf.TokenType.UNKNOWN
        elif sp.IsControl(i):
            t = gguf.TokenType.CONTROL
        elif sp.IsByte(i):
            t = gguf.TokenType.BYTE
        elif sp.IsUnused(i):
            t = gguf.TokenType.UNUSED
        elif i in user_defined:
            t = gguf.TokenType.USER_DEFINED
        else:
            t = gguf.TokenType.NORMAL
        types.append(int(t))
    pad = sp.pad_id()
    return {
        "tokens": tokens, "scores": scores, "types": types, "bos": sp.bos_id(), "eos": sp.eos_id(),
        "unk": sp.unk_id(), "pad": pad if pad >= 0 else None, "add_space_prefix": add_space_prefix,
    }


# --------------------------------------------------------------------------------------------- planning
def _expected_shape(gguf_suffix: str, p: LlamaParams) -> tuple[int, ...]:
    q, kv, ff, d = p.n_heads * p.head_dim, p.kv_heads * p.head_dim, p.hidden_dim, p.dim
    return {
        "attn_norm.weight": (d,), "ffn_norm.weight": (d,),
        "attn_q.weight": (q, d), "attn_k.weight": (kv, d), "attn_v.weight": (kv, d), "attn_output.weight": (d, q),
        "ffn_gate.weight": (ff, d), "ffn_up.weight": (ff, d), "ffn_down.weight": (d, ff),
        "attn_q.bias": (q,), "attn_output.bias": (d,), "ffn_gate.bias": (ff,), "ffn_up.bias": (ff,),
        "ffn_down.bias": (d,),
        "token_embd.weight": (p.vocab_size, d), "output.weight": (p.vocab_size, d), "output_norm.weight": (d,),
    }[gguf_suffix]


def _plan(src: GgufSource) -> tuple[list[_Planned], list[str]]:
    """Every output tensor in file order, and the source keys left out on purpose. Reads no data."""
    p = src.params
    by_name: dict[str, str] = {}  # gguf name -> base key
    lora: dict[str, dict[str, str]] = {}  # base key -> {"1": key, "2": key}
    skipped: list[str] = []
    for key in src.tensors:
        m = _LAYER_RE.match(key)
        if m:
            layer, rest = int(m.group(1)), m.group(2)
            if layer >= p.n_layers:
                raise CheckpointError(f"{key}: layer {layer} beyond n_layers={p.n_layers}")
            if _RUNTIME_ONLY_RE.match(rest):
                skipped.append(key)
                continue
            lm = _LORA_RE.match(rest)
            if lm:
                base = f"layers.{layer}.{lm.group(1)}.{lm.group(2)}.weight"
                gguf_tensor_name(base)  # raises for a LoRA on something we do not know
                lora.setdefault(base, {})[lm.group(3)] = key
                continue
        by_name[gguf_tensor_name(key)] = key

    required = [f"blk.{i}.{s}" for i in range(p.n_layers) for s in _REQUIRED_LAYER]
    required += list(_GLOBAL_NAMES.values())
    missing = [n for n in required if n not in by_name]
    if missing:
        raise CheckpointError(f"LLaMA tensors missing for GGUF names {missing[:10]} ({len(missing)} in all)")

    planned = []
    for name in sorted(by_name, key=_file_order):
        key = by_name[name]
        t = src.tensors[key]
        suffix = name.split(".", 2)[-1] if name.startswith("blk.") else name
        want = _expected_shape(suffix, p)
        if tuple(t.shape) != want:
            raise CheckpointError(f"{key} has shape {list(t.shape)}, expected {list(want)} for {p}")
        pair = lora.pop(key, None)
        lora_keys = None
        if pair is not None:
            if set(pair) != {"1", "2"}:
                raise CheckpointError(f"LoRA of {key} is incomplete: only {sorted(pair.values())}")
            l1, l2 = src.tensors[pair["1"]], src.tensors[pair["2"]]
            if l1.dim() != 2 or l2.dim() != 2 or l1.shape[0] != l2.shape[1] or \
                    (l2.shape[0], l1.shape[1]) != tuple(t.shape):
                raise CheckpointError(
                    f"LoRA of {key} ({list(t.shape)}) has factors l1 {list(l1.shape)}, l2 {list(l2.shape)}; "
                    "expected l1 (rank, in) and l2 (out, rank)"
                )
            lora_keys = (pair["1"], pair["2"])
        planned.append(_Planned(name, key, lora_keys, want))
    if lora:  # LoRA on a matrix that is not there (cannot happen with a complete base, kept as a guard)
        raise CheckpointError(f"LoRA factors without a base matrix: {sorted(lora)[:10]}")
    return planned, skipped


def _file_order(name: str) -> tuple[int, int, str]:
    """token_embd first, then blocks by layer, then output_norm and output (as llama.cpp's converter)."""
    if name == "token_embd.weight":
        return (0, 0, name)
    if name.startswith("blk."):
        return (1, int(name.split(".")[1]), name)
    return (2, 0 if name == "output_norm.weight" else 1, name)


# ------------------------------------------------------------------------------------------ conversion
def _convert(src: GgufSource, item: _Planned, out_dtype: np.dtype) -> np.ndarray:
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
        sources: From :func:`training.reference.loading.open_sources` (nothing is loaded in full).
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
    planned, skipped = _plan(src)
    vocab = sentencepiece_vocab(src.tokenizer_path)
    if len(vocab["tokens"]) != src.params.vocab_size:
        raise ConfigError(
            f"{src.tokenizer_path} has {len(vocab['tokens'])} pieces, the model vocab is {src.params.vocab_size}"
        )
    mat_dtype = np.dtype(np.float16 if file_type == "f16" else np.float32)
    lora_rank = next((src.tensors[it.lora[0]].shape[0] for it in planned if it.lora), 0)

    tmp = out_path.with_name(f".{out_path.name}.{uuid.uuid4().hex[:8]}.partial")
    writer = gguf.GGUFWriter(str(tmp), arch=ARCH)
    _add_metadata(writer, src, vocab, file_type, int(n_ctx_train), lora_rank)
    for item in planned:
        dt = mat_dtype if len(item.shape) > 1 else np.dtype(np.float32)
        writer.add_tensor_info(item.gguf_name, item.shape, dt, int(np.prod(item.shape)) * dt.itemsize)

    releaser = _PageReleaser(release_source_pages)
    try:
        try:
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
            writer.close()
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, out_path)
        except OSError as e:
            raise BundleError(f"cannot write {out_path}: {e}") from e
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise

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
    from training.reference.loading import open_sources

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
