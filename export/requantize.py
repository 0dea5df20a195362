"""Re-quantize a bundle's int8 graphs from its own fp32 graphs: no checkpoint, no torch, minutes not hours.

Bundles made before int8 weights were limited to [-64, 64] (:data:`mullama_sdk.cpu.LEGACY_INT8_SCHEME`)
give wrong music vectors on CPUs without VNNI (see :mod:`mullama_sdk.cpu`); the runtime then falls back to
fp32. ``mullama-export requantize BUNDLE`` fixes such a bundle in place:

1. the manifest is read and the fp32 graphs are checked against their sha256 (they are the source);
2. a sibling folder gets hard links of every other file and new int8 graphs (:func:`quantize_int8`);
3. each new int8 graph is compared with the bundle's fp32 graph on the synthetic check clips (the rows
   ``encoder/int8`` and ``adapter/int8``, same tolerances as an export, plus the weight range);
4. the manifest records the scheme, the new files' hashes and rows, and a note; then the folder replaces
   the old bundle in one exchange (:func:`export.safety.publish`). A failure anywhere leaves the
   old bundle as it was.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from mullama_sdk.bundle_files import check_files, safe_member
from mullama_sdk.cpu import INT8_SCHEME
from mullama_sdk.errors import BundleError
from mullama_sdk.manifest import (
    MANIFEST_NAME,
    STATE_MEANS,
    WAVEFORM,
    FileEntry,
    int8_manifest_entry,
    load_manifest,
    write_manifest,
)

log = logging.getLogger(__name__)

__all__ = ["RequantizeResult", "requantize_bundle"]


@dataclasses.dataclass(frozen=True)
class RequantizeResult:
    """What :func:`requantize_bundle` did.

    Attributes:
        bundle: The bundle folder.
        old_scheme: The int8 scheme before (``None``: the bundle had no int8 graphs).
        scheme: The scheme now.
        changed: False when the bundle already had the current scheme (nothing was written).
        checks: The new verification rows (``encoder/int8``, ``adapter/int8``).
        seconds: Wall time.
    """

    bundle: Path
    old_scheme: str | None
    scheme: str
    changed: bool
    checks: tuple = ()
    seconds: float = 0.0


def _int8_files(manifest) -> set[str]:
    """The int8 graphs and their external-data files (``<graph>.data``)."""
    names = {manifest.encoder["int8"], manifest.adapter["int8"]}
    return names | {f"{n}.data" for n in names}


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links
        shutil.copy2(src, dst)


def requantize_bundle(bundle: Path, *, force: bool = False, strict: bool = True, threads: int | None = None,
                      progress: Callable[[str], None] | None = None) -> RequantizeResult:
    """Re-quantize the int8 graphs of ``bundle`` with the current scheme (see the module docstring).

    Args:
        bundle: A bundle folder with fp32 and int8 graphs.
        force: Re-quantize even when the bundle already has the current scheme.
        strict: Refuse (and leave the bundle untouched) when a new row fails its tolerance.
        threads: ONNX Runtime threads of the comparison.
        progress: Called with a short line per step.

    Raises:
        BundleError: not a bundle, no fp32 or no int8 graphs to replace, a damaged fp32 graph, a failed
            comparison (with ``strict``), or the folder cannot be written.
    """
    from export.onnx_compare import compare_onnx, run_graph
    from export.onnx_precision import quantize_int8
    from export.safety import make_partial, publish
    from export.verify import check_windows, failed_rows, onnx_row

    say = progress or (lambda msg: log.info("%s", msg))
    t0 = time.perf_counter()
    bundle = Path(bundle)
    manifest = load_manifest(bundle)
    old_scheme = manifest.int8_scheme
    for graph in ("encoder", "adapter"):
        variants = getattr(manifest, graph)
        if "fp32" not in variants:
            raise BundleError(f"{bundle} ships no fp32 {graph} graph to quantize from; re-export it with "
                              f"`mullama-export bundle` (int8 needs the fp32 graphs as its source)")
        if "int8" not in variants:
            raise BundleError(f"{bundle} ships no int8 {graph} graph; nothing to re-quantize (add int8 with "
                              f"`mullama-export bundle --encoder-precision fp32 int8`)")
    if old_scheme == INT8_SCHEME and not force:
        say(f"{bundle}: int8 graphs already use {INT8_SCHEME}; nothing to do (--force re-quantizes anyway)")
        return RequantizeResult(bundle, old_scheme, INT8_SCHEME, False, seconds=time.perf_counter() - t0)
    say("check: fp32 graphs against their sha256")
    sources = [manifest.encoder["fp32"], manifest.adapter["fp32"]]
    check_files(bundle, manifest, [n for n in manifest.files if n.removesuffix(".data") in sources], sha256=True)

    replaced = _int8_files(manifest)
    # Marked with its owner: a killed run's folder is recognised and swept by the next export.
    stage = make_partial(bundle, bundle.parent)
    try:
        shutil.copytree(bundle, stage, copy_function=_link_or_copy, dirs_exist_ok=True,
                        ignore=lambda _d, names: [n for n in names if n in replaced or n == MANIFEST_NAME])
        for graph in ("encoder", "adapter"):
            say(f"onnx: {graph} int8 ({INT8_SCHEME})")
            src = safe_member(stage, getattr(manifest, graph)["fp32"])
            quantize_int8(src, stage / getattr(manifest, graph)["int8"])

        say("verify: int8 graphs vs the bundle's fp32 graphs")
        windows = check_windows(min_samples=manifest.min_window_samples)
        enc32, enc8 = stage / manifest.encoder["fp32"], stage / manifest.encoder["int8"]
        ad32, ad8 = stage / manifest.adapter["fp32"], stage / manifest.adapter["int8"]
        feeds = [{WAVEFORM: w[None]} for w in windows]
        enc_ref = run_graph(enc32, feeds, threads=threads)  # also the adapter's inputs
        enc_report = compare_onnx(enc32, enc8, feeds, threads=threads, reference=enc_ref)
        ad_report = compare_onnx(ad32, ad8, [{STATE_MEANS: r[STATE_MEANS]} for r in enc_ref], threads=threads)
        checks = tuple(
            dataclasses.replace(row, note=f"{row.note} vs the bundle's fp32 graphs (re-quantized)")
            for row in (onnx_row("encoder", "int8", enc_report, enc8), onnx_row("adapter", "int8", ad_report, ad8))
        )
        failed = failed_rows(checks)
        if failed and strict:
            raise BundleError(f"re-quantized {', '.join(failed)} failed verification ("
                              + "; ".join(f"{c.name}: min cos {c.min_cosine}, needs {c.tolerance}" for c in checks)
                              + f"); {bundle} was left as it was")

        raw = json.loads(json.dumps(manifest.raw))  # a deep copy of what the file says
        files = {k: v for k, v in raw["files"].items() if k not in replaced}
        for name in sorted(replaced):
            path = stage / name
            if path.is_file():
                files[name] = FileEntry.of(path).to_dict()
        raw["files"] = dict(sorted(files.items()))
        raw.setdefault("quantization", {})["int8"] = int8_manifest_entry(INT8_SCHEME)
        raw.setdefault("verification", {}).update({c.name: c.to_dict() for c in checks})
        raw["notes"] = [*raw.get("notes", []), (
            f"int8 graphs re-quantized with {INT8_SCHEME} (was {old_scheme}) from the bundle's fp32 graphs on "
            f"{time.strftime('%Y-%m-%d', time.gmtime())}; their rows compare with the fp32 graphs")]
        write_manifest(stage, raw, where="re-quantized manifest", atomic=False)  # the stage is published whole
        publish(stage, bundle)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    say(f"bundle re-quantized: {bundle} ({old_scheme} -> {INT8_SCHEME})")
    return RequantizeResult(bundle, old_scheme, INT8_SCHEME, True, checks, time.perf_counter() - t0)

