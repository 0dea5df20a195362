"""Quantise a GGUF with llama.cpp's own quantiser (``llama_model_quantize`` via llama-cpp-python).

K-quants (``q4_k_m``) pack rows in super-blocks of 256 values: a matrix whose row length (ggml ``ne[0]``:
the input width, ``n_embd`` for most matrices and ``n_ff`` for ``ffn_down``) is not a multiple of 256
cannot use them, and llama.cpp silently falls back to another type for that tensor (Q4_K -> Q5_0,
Q6_K -> Q8_0). Real LLaMA-2-7B widths (4096, 11008) are fine; the tiny test models (64, 192) are not.
:func:`quantize_gguf` predicts this from the tensor shapes before quantising, warns, and reports the types
actually written (read back with ``gguf.GGUFReader``).

All metadata (including our ``mullama.*`` keys) is copied by llama.cpp into the output.

CLI: ``python -m export.quantize SRC.gguf DST.gguf q4_k_m [--threads N]``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import dataclasses
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from mullama_sdk.errors import BundleError, ConfigError
from mullama_sdk.files import atomic_path

log = logging.getLogger(__name__)

__all__ = ["K_QUANT_BLOCK", "QUANTS", "QuantReport", "k_quant_incompatible", "quantize_gguf", "tensor_types"]

#: Values per K-quant super-block (ggml's ``QK_K``): rows must be a multiple of this.
K_QUANT_BLOCK = 256


@dataclasses.dataclass(frozen=True)
class _Quant:
    ftype: int  # enum llama_ftype (llama.h)
    k_quant: bool


#: Quantisation names accepted by :func:`quantize_gguf` -> llama.cpp ``llama_ftype``.
QUANTS: dict[str, _Quant] = {
    "f32": _Quant(0, False),  # LLAMA_FTYPE_ALL_F32
    "f16": _Quant(1, False),  # LLAMA_FTYPE_MOSTLY_F16
    "q8_0": _Quant(7, False),  # LLAMA_FTYPE_MOSTLY_Q8_0
    "q4_k_m": _Quant(15, True),  # LLAMA_FTYPE_MOSTLY_Q4_K_M
}


@dataclasses.dataclass(frozen=True)
class QuantReport:
    """What :func:`quantize_gguf` wrote.

    Attributes:
        src: Input GGUF.
        dst: Output GGUF.
        quant: The quantisation name asked for.
        seconds: Wall time.
        src_bytes: Input size.
        n_bytes: Output size.
        tensor_types: Histogram of the output's tensor types, e.g. ``{"Q4_K": 193, "Q6_K": 33, "F32": 65}``.
        k_quant_fallback: True when some matrices cannot take the requested K-quant (rows not a multiple
            of 256) and llama.cpp used another type for them.
        fallback_tensors: Names of those matrices.
        warnings: Human-readable notes (the fallback explanation, if any).
    """

    src: Path
    dst: Path
    quant: str
    seconds: float
    src_bytes: int
    n_bytes: int
    tensor_types: dict[str, int]
    k_quant_fallback: bool
    fallback_tensors: tuple[str, ...]
    warnings: tuple[str, ...]


def _reader(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, OSError) as e:
        raise BundleError(f"{path} is not a readable GGUF file: {e}") from e


def tensor_types(path: Path) -> dict[str, int]:
    """Histogram ``{ggml type name: tensor count}`` of a GGUF file."""
    counts = collections.Counter(t.tensor_type.name for t in _reader(Path(path)).tensors)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def k_quant_incompatible(path: Path) -> tuple[list[str], dict[str, int]]:
    """Matrices of a GGUF whose row length is not a multiple of :data:`K_QUANT_BLOCK`.

    Returns:
        (tensor names, ``{"n_embd": ..., "n_ff": ...}`` as the file's metadata states them).
    """
    reader = _reader(Path(path))
    arch_field = reader.get_field("general.architecture")
    arch = arch_field.contents() if arch_field is not None else "llama"
    dims = {}
    for short, key in (("n_embd", f"{arch}.embedding_length"), ("n_ff", f"{arch}.feed_forward_length")):
        field = reader.get_field(key)
        if field is not None:
            dims[short] = int(field.contents())
    names = [t.name for t in reader.tensors if len(t.shape) >= 2 and int(t.shape[0]) % K_QUANT_BLOCK]
    return names, dims


def quantize_gguf(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    quant: str,
    nthread: int | None = None,
) -> QuantReport:
    """Quantise ``src`` into ``dst`` with llama.cpp.

    Args:
        src: An F32/F16 GGUF (e.g. from :func:`export.gguf_export.write_gguf`).
        dst: Output path; its folder must exist. Written under a temporary name and renamed when
            complete, so a failure never leaves a partial ``dst``.
        quant: One of :data:`QUANTS` (``"q8_0"``, ``"q4_k_m"``, ``"f16"``, ``"f32"``).
        nthread: Quantiser threads; ``None``: all cores.

    Returns:
        A :class:`QuantReport` (types actually written, K-quant fallback).

    Raises:
        ConfigError: unknown ``quant`` (the message lists the valid ones) or a bad ``nthread``.
        BundleError: ``src`` missing or not a GGUF, ``dst`` not writable, or llama.cpp's quantiser failed.
    """
    import llama_cpp

    from export.safety import disk_full_error, is_disk_full
    from mullama_sdk.llm import route_llama_logs

    key = str(quant).lower()
    if key not in QUANTS:
        raise ConfigError(f"unknown quantisation {quant!r}; valid: {', '.join(QUANTS)}")
    if nthread is not None and int(nthread) < 1:
        raise ConfigError(f"nthread must be >= 1 (or None for all cores), got {nthread}")
    spec = QUANTS[key]
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise BundleError(f"GGUF to quantise not found: {src}")
    if not dst.parent.is_dir():
        raise BundleError(f"cannot write {dst}: the folder {dst.parent} does not exist (or is not a folder)")
    if dst.is_dir():
        raise BundleError(f"cannot write {dst}: it is a folder")

    warnings: list[str] = []
    fallback: list[str] = []
    if spec.k_quant:
        fallback, dims = k_quant_incompatible(src)
        if fallback:
            msg = (
                f"{quant}: {len(fallback)} matrices have rows that are not a multiple of {K_QUANT_BLOCK} "
                f"({', '.join(f'{k}={v}' for k, v in dims.items())}), so llama.cpp cannot store them as "
                f"K-quants and falls back to other types for them (Q4_K -> Q5_0, Q6_K -> Q8_0); "
                f"e.g. {fallback[:3]}. Real LLaMA-2 widths (4096 / 11008) are not affected."
            )
            log.warning("%s", msg)
            warnings.append(msg)

    route_llama_logs()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = spec.ftype
    params.nthread = 0 if nthread is None else int(nthread)  # 0: llama.cpp uses hardware_concurrency
    with contextlib.ExitStack() as staging:
        try:  # removed on any error: never a partial file at dst
            tmp = staging.enter_context(atomic_path(dst))
        except OSError as e:  # fail early, with a clear message, if the folder is not writable
            if is_disk_full(e, dst.parent):
                raise disk_full_error(dst, dst.parent) from e
            raise BundleError(f"cannot write {dst}: {e}") from e
        t0 = time.perf_counter()
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0 and is_disk_full(None, tmp.parent):  # checked before the partial output is removed
            raise disk_full_error(dst, tmp.parent)
        if rc != 0:
            raise BundleError(
                f"llama.cpp's quantiser failed (return code {rc}) for {src} -> {quant}; its log (logger "
                f"'llama_cpp.native') says why (e.g. an already quantised input)"
            )
        seconds = time.perf_counter() - t0
        types = tensor_types(tmp)

    report = QuantReport(
        src=src, dst=dst, quant=key, seconds=seconds, src_bytes=src.stat().st_size, n_bytes=dst.stat().st_size,
        tensor_types=types, k_quant_fallback=bool(fallback), fallback_tensors=tuple(fallback),
        warnings=tuple(warnings),
    )
    log.info("quantised %s -> %s (%s) in %.1f s: %s", src, dst, key, seconds, types)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("quant", choices=list(QUANTS))
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    r = quantize_gguf(args.src, args.dst, args.quant, args.threads)
    print(f"{r.dst}: {r.n_bytes / 2**20:.1f} MiB ({r.src_bytes / r.n_bytes:.2f}x smaller) in {r.seconds:.1f} s; "
          f"types {r.tensor_types}" + ("; K-quant fallback for the tiny dims" if r.k_quant_fallback else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
