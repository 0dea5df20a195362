"""MERT encoder latency on an NVIDIA GPU: TensorRT vs ONNX Runtime CUDA vs torch, at MERT-v1-330M shape.

Launch:  .venv/bin/python -m bench.bench_trt [--seconds 5 10 30 --reps 10 --fp16]

Needs an NVIDIA GPU with tensorrt + cuda-python (``pip install 'mullama-sdk[cuda]'``); without one it
prints "no GPU: skipped (<reason>)", writes a results section saying "not measured: no GPU" and exits 0,
so ``make bench`` passes on CPU machines.

A randomly initialised MERT-330M-shaped encoder (the config of bench/bench_encoder.py) is exported to
ONNX with :func:`export.onnx_export.export_encoder` (and converted to float16 with ``--fp16``); the
TensorRT engine is built with :func:`export.trt.build_engine` and a min/opt/max profile covering the
lengths measured. Backends, each on the GPU:

* ``trt``: the engine through :class:`mullama_sdk.encoder_trt.TrtGraph` (what the runtime uses,
  host -> device copy, execute, device -> host copy included);
* ``ort-cuda``: ONNX Runtime's CUDA execution provider on the same ONNX file (skipped without
  onnxruntime-gpu);
* ``torch``: the eager module on ``cuda`` (float16 autocast with ``--fp16``; skipped without a CUDA
  build of torch).

Warm-up runs first; then ``--reps`` rounds, in each round every length (in random order) is encoded
by every backend (in random order) back to back. Reported: median milliseconds per window, the
real-time factor, and medians of the per-round paired ratios (torch / x, ort-cuda / trt), as in
bench_encoder.py; plus the max relative difference of each backend's state means to torch fp32.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.report import Target, markdown_table, write_section

TITLE = "MERT encoder on an NVIDIA GPU: TensorRT vs ONNX Runtime CUDA vs torch"


def _skip_reason() -> str | None:
    from export.trt import build_environment
    from mullama_sdk.errors import BackendUnavailableError

    try:
        build_environment()
    except BackendUnavailableError as e:
        return str(e)
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, nargs="+", default=[5.0, 10.0, 30.0])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--fp16", action="store_true", help="fp16 engine / ONNX / torch autocast (default fp32)")
    ap.add_argument("--workspace-gb", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    reason = _skip_reason()
    if reason is not None:
        print(f"bench_trt: no GPU: skipped ({reason})")
        write_section("trt", TITLE, f"Not measured: no GPU ({reason}).",
                      [Target("TensorRT encoder latency vs ONNX Runtime CUDA and torch", "measured",
                              "not measured: no GPU", None)])
        return 0

    import tensorrt
    import torch

    from bench.bench_encoder import tiled_test_waveform
    from export.onnx_export import export_encoder
    from export.onnx_precision import convert_fp16
    from export.trt import build_engine, waveform_profile
    from mullama_sdk.encoder_trt import TrtGraph, cuda_device
    from testkit.mert_files import mert_330m_config
    from training.reference.mert import MertEncoder, hubert_config_from_mert

    MERT_330M = mert_330m_config()
    gpu = cuda_device()
    torch.manual_seed(args.seed)
    mert = MertEncoder(hubert_config_from_mert(MERT_330M, source="MERT-330M shape")).eval()
    precision = "fp16" if args.fp16 else "fp32"
    print(f"{gpu.name} (compute capability {gpu.compute_capability}), TensorRT {tensorrt.__version__}, "
          f"torch {torch.__version__}, {precision}", flush=True)

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        onnx_path = export_encoder(mert, tmp / "encoder.onnx")
        if args.fp16:
            onnx_path = convert_fp16(onnx_path, tmp / "encoder.fp16.onnx")
        lo, hi = min(args.seconds), max(args.seconds)
        profile = waveform_profile(lo, statistics.median(args.seconds), hi)
        engine_path = tmp / f"encoder.trt.{precision}.engine"
        build_s = build_engine(tensorrt, onnx_path, engine_path, profile=profile, workspace_gb=args.workspace_gb)
        print(f"engine built in {build_s:.0f} s ({engine_path.stat().st_size / 2**20:.0f} MiB), "
              f"profile {profile}", flush=True)
        waves = {s: tiled_test_waveform(s, tmp) for s in args.seconds}

        runners, notes = {}, []
        graph = TrtGraph(engine_path)
        runners["trt"] = lambda w: graph.run({"waveform": w[None]})["state_means"]
        try:
            import onnxruntime as ort

            if "CUDAExecutionProvider" in ort.get_available_providers():
                sess = ort.InferenceSession(str(onnx_path), providers=["CUDAExecutionProvider"])
                runners["ort-cuda"] = lambda w: sess.run(["state_means"], {"waveform": w[None]})[0]
            else:
                notes.append(f"ort-cuda skipped: onnxruntime offers {ort.get_available_providers()}")
        except ImportError as e:
            notes.append(f"ort-cuda skipped: {e}")
        if torch.cuda.is_available():
            mert_gpu = MertEncoder(hubert_config_from_mert(MERT_330M, source="MERT-330M shape")).eval()
            mert_gpu.load_state_dict(mert.state_dict())
            mert_gpu = mert_gpu.cuda()

            def torch_run(w: np.ndarray) -> np.ndarray:
                with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=args.fp16):
                    out = mert_gpu(torch.from_numpy(w)[None].cuda())[0][0].float().cpu().numpy()
                return out

            runners["torch"] = torch_run
        else:
            notes.append("torch skipped: this torch has no CUDA")

        refs = {}
        with torch.inference_mode():
            for s, w in waves.items():
                refs[s] = mert(torch.from_numpy(w)[None])[0][0].numpy()  # fp32 CPU reference
        outputs = {}
        for s, w in waves.items():  # warm-up (lazy init, autotuning) and the outputs compared below
            for b, run in runners.items():
                run(w)
                outputs[(b, s)] = run(w)
        names = list(runners)
        times: dict[tuple[str, float], list[float]] = {(b, s): [] for b in names for s in args.seconds}
        rng = random.Random(args.seed)
        for rep in range(args.reps):
            for s in rng.sample(args.seconds, len(args.seconds)):
                for b in rng.sample(names, len(names)):
                    t = time.perf_counter()
                    runners[b](waves[s])  # returns host arrays: the GPU work is finished
                    times[(b, s)].append(time.perf_counter() - t)
            print(f"round {rep + 1}/{args.reps} done", flush=True)
        graph.close()

    med = {k: statistics.median(v) for k, v in times.items()}

    def ratio(num: str, den: str, s: float) -> float:
        return statistics.median(a / b for a, b in zip(times[(num, s)], times[(den, s)]))

    print()
    print(f"median ms per window ({precision}; RTF = compute s / audio s); x = medians of per-round paired ratios")
    cols = [f"{b + ' ms':>12} {'RTF':>7}" for b in names]
    extra = [c for c in (("torch", "trt"), ("ort-cuda", "trt"), ("torch", "ort-cuda")) if set(c) <= set(names)]
    head = f"{'window':>7} | " + " | ".join(cols) + " | " + " ".join(f"{a + '/' + b:>15}" for a, b in extra)
    print(head)
    print("-" * len(head))
    for s in args.seconds:
        cells = [f"{1000 * med[(b, s)]:12.1f} {med[(b, s)] / s:7.4f}" for b in names]
        ratios = [f"{ratio(a, b, s):15.2f}" for a, b in extra]
        print(f"{s:>6g}s | " + " | ".join(cells) + " | " + " ".join(ratios))
    print()
    print("max relative difference of the state means to torch fp32 on the CPU")
    rel_rows = []
    for s in args.seconds:
        row = []
        for b in names:
            x, ref = outputs[(b, s)].astype(np.float64), refs[s].astype(np.float64)
            row.append(f"{np.abs(x - ref).max() / np.abs(ref).max():.2e}")
        print(f"{s:>6g}s  " + "   ".join(f"{b} {r}" for b, r in zip(names, row)))
        rel_rows.append([f"{s:g} s", *row])
    for n in notes:
        print(n)
    speed = markdown_table(
        ["window", *(f"{b} ms (RTF)" for b in names), *(f"{a} / {b}" for a, b in extra)],
        [[f"{s:g} s", *(f"{1000 * med[(b, s)]:.1f} ({med[(b, s)] / s:.4f})" for b in names),
          *(f"{ratio(a, b, s):.2f}x" for a, b in extra)] for s in args.seconds])
    rel = markdown_table(["window", *names], rel_rows)
    body = (f"{gpu.name} (compute capability {gpu.compute_capability}), TensorRT {tensorrt.__version__}, "
            f"{precision}, {args.reps} rounds, backends in random order (medians of paired ratios).\n\n{speed}"
            f"\n\nMax relative difference of the state means to torch fp32 on the CPU:\n\n{rel}")
    write_section("trt", TITLE, body, notes="\n".join(notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
