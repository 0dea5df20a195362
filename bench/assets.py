"""Benchmark model files, built once and cached: real-width random MU-LLaMA sources, bundles and GGUFs.

Everything is built with the product's own code (``testkit.make_assets.build_shape_assets`` for the
sources, the exporter's ONNX export / precision conversion / GGUF writer / quantizer / manifest writer for
bundles, :mod:`export.gguf_export` + :mod:`export.quantize` for plain LLaMA GGUFs) into ``~/.cache/mullama/bench/<key>/`` (``$MULLAMA_BENCH_CACHE`` overrides the
root). Each entry is built in a temporary folder next to it and renamed when complete, under a file lock,
so an interrupted build leaves nothing half-made and two benchmarks asking for the same entry at the same
time build it once. The key names the shape and every option, plus :data:`CACHE_VERSION` (and the bundle
format version), so a change of any of them builds a new entry instead of reusing a stale one.

API (all return paths; each call builds what is missing and returns at once when cached):

* :func:`shape_assets` ``(n_layers, *, mert_layers=24, seed=0)`` -> ``ShapeAssets`` (``llama/``, ``mert/``,
  ``checkpoint.pth``, ``checkpoint_deltas.pth``; LLaMA-2-7B widths 4096 / 11008 / 32 heads / vocab 32000 with
  ``n_layers`` layers, MERT-v1-330M widths with ``mert_layers`` layers, MU-LLaMA adapter widths).
* :func:`shape_bundle` ``(n_layers, *, mert_layers=24, quants=("q4_k_m",), encoder_precisions=("fp32",
  "int8"), seed=0)`` -> bundle folder for ``Captioner.from_pretrained``, exported from ``shape_assets`` with
  the exporter's functions, one step per process (see its docstring for why not ``build_bundle`` itself).
* :func:`llama_gguf` ``(n_layers, quant, *, seed=0)`` -> a plain LLaMA GGUF (no MU-LLaMA deltas) of
  ``shape_assets(n_layers)``' Meta folder: ``f16`` converted, ``q8_0`` / ``q4_k_m`` quantised from it.
* :func:`cache_root`, :func:`entry_bytes` for reports.

Sizes at ``n_layers=4, mert_layers=24`` (the benchmarks' default): sources 11.7 GB, bundle (fp32 + int8
ONNX, q4_k_m + q8_0 GGUF) 6.8 GB, plain GGUFs f16 / q8_0 / q4_k_m 2.1 / 1.1 / 0.7 GB. Building takes ~15 min
once; its peak memory is ~8.5 GB for 1.5 min (int8 quantization of the 2.7 GB adapter), below 6 GB otherwise.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from bench import ROOT

log = logging.getLogger(__name__)

#: Bump when what an entry holds changes meaning (a new key then builds a fresh entry).
CACHE_VERSION = 1


def cache_root() -> Path:
    """``$MULLAMA_BENCH_CACHE`` or ``~/.cache/mullama/bench``."""
    return Path(os.environ.get("MULLAMA_BENCH_CACHE", "~/.cache/mullama/bench")).expanduser()


def entry_bytes(path: Path) -> int:
    """Bytes of a file or of every file under a folder."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _say(msg: str) -> None:
    print(f"[bench.assets] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _locked(key: str) -> Iterator[None]:
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _cached_dir(key: str, build) -> Path:
    """``cache_root()/key``, calling ``build(tmp_dir)`` into a temporary folder first when it is missing."""
    final = cache_root() / key
    if final.is_dir():
        return final
    with _locked(key):
        if final.is_dir():  # built by another process while we waited for the lock
            return final
        for stale in cache_root().glob(f".{key}.partial-*"):  # left by a killed build (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.partial-", dir=cache_root()))
        t0 = time.perf_counter()
        try:
            build(tmp)
            tmp.chmod(0o755)  # mkdtemp made it private
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _say(f"built {key} in {time.perf_counter() - t0:.0f} s ({entry_bytes(final) / 1e9:.1f} GB)")
    return final


# ------------------------------------------------------------------------------------------------ sources
def _assets_key(n_layers: int, mert_layers: int, seed: int) -> str:
    return f"assets-llama{n_layers}-mert{mert_layers}-seed{seed}-v{CACHE_VERSION}"


def shape_assets(n_layers: int = 4, *, mert_layers: int = 24, seed: int = 0):
    """Real-width random MU-LLaMA sources (see :func:`testkit.make_assets.build_shape_assets`).

    Returns:
        ``testkit.make_assets.ShapeAssets`` of the cached folder.
    """
    from testkit.asset_dims import real_dims
    from testkit.make_assets import ShapeAssets, build_shape_assets

    def build(tmp: Path) -> None:
        _say(f"building real-width sources: LLaMA 4096 x {n_layers} layers, MERT 1024 x {mert_layers} layers "
             "(a few minutes, once)")
        build_shape_assets(tmp, n_layers, mert_layers=mert_layers, seed=seed)

    root = _cached_dir(_assets_key(n_layers, mert_layers, seed), build)
    return ShapeAssets(root=root, llama_dir=root / "llama", mert_dir=root / "mert",
                       checkpoint=root / "checkpoint.pth", checkpoint_deltas=root / "checkpoint_deltas.pth",
                       dims=real_dims(n_layers, mert_layers))


# ------------------------------------------------------------------------------------------------ bundles
def shape_bundle(
    n_layers: int = 4,
    *,
    mert_layers: int = 24,
    quants: Sequence[str] = ("q4_k_m",),
    encoder_precisions: Sequence[str] = ("fp32", "int8"),
    seed: int = 0,
    threads: int | None = 2,
) -> Path:
    """A bundle of :func:`shape_assets`, made with the exporter's functions one step per child process.

    :func:`export.build.build_bundle` peaks at 12.8 GB on these sources (its automatic llama.cpp check holds
    the whole float32 torch model beside an f32 GGUF; before the music export moved to a child process it was
    15.7 GB), too much beside other jobs. Here the same functions run in separate processes - ONNX fp32 export
    (``export.music_export.write_fp32_graphs``), each ``export.build.convert_onnx_variant``, the GGUF
    (``write_gguf`` + ``quantize_gguf`` from ``export.sizes.base_gguf_type``), the manifest
    (``export.bundle_layout.bundle_manifest``, written by ``mullama_sdk.manifest.write_manifest``) - so the peak is
    the largest single step (``quantize_int8`` of the adapter, ~8.5 GB, once). The torch comparison is
    skipped (noted in the manifest). Finished steps survive an interruption and are not redone.

    Returns:
        The bundle folder (load with ``Captioner.from_pretrained``).
    """
    from mullama_sdk.manifest import BUNDLE_FORMAT_VERSION

    key = (f"bundle-llama{n_layers}-mert{mert_layers}-{'+'.join(quants)}-{'+'.join(encoder_precisions)}"
           f"-seed{seed}-f{BUNDLE_FORMAT_VERSION}-v{CACHE_VERSION}")
    final = cache_root() / key
    if final.is_dir():
        return final
    src = shape_assets(n_layers, mert_layers=mert_layers, seed=seed)
    with _locked(key):
        if final.is_dir():
            return final
        work = cache_root() / f".{key}.partial"  # fixed name: a rerun resumes after the finished steps
        work.mkdir(exist_ok=True)
        t0 = time.perf_counter()
        sources = [str(src.checkpoint), str(src.llama_dir), str(src.mert_dir)]
        _say(f"exporting bundle {key} step by step (several minutes, once)")
        if not all((work / f"{g}.fp32.onnx").is_file() for g in ("encoder", "adapter")):
            _step("onnx-fp32", *sources, str(work))
        for p in encoder_precisions:
            for g in ("encoder", "adapter"):
                if p != "fp32" and not (work / f"{g}.{p}.onnx").is_file():
                    _step(p, str(work), g)
        if not all((work / f"llm.{q}.gguf").is_file() for q in quants):
            _step("gguf", *sources, str(work), ",".join(quants), str(threads or 0))
        _step("manifest", *sources, str(work), ",".join(quants), ",".join(encoder_precisions))
        os.replace(work, final)
        _say(f"built {key} in {time.perf_counter() - t0:.0f} s ({entry_bytes(final) / 1e9:.1f} GB)")
    return final


def _step(name: str, *args: str) -> None:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "bench.assets", "--step", name, *args], cwd=ROOT, check=True)
    _say(f"  step {name} {args[-1] if name in ('int8', 'fp16') else ''} "
         f"{time.perf_counter() - t0:.0f} s")


def _run_step(name: str, args: list[str]) -> None:
    """One bundle-building step (runs in its own process), each a stage or a rule of
    :func:`export.build.build_bundle`, so that these bundles hold what an export would."""
    if name in ("int8", "fp16"):
        from export.build import convert_onnx_variant

        convert_onnx_variant(Path(args[0]), args[1], name)
        return
    from training.reference.model_sources import open_sources

    checkpoint, llama_dir, mert_dir, out = (Path(a) for a in args[:4])
    src = open_sources(checkpoint, llama_dir, mert_dir)
    if name == "onnx-fp32":
        from export.music_export import write_fp32_graphs
        from training.reference.build import build_music_model

        write_fp32_graphs(build_music_model(src), out)
    elif name == "gguf":
        from export.bundle_layout import gguf_file
        from export.gguf_export import write_gguf
        from export.quantize import quantize_gguf
        from export.sizes import base_gguf_type

        quants, threads = args[4].split(","), int(args[5]) or None
        base_type = base_gguf_type(src.config, quants)  # the base GGUF build_bundle writes and quantizes from
        base = out / gguf_file(base_type)
        if not base.is_file():
            write_gguf(src, base, file_type=base_type)
        for q in quants:
            if q != base_type and not (out / gguf_file(q)).is_file():
                quantize_gguf(base, out / gguf_file(q), q, nthread=threads)
    elif name == "manifest":
        from export.bundle_layout import bundle_manifest, drop_intermediates
        from export.sizes import base_gguf_type
        from mullama_sdk.manifest import write_manifest

        options = bundle_options(args[4].split(","), args[5].split(","))
        drop_intermediates(out, options, base_gguf_type(src.config, options.quants))
        notes = ["benchmark bundle (bench.assets): random weights, assembled step by step; the variants were "
                 "not compared with the torch reference"]
        write_manifest(out, bundle_manifest(src, options, notes, out))
    else:
        raise SystemExit(f"unknown step {name!r}")


def bundle_options(quants: Sequence[str], encoder_precisions: Sequence[str]):
    """:class:`export.build.BundleOptions` of benchmark bundles (what their manifest records)."""
    from export.build import BundleOptions

    return BundleOptions(quants=tuple(quants), encoder_precisions=tuple(encoder_precisions), verify_llm=False)


# --------------------------------------------------------------------------------------------- plain GGUFs
def llama_gguf(n_layers: int, quant: str, *, seed: int = 0, threads: int | None = 2) -> Path:
    """A plain LLaMA GGUF (base weights only, no LoRA/biases) of the real-width sources, cached.

    ``f16`` is converted from the Meta shard with :func:`export.gguf_export.write_llama_gguf`; the others
    are quantised from that f16 file with :func:`export.quantize.quantize_gguf`.
    """
    key = f"gguf-llama{n_layers}-seed{seed}-v{CACHE_VERSION}"
    name = f"llama.{quant}.gguf"
    folder = cache_root() / key
    if (folder / name).is_file():
        return folder / name
    with _locked(key):
        if (folder / name).is_file():
            return folder / name
        folder.mkdir(parents=True, exist_ok=True)
        f16 = folder / "llama.f16.gguf"
        if not f16.is_file():
            _write_plain_f16(n_layers, seed, f16)
        if quant != "f16":
            from export.quantize import quantize_gguf

            t0 = time.perf_counter()
            quantize_gguf(f16, folder / name, quant, nthread=threads)  # writes a temp file, then renames
            _say(f"quantised {key}/{name} in {time.perf_counter() - t0:.0f} s")
    return folder / name


def _write_plain_f16(n_layers: int, seed: int, out: Path) -> None:
    from export.gguf_export import GgufSource, write_llama_gguf
    from training.reference.dims import LlamaParams
    from training.reference.loading import torch_load
    from training.reference.tokenizer import Tokenizer

    src = shape_assets(n_layers, seed=seed)
    tok = Tokenizer(src.llama_dir / "tokenizer.model")
    params = LlamaParams.from_params_json(src.llama_dir / "params.json", vocab_size=tok.n_vocab)
    tensors = dict(torch_load(src.llama_dir / "consolidated.00.pth"))
    n_inject = min(20, params.n_layers)
    gsrc = GgufSource(params=params, tensors=tensors, tokenizer_path=tok.path, name="LLaMA (bench)",
                      inject_layers=tuple(range(params.n_layers - n_inject, params.n_layers)))
    t0 = time.perf_counter()
    write_llama_gguf(gsrc, out, file_type="f16")  # temp name + rename inside
    _say(f"converted {out.parent.name}/{out.name} in {time.perf_counter() - t0:.0f} s")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.assets [N_LAYERS]``: build (or show) the default benchmark entries."""
    args = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args[:1] == ["--step"]:
        _run_step(args[1], args[2:])
        return 0
    n = int(args[0]) if args else 4
    paths = [shape_assets(n).root, shape_bundle(n, quants=("q4_k_m", "q8_0"))]
    paths += [llama_gguf(n, q) for q in ("f16", "q8_0", "q4_k_m")]
    for p in paths:
        print(f"{entry_bytes(p) / 1e9:7.2f} GB  {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
