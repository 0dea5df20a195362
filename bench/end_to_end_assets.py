"""The cached model folder of :mod:`bench.bench_end_to_end`: real-width sources, their bundle, test clips.

Built once per shape with the product's own code (one child process per step, so each step's peak memory
is measured apart) and cached under :func:`bench.assets.cache_root`; the first run reports how long that
took.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import ROOT
from bench.assets import cache_root
from bench.measure import GB, proc_status

#: Bump when what a cache entry holds changes meaning.
CACHE_VERSION = 1
QUANT = "q4_k_m"
PRECISION = "int8"


def cache_key(quick: bool, layers: int) -> str:
    """The cache folder's name: shape, seed, quantisation and :data:`CACHE_VERSION`."""
    shape = "tiny" if quick else f"llama{layers}-mert24"
    return f"e2e-{shape}-seed0-{QUANT}-{PRECISION}-v{CACHE_VERSION}"


def child_build(a: argparse.Namespace) -> dict:
    """One build step into ``a.dir`` (a temporary folder the parent renames when all steps are done)."""
    d = Path(a.dir)
    t0 = time.perf_counter()
    if a.child == "build-assets":
        if a.quick:
            from testkit.make_assets import build_tiny_assets

            build_tiny_assets(d)
        else:
            from testkit.make_assets import build_shape_assets

            build_shape_assets(d, a.layers, mert_layers=24)
    else:
        build_bundle_q4_int8(d, a.threads)
    return {"seconds": time.perf_counter() - t0, "peak_rss": proc_status()["VmHWM"]}


def build_bundle_q4_int8(d: Path, threads: int) -> None:
    """q4_k_m + int8 bundle. The ONNX graphs are checked against torch (strict); the check of llama.cpp
    against the torch LLM is skipped (it would hold the float32 torch LLaMA beside llama.cpp); this benchmark
    compares the two sides' greedy tokens instead."""
    from export.build import BundleOptions, build_bundle

    opts = BundleOptions(quants=(QUANT,), encoder_precisions=(PRECISION,), verify_llm=False)
    build_bundle(d / "checkpoint.pth", d / "llama", d / "mert", d / "bundle", options=opts, threads=threads,
                 progress=lambda m: print(f"[export] {m}", file=sys.stderr, flush=True))


def ensure_assets(quick: bool, layers: int, threads: int) -> tuple[Path, dict | None]:
    """The cached folder (built now if missing) and the build report when it was built by this call."""
    final = cache_root() / cache_key(quick, layers)
    if (final / "build.json").is_file():
        return final, None
    cache_root().mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=cache_root()))
    try:
        report = {}
        for step in ("build-assets", "build-bundle"):
            print(f"building {final.name}: {step} ...", flush=True)
            argv = ["--child", step, "--dir", str(tmp), "--layers", str(layers), "--threads", str(threads)]
            cmd = [sys.executable, "-m", "bench.bench_end_to_end", *argv, *(["--quick"] if quick else [])]
            proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{step} failed (exit {proc.returncode}); its log is above")
            report[step] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"  {step}: {report[step]['seconds']:.0f} s, peak RSS {report[step]['peak_rss'] / GB:.1f} GB",
                  flush=True)
        report["bytes"] = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        (tmp / "build.json").write_text(json.dumps(report, indent=2) + "\n")
        tmp.chmod(0o755)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final, report


def clip(folder: Path, seconds: float) -> Path:
    """A deterministic synthesised song of ``seconds`` (24 kHz mono PCM_16), written once into ``folder``."""
    path = folder / "audio" / f"song_{seconds:g}s.wav"
    if path.is_file():
        return path
    import soundfile as sf

    from mullama_sdk.files import atomic_path
    from testkit.audio import SONGS, render_song, to_pcm16

    path.parent.mkdir(parents=True, exist_ok=True)
    # the 10 s test song's parameters, rendered at the wanted length
    song = dataclasses.replace(SONGS["music_24k_mono_10s"], seconds=float(seconds))
    with atomic_path(path, suffix=".wav") as tmp:
        sf.write(tmp, to_pcm16(render_song(song)), song.sample_rate, subtype="PCM_16")
    return path
