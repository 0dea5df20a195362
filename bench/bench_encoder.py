"""MERT encoder speed and fidelity: ONNX Runtime fp32 vs ORT int8 vs torch eager, at MERT-v1-330M shape.

Launch:  .venv/bin/python -m bench.bench_encoder [--seconds 5 10 30 --reps 5 --threads 2 --no-adapter]

A randomly initialised MERT-330M-shaped encoder (transformers' HubertModel: hidden 1024, 24 layers,
16 heads, FFN 4096, 7 convs of 512 channels; the config is built here) is exported with
:func:`export.onnx_export.export_encoder` and quantized with :func:`export.onnx_precision.quantize_int8`.
One process, one waveform per length (synthesised music from the test assets, tiled), warm-up runs, then
``--reps`` rounds; in each round, for every length (lengths in random order), the three backends
encode it back to back in a random order. This VM is shared and its speed drifts, so the ratios are
medians of the per-round *paired* ratios (measured seconds apart), not ratios of medians. Reported per
length: median seconds, real-time factor (seconds of compute per second of audio), paired ratios and
the spread of the rounds; and the fidelity of
each ONNX variant to torch: cosine of the state means (rows) and of the music vector, i.e. the state
means put through a random real-width music adapter (25 x 1024 -> 4096, 3 blocks of 16384) in torch.

Random weights make no outlier features: the int8 fidelity seen here is an upper bound of what the
trained MERT will show. Check it on the real checkpoint (compare_encoder) before shipping int8.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

# Backends take turns: a thread pool that keeps spinning after its call returns would steal the cores
# from the next backend. OpenMP (torch) must be told before torch loads; ORT's pools are set below.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from bench.report import Target, markdown_table, write_section  # noqa: E402
from export.onnx_export import export_encoder  # noqa: E402
from export.onnx_precision import quantize_int8  # noqa: E402
from mullama_sdk.audio import load_audio  # noqa: E402
from mullama_sdk.constants import SAMPLE_RATE_HZ  # noqa: E402
from mullama_sdk.cpu import INT8_SCHEME, int8_kernel  # noqa: E402
from mullama_sdk.encoder_ort import session_options  # noqa: E402
from testkit.mert_files import mert_330m_config  # noqa: E402
from training.reference.adapter import MusicAdapter  # noqa: E402
from training.reference.dims import AdapterDims  # noqa: E402
from training.reference.mert import MertEncoder, hubert_config_from_mert  # noqa: E402

#: ``ort-int8`` is the shipped scheme (weights within [-64, 64]); ``ort-int8-w8`` the legacy full-range one,
#: measured beside it because its speed and fidelity depend on the CPU's int8 kernel (mullama_sdk.cpu).
BACKENDS = ("torch", "ort-fp32", "ort-int8", "ort-int8-w8")
TARGET_SPEEDUP = 2.0
TARGET_COS = 0.99


def tiled_test_waveform(seconds: float, tmp: Path) -> np.ndarray:
    """``seconds`` of the 10 s test song (tiled), as the SDK's loader returns it; shared with bench_trt."""
    from testkit.audio import write_test_audio

    clip = load_audio(write_test_audio(tmp / "audio")["music_24k_mono_10s.wav"])
    n = round(seconds * SAMPLE_RATE_HZ)
    return np.ascontiguousarray(np.tile(clip, -(-n // len(clip)))[:n])


def _cos(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    x, y = np.atleast_2d(x).astype(np.float64), np.atleast_2d(y).astype(np.float64)
    return (x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))


def _spread(times: dict[tuple[str, float], list[float]], seconds: float) -> float:
    return max((max(v) - min(v)) / statistics.median(v) for (b, s), v in times.items() if s == seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, nargs="+", default=[5.0, 10.0, 30.0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-adapter", action="store_true", help="skip the music-vector cosine (saves 3.2 GB)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="5 and 10 s windows, 2 rounds (for trying things)")
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.reps = [5.0, 10.0], 2
    load0 = os.getloadavg()[0]

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {args.threads} threads, "
          f"torch {torch.__version__}, onnxruntime {ort.__version__}, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    mert = MertEncoder(hubert_config_from_mert(mert_330m_config(), source="MERT-330M shape")).eval()
    n_params = sum(p.numel() for p in mert.parameters())
    print(f"random MERT-330M-shaped encoder: {n_params / 1e6:.0f} M parameters", flush=True)

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        t0 = time.perf_counter()
        fp32 = export_encoder(mert, tmp / "encoder.onnx")
        t1 = time.perf_counter()
        int8 = quantize_int8(fp32, tmp / "encoder.int8.onnx")
        t2 = time.perf_counter()
        int8_w8 = quantize_int8(fp32, tmp / "encoder.int8-w8.onnx", reduce_range=False)
        print(f"export fp32 {t1 - t0:.0f} s ({fp32.stat().st_size / 2**20:.0f} MiB), "
              f"int8 {t2 - t1:.0f} s ({int8.stat().st_size / 2**20:.0f} MiB)", flush=True)

        opts = session_options(args.threads)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sessions = {name: ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
                    for name, p in (("ort-fp32", fp32), ("ort-int8", int8), ("ort-int8-w8", int8_w8))}
        waves = {s: tiled_test_waveform(s, tmp) for s in args.seconds}

        def run(backend: str, w: np.ndarray) -> np.ndarray:
            if backend == "torch":
                with torch.inference_mode():
                    return mert(torch.from_numpy(w)[None])[0][0].numpy()
            return sessions[backend].run(["state_means"], {"waveform": w[None]})[0]

        outputs = {}
        for s, w in waves.items():  # warm-up (allocator arenas, lazy init) and the outputs compared below
            for b in BACKENDS:
                outputs[(b, s)] = run(b, w)
        times: dict[tuple[str, float], list[float]] = {(b, s): [] for b in BACKENDS for s in args.seconds}
        rng = random.Random(args.seed)
        for rep in range(args.reps):
            for s in rng.sample(args.seconds, len(args.seconds)):
                for b in rng.sample(BACKENDS, len(BACKENDS)):
                    t = time.perf_counter()
                    run(b, waves[s])
                    times[(b, s)].append(time.perf_counter() - t)
            print(f"round {rep + 1}/{args.reps} done", flush=True)

        adapter = None
        if not args.no_adapter:
            adapter = MusicAdapter(AdapterDims(n_states=25, mert_dim=1024, dim=4096, n_blocks=3,
                                               block_hidden=16384)).eval()

    med = {k: statistics.median(v) for k, v in times.items()}

    def ratio(num: str, den: str, s: float) -> float:
        return statistics.median(a / b for a, b in zip(times[(num, s)], times[(den, s)]))

    print()
    print("median seconds per window (RTF = compute s / audio s); x torch = torch time / backend time,")
    print("x fp32 = fp32 time / int8 time (medians of per-round paired ratios)")
    head = (f"{'window':>7} | {'torch s':>8} {'RTF':>6} | {'fp32 s':>7} {'RTF':>6} {'x torch':>7} | "
            f"{'int8 s':>7} {'RTF':>6} {'x torch':>7} {'x fp32':>6} | {'spread':>6}")
    print(head)
    print("-" * len(head))
    speed_rows, int8_speedup = [], {}
    for s in args.seconds:
        tt, tf, ti = med[("torch", s)], med[("ort-fp32", s)], med[("ort-int8", s)]
        int8_speedup[s] = ratio("ort-fp32", "ort-int8", s)
        print(f"{s:>6g}s | {tt:8.2f} {tt / s:6.3f} | {tf:7.2f} {tf / s:6.3f} {ratio('torch', 'ort-fp32', s):7.2f} | "
              f"{ti:7.2f} {ti / s:6.3f} {ratio('torch', 'ort-int8', s):7.2f} "
              f"{int8_speedup[s]:6.2f} | {_spread(times, s):6.0%}")
        speed_rows.append([f"{s:g} s", f"{tt:.2f} ({tt / s:.3f})", f"{tf:.2f} ({tf / s:.3f})",
                           f"{ratio('torch', 'ort-fp32', s):.2f}x", f"{ti:.2f} ({ti / s:.3f})",
                           f"{ratio('torch', 'ort-int8', s):.2f}x", f"**{int8_speedup[s]:.2f}x**",
                           f"{_spread(times, s):.0%}", f"{ratio('ort-int8-w8', 'ort-int8', s):.2f}x"])
    print(f"(spread: largest (max - min) / median of the row's three backends over {args.reps} rounds; "
          f"load average at the end {os.getloadavg()[0]:.1f})")

    print()
    print("fidelity vs torch: state means (25 rows) and music vector a (random real-width adapter)")
    head = f"{'window':>7} {'backend':>9} | {'max rel':>8} {'cos min':>9} {'cos mean':>9} | {'cos(a)':>9}"
    print(head)
    print("-" * len(head))
    fid_rows, int8_cos = [], []
    for s in args.seconds:
        ref = outputs[("torch", s)]
        a_ref = None
        if adapter is not None:
            with torch.inference_mode():
                a_ref = adapter(torch.from_numpy(ref)[None])[0].numpy()
        for b in ("ort-fp32", "ort-int8", "ort-int8-w8"):
            x = outputs[(b, s)]
            rel = np.abs(x.astype(np.float64) - ref).max() / np.abs(ref).max()
            c = _cos(x, ref)
            ca = "-"
            if adapter is not None:
                with torch.inference_mode():
                    a = adapter(torch.from_numpy(x)[None])[0].numpy()
                ca = f"{_cos(a, a_ref)[0]:.6f}"
                if b == "ort-int8":
                    int8_cos.append(float(_cos(a, a_ref)[0]))
            if b == "ort-int8":
                int8_cos.append(float(c.min()))
            print(f"{s:>6g}s {b:>9} | {rel:8.2e} {c.min():9.6f} {c.mean():9.6f} | {ca:>9}")
            fid_rows.append([f"{s:g} s", b, f"{rel:.2e}", f"{c.min():.6f}", f"{c.mean():.6f}", ca])

    speed = markdown_table(["window", "torch s (RTF)", "ORT fp32 s (RTF)", "fp32 x torch", "ORT int8 s (RTF)",
                            "int8 x torch", "int8 x fp32", "spread", "int8 x legacy int8-w8"], speed_rows)
    fid = markdown_table(["window", "backend", "max rel diff", "cos min (states)", "cos mean (states)",
                          "cos music vector"], fid_rows)
    kernel = int8_kernel()
    body = (f"CPU int8 kernel: {kernel.describe()}. int8 = the shipped scheme ({INT8_SCHEME}, weights within "
            f"[-64, 64]); int8-w8 = the legacy full-range weights, for comparison.\n\n"
            f"Random MERT-330M-shaped encoder ({n_params / 1e6:.0f} M parameters), {args.threads} threads, "
            f"{args.reps} rounds, backends in random order per round; ratios are medians of per-round paired "
            f"ratios. RTF = compute seconds per audio second.\n\n{speed}\n\nFidelity vs torch (state means: 25 "
            f"rows; music vector: the state means through a random real-width adapter in torch):\n\n{fid}")
    worst = min(int8_speedup.values())
    targets = [Target(f"ORT int8 vs ORT fp32 speed, {s:g} s window", ">= 2x", f"{v:.2f}x", v >= TARGET_SPEEDUP)
               for s, v in int8_speedup.items()]
    targets.append(Target("int8 cosine to torch (state means and music vector, worst window)", ">= 0.99",
                          f"{min(int8_cos):.5f}", min(int8_cos) >= TARGET_COS))
    notes = ("Random weights have no outlier features: the int8 fidelity here is an upper bound of what the trained "
             "MERT shows; check it on the real checkpoint (`mullama-export verify`) before shipping int8.")
    if worst < TARGET_SPEEDUP:
        notes += (" Where int8 is below 2x fp32: dynamic quantization makes the weight matrix products int8, "
                  "but attention's activation-by-activation products (QK^T, softmax x V) stay float32, and their "
                  "share of the time grows with the square of the window length.")
    notes += (f"\n\nLoad average (1 min) {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, on "
              f"{os.cpu_count()} CPUs (above ~1, other jobs shared the cores).")
    write_section("encoder", "MERT encoder: ONNX Runtime fp32 / int8 vs torch", body, targets, notes=notes)


if __name__ == "__main__":
    main()
