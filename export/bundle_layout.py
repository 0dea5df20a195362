"""What a bundle folder holds and how ``mullama.json`` describes it: the file names of each variant, the
manifest built from the sources and the files on disk, and the defaults moved off variants that failed.

:func:`export.build.build_bundle` writes bundles through these functions, and so do the benchmarks'
step-by-step bundles (``bench.assets``), so both describe their files the same way.
"""

from __future__ import annotations

import logging
import os
import time
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
from mullama_sdk.errors import BundleError, ConfigError
from mullama_sdk.files import sha256_file
from mullama_sdk.manifest import BUNDLE_FORMAT, BUNDLE_FORMAT_VERSION, MANIFEST_NAME, int8_manifest_entry
from mullama_sdk.prompt import DEFAULT_QUESTION, PROMPT_TEMPLATE

log = logging.getLogger(__name__)

#: Cache of file digests across the manifests of one export: name -> (size, mtime_ns, sha256).
Digests = dict[str, tuple[int, int, str]]


def onnx_file(graph: str, precision: str) -> str:
    """``encoder.int8.onnx`` etc.: the bundle's name of one ONNX graph variant."""
    return f"{graph}.{precision}.onnx"


def gguf_file(quant: str) -> str:
    """``llm.q4_k_m.gguf`` etc.: the bundle's name of one GGUF type."""
    return f"llm.{quant}.gguf"


def default_encoder_precision(options) -> str:
    """The runtime's default ONNX variant: the one asked for, else ``int8`` when shipped (CPU), else the first."""
    return options.default_encoder_precision or (
        "int8" if "int8" in options.encoder_precisions else options.encoder_precisions[0])


def source_date_epoch() -> int | None:
    """``SOURCE_DATE_EPOCH`` (the reproducible-builds convention): when set, the manifest's ``created`` is
    that time and no export duration is recorded, so the same inputs give a byte-identical bundle."""
    raw = os.environ.get("SOURCE_DATE_EPOCH")
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError as e:
        raise ConfigError(f"SOURCE_DATE_EPOCH={raw!r} is not an integer (seconds since 1970)") from e


def tool_versions() -> dict[str, str]:
    """Versions of the packages that made the files (and the ONNX opset), recorded in the manifest."""
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


def file_table(folder: Path, digests: Digests) -> dict[str, dict[str, Any]]:
    """The manifest's ``files``: size and sha256 of every file of ``folder`` but the manifest and hidden files.

    ``digests`` caches (size, mtime_ns, sha256) per file so that an unchanged file (a 7B GGUF takes tens of
    seconds) is hashed once across the interim and the final manifest.
    """
    files = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name != MANIFEST_NAME and not path.name.startswith("."):  # not the owner file
            st = path.stat()
            cached = digests.get(path.name)
            if cached is None or cached[:2] != (st.st_size, st.st_mtime_ns):
                cached = digests[path.name] = (st.st_size, st.st_mtime_ns, sha256_file(path))
            files[path.name] = {"size": st.st_size, "sha256": cached[2]}
    return files


def bundle_manifest(src, options, notes: list[str], folder: Path, digests: Digests | None = None) -> dict[str, Any]:
    """The manifest dict of the files now in ``folder`` (the manifest stage of :func:`export.build.build_bundle`).

    Args:
        src: The opened sources (:func:`training.reference.model_sources.open_sources`): config, tokenizer, checkpoint.
        options: :class:`export.build.BundleOptions`; its variants are named by :func:`onnx_file` and
            :func:`gguf_file` (GGUF types not in ``folder`` are left out).
        notes: The manifest's ``notes`` (the list itself is stored).
        digests: See :func:`file_table`; ``None`` hashes every file.
    """
    files = file_table(folder, {} if digests is None else digests)
    cfg = src.config
    p = cfg.llama
    llms = {q: gguf_file(q) for q in options.quants}
    return {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(source_date_epoch())),
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
        "encoder": {k: onnx_file("encoder", k) for k in options.encoder_precisions},
        "adapter": {k: onnx_file("adapter", k) for k in options.encoder_precisions},
        "llm": {k: v for k, v in llms.items() if (folder / v).exists()},
        "default_encoder_precision": default_encoder_precision(options),
        "default_quant": options.quants[0],
        **({"quantization": {"int8": int8_manifest_entry()}} if "int8" in options.encoder_precisions else {}),
        "files": files,
        "versions": tool_versions(),
        "verification": {},
        "notes": notes,
    }


def drop_intermediates(folder: Path, options, base_type: str) -> None:
    """Remove the files that were needed to build the variants but were not asked for: the base GGUF
    (:func:`export.sizes.base_gguf_type`) and the float32 graphs the other precisions were made from."""
    if base_type not in options.quants:
        (folder / gguf_file(base_type)).unlink(missing_ok=True)
    if "fp32" not in options.encoder_precisions:
        for stale in folder.glob("*.fp32.onnx*"):
            stale.unlink()


def demote_failed(manifest_raw: dict[str, Any], failed: list[str], options) -> None:
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
