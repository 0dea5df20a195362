"""Peak memory of the streamed GGUF export on a LLaMA-2-7B-shaped checkpoint (real widths, few layers).

Launch:  .venv/bin/python -m bench.bench_gguf_memory [--n-layers 4 --type f16 --workdir /tmp --keep]

Takes a real-width Meta LLaMA folder (4096 wide, FFN 11008, vocab 32000, bf16 shard; n layers): with the
default 4 layers the cached benchmark sources of :mod:`bench.assets` (shared with the other benchmarks),
otherwise one built in a temporary folder with ``testkit.make_assets``; adds MU-LLaMA-shaped deltas in memory (rank-16 LoRA on all 7 projections,
biases on wq/wo/w1/w2/w3, last 20 layers injected), and converts it twice, each in a fresh child process:
with and without handing the read source pages back to the kernel. A sampler thread reads
``/proc/self/status`` every 2 ms. Target: peak RSS above the baseline < largest single tensor + 3 GB.
Generated files (not the cache) are deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import ROOT
from bench.measure import GB, PeakSampler, proc_status, run_json_child

SHARED_LAYERS = 4  # the layer count of bench.assets' shared sources


def _child(args: argparse.Namespace) -> None:
    """One conversion; prints one JSON line."""
    import torch

    from export.gguf_export import GgufSource, write_llama_gguf
    from training.reference.dims import LlamaParams
    from training.reference.loading import torch_load
    from training.reference.tokenizer import Tokenizer

    llama_dir = args.assets / "llama"
    tok = Tokenizer(llama_dir / "tokenizer.model")
    params = LlamaParams.from_params_json(llama_dir / "params.json", vocab_size=tok.n_vocab)
    base = dict(torch_load(llama_dir / "consolidated.00.pth"))  # memory-mapped, nothing read yet

    gen = torch.Generator().manual_seed(0)
    deltas: dict[str, torch.Tensor] = {}
    rank, d, ff = 16, params.dim, params.hidden_dim
    shapes = {"attention.wq": (d, d), "attention.wk": (d, d), "attention.wv": (d, d), "attention.wo": (d, d),
              "feed_forward.w1": (ff, d), "feed_forward.w2": (d, ff), "feed_forward.w3": (ff, d)}
    for i in range(params.n_layers):
        for mod, (n_out, n_in) in shapes.items():
            prefix, w = mod.rsplit(".", 1)
            deltas[f"layers.{i}.{prefix}.lora_{w}_l1.weight"] = torch.randn(rank, n_in, generator=gen) * 0.01
            deltas[f"layers.{i}.{prefix}.lora_{w}_l2.weight"] = torch.randn(n_out, rank, generator=gen) * 0.01
            if w not in ("wk", "wv"):
                deltas[f"layers.{i}.{mod}.bias"] = torch.randn(n_out, generator=gen) * 0.01
        deltas[f"layers.{i}.attention.gate"] = torch.zeros(1, params.n_heads, 1, 1)
    n_inject = min(20, params.n_layers)
    src = GgufSource(params=params, tensors={**base, **deltas}, tokenizer_path=tok.path,
                     inject_layers=tuple(range(params.n_layers - n_inject, params.n_layers)))

    base_status = proc_status()
    sampler = PeakSampler(period=0.002)
    sampler.start()
    t0 = time.perf_counter()
    report = write_llama_gguf(src, args.out, file_type=args.type, release_source_pages=not args.no_release)
    seconds = time.perf_counter() - t0
    peak = sampler.stop()
    largest_src = max(t.numel() * t.element_size() for t in base.values())
    print(json.dumps({
        "release_pages": not args.no_release,
        "baseline_rss": base_status["VmRSS"],
        "peak_rss_delta": peak["VmRSS"] - base_status["VmRSS"],
        "peak_anon_delta": peak["RssAnon"] - base_status["RssAnon"],
        "peak_file_delta": peak["RssFile"] - base_status["RssFile"],
        "hwm_delta": peak["VmHWM"] - base_status["VmHWM"],
        "report_rss_delta": report.peak_rss_delta_bytes,
        "largest_f32": report.largest_tensor_bytes,
        "largest_src": largest_src,
        "source_bytes": sum(t.numel() * t.element_size() for t in base.values()),
        "out_bytes": report.n_bytes,
        "n_tensors": report.n_tensors,
        "seconds": seconds,
    }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-layers", type=int, default=SHARED_LAYERS)
    ap.add_argument("--type", choices=("f16", "f32"), default="f16")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("--assets", type=Path, help="reuse a real-width asset folder (has llama/)")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--no-release", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args)
        return

    work = Path(tempfile.mkdtemp(prefix="bench-gguf-", dir=args.workdir))
    try:
        assets = args.assets
        if assets is None and args.n_layers == SHARED_LAYERS:
            from bench import assets as bench_assets

            assets = bench_assets.shape_assets(SHARED_LAYERS).root
        if assets is None:
            assets = work / "assets"
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "testkit.make_assets", str(assets), "--shapes",
                            "--n-layers", str(args.n_layers), "--llama-only"], cwd=ROOT, check=True,
                           stdout=subprocess.DEVNULL)
            print(f"built {args.n_layers}-layer real-width LLaMA in {time.perf_counter() - t0:.0f} s", flush=True)
        rows = []
        for no_release in (False, True):
            out = work / f"model-{args.type}.gguf"
            cmd = [sys.executable, "-m", "bench.bench_gguf_memory", "--child", "--assets", str(assets),
                   "--out", str(out), "--type", args.type] + (["--no-release"] if no_release else [])
            rows.append(run_json_child(cmd, "conversion child"))
            out.unlink(missing_ok=True)
        r0 = rows[0]
        head = (f"source shard {r0['source_bytes'] / GB:.2f} GB (bf16), output {r0['out_bytes'] / GB:.2f} GB "
                f"({args.type}), {r0['n_tensors']} tensors; largest tensor {r0['largest_src'] / GB:.3f} GB as "
                f"stored, {r0['largest_f32'] / GB:.3f} GB as float32")
        print("\n" + head)
        print(f"{'release pages':>14} | {'time s':>6} | {'GB/s out':>8} | {'peak RSS+':>9} | {'anon+':>6} | "
              f"{'file+':>6} | {'HWM+':>6} | {'RSS+ - largest f32':>18} | target (< 3 GB)")
        md_rows = []
        for r in rows:
            margin = r["peak_rss_delta"] - r["largest_f32"]
            print(f"{str(r['release_pages']):>14} | {r['seconds']:6.1f} | {r['out_bytes'] / GB / r['seconds']:8.2f} | "
                  f"{r['peak_rss_delta'] / GB:8.2f}G | {r['peak_anon_delta'] / GB:5.2f}G | "
                  f"{r['peak_file_delta'] / GB:5.2f}G | {r['hwm_delta'] / GB:5.2f}G | {margin / GB:17.2f}G | "
                  f"{'OK' if margin < 3 * GB else 'MISSED'}")
            md_rows.append(["yes" if r["release_pages"] else "no", f"{r['seconds']:.1f}",
                            f"{r['out_bytes'] / GB / r['seconds']:.2f}", f"{r['peak_rss_delta'] / GB:.2f}",
                            f"{r['peak_anon_delta'] / GB:.2f}", f"{r['peak_file_delta'] / GB:.2f}",
                            f"{r['hwm_delta'] / GB:.2f}", f"{margin / GB:.2f}"])
        print(f"(baseline RSS {r0['baseline_rss'] / GB:.2f} GB after imports and mmap; '+' = above baseline)")
        from bench.report import Target, markdown_table, write_section

        table = markdown_table(["release source pages", "time s", "GB/s written", "peak RSS+ GB", "anon+ GB",
                                "file+ GB", "HWM+ GB", "RSS+ minus largest f32 tensor GB"], md_rows)
        n_layers = json.loads((Path(assets) / "llama" / "params.json").read_text())["n_layers"]
        body = (f"Real-width Meta LLaMA ({n_layers} layers: 4096 / 11008 / vocab 32000) + MU-LLaMA-shaped deltas "
                f"(rank-16 LoRA on all 7 projections, biases), streamed conversion with "
                f"`export.gguf_export.write_llama_gguf`, each row in a fresh process; {head}.\n\n{table}")
        product = rows[0]  # the product's setting: release_source_pages=True
        margin = (product["peak_rss_delta"] - product["largest_f32"]) / GB
        write_section(
            "gguf_memory", "GGUF conversion memory", body,
            [Target("peak RSS of the conversion above the baseline, minus the largest float32 tensor "
                    "(product setting: source pages released)", "< 3 GB", f"{margin:.2f} GB", margin < 3)],
            notes=f"Baseline RSS {r0['baseline_rss'] / GB:.2f} GB after imports and memory-mapping the shard; "
                  f"'+' = above it. Without releasing the source pages the file-backed RSS grows with the shard "
                  f"(they are clean page cache the kernel can drop, but they count in RSS).")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
