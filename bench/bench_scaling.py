"""Scaling: encoder time and memory vs audio length (5 s .. 10 min), and caption_batch vs a caption loop.

Launch:  .venv/bin/python -m bench.bench_scaling [--part encode batch --seconds 5 30 60 120 600 --rounds 2
         --precisions int8 --batch 8 --new-tokens 64 --batch-rounds 3 --max-seconds S --quick]

Bundle: the real-width benchmark bundle of :mod:`bench.assets` (MERT-v1-330M shape: 1024 wide, 24 layers;
real-width adapter; LLaMA-2-7B widths with 4 layers; random weights), 2 threads everywhere.

**encode**: for every audio length (a 24 kHz PCM WAV of synthesised music, streamed from disk by the SDK
in 30 s windows) and every ``--rounds`` round, a fresh child process loads ``Captioner.from_pretrained``,
warms ONNX Runtime up on a 1 s clip, then times ``Captioner.encode(path)`` while a thread samples its RSS
every 5 ms. Lengths run in a random order per round (alternating processes: each length is measured
next to the others, never in a separate run). Reported: median seconds, seconds per audio second, a
least-squares line ``time = a + b * length`` over the lengths from 30 s (the window size) on, and the
peak RSS above the RSS after loading (plus the process's VmHWM). ``--max-seconds`` drops longer lengths.

**batch**: ``--batch`` different clips (5 s each), ``--new-tokens`` greedy tokens each (``n_ctx`` 256):
``Captioner.caption_batch`` (``batch_size`` = N: one llama.cpp batch, per-row music vectors) vs a loop of
``Captioner.caption`` on the same Captioner and clips; per round both, in random order. Reported: wall
time, generated tokens/s, the paired throughput ratio, and where the time goes (encoder / prefill /
decode) from each result's ``Timings``. Profile: one plain llama.cpp decode step with 1, 2, 4, 8 sequences
(interleaved). Check: with ``exact=True`` (no flash attention, F32 KV) the batch's greedy tokens equal the
loop's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.bench_memory import BUNDLE
from bench.measure import GB, PeakSampler, proc_status, run_json_child
from bench.report import Target, markdown_table, write_section

SR = 24_000
TARGET_BATCH = 3.0


def _music(seconds: float, offset_s: float = 0.0) -> np.ndarray:
    """Synthesised test music (the 10 s clip of the test assets), tiled to ``seconds``, from ``offset_s``."""
    from mullama_sdk.audio import load_audio
    from testkit.audio import write_test_audio

    with tempfile.TemporaryDirectory() as tmp:
        clip = load_audio(write_test_audio(Path(tmp))["music_24k_mono_10s.wav"])
    n, off = round(seconds * SR), round(offset_s * SR)
    return np.ascontiguousarray(np.tile(clip, -(-(n + off) // len(clip)) + 1)[off:off + n], np.float32)


def _write_wav(path: Path, seconds: float) -> Path:
    import soundfile as sf

    sf.write(path, _music(seconds), SR, subtype="PCM_16")
    return path


# ------------------------------------------------------------------------------------------------ encode
def _child_encode(args: argparse.Namespace) -> None:
    from mullama_sdk import Captioner

    cap = Captioner.from_pretrained(args.bundle, device="cpu", encoder_precision=args.precision, n_threads=2)
    cap.encode(_music(1.0), sample_rate=SR)  # warm-up: lazy initialisation, small arena
    before = proc_status()
    sampler = PeakSampler()
    sampler.start()
    t0 = time.perf_counter()
    vec = cap.encode(args.audio)
    seconds = time.perf_counter() - t0
    peak = sampler.stop()
    print(json.dumps({"seconds": seconds, "audio_s": vec.duration_s, "windows": len(vec.window_bounds_s),
                      "rss_loaded": before["VmRSS"], "peak_rss": peak["VmRSS"], "peak_anon": peak["RssAnon"],
                      "anon_loaded": before["RssAnon"], "hwm": proc_status()["VmHWM"]}))
    cap.close()


def run_encode(bundle: Path, args: argparse.Namespace) -> tuple[str, list[Target], list[str]]:
    lengths = [s for s in args.seconds if args.max_seconds is None or s <= args.max_seconds]
    rng = random.Random(args.seed)
    results: dict[tuple[str, float], list[dict]] = {(p, s): [] for p in args.precisions for s in lengths}
    with tempfile.TemporaryDirectory() as tmp:
        files = {s: _write_wav(Path(tmp) / f"music_{s:g}s.wav", s) for s in lengths}
        for r in range(args.rounds):
            jobs = [(p, s) for p in args.precisions for s in lengths]
            rng.shuffle(jobs)
            for p, s in jobs:
                cmd = [sys.executable, "-m", "bench.bench_scaling", "--child-encode", "--bundle", str(bundle),
                       "--precision", p, "--audio", str(files[s])]
                out = run_json_child(cmd, f"encode child ({p}, {s} s)")
                results[(p, s)].append(out)
                print(f"round {r + 1}/{args.rounds} {p} {s:g} s: {out['seconds']:.1f} s, peak RSS "
                      f"+{(out['peak_rss'] - out['rss_loaded']) / GB:.2f} GB", flush=True)

    rows, targets, notes = [], [], []
    for p in args.precisions:
        fit_x, fit_y = [], []
        for s in lengths:
            rs = results[(p, s)]
            t = statistics.median(r["seconds"] for r in rs)
            peak = max(r["peak_rss"] - r["rss_loaded"] for r in rs)
            if s >= 30:
                fit_x += [s] * len(rs)
                fit_y += [r["seconds"] for r in rs]
            rows.append([p, f"{s:g}", rs[0]["windows"], f"{t:.2f}", f"{t / s:.4f}",
                         f"{max(r['seconds'] for r in rs) / min(r['seconds'] for r in rs) - 1:.0%}",
                         f"{statistics.median(r['rss_loaded'] for r in rs) / GB:.2f}", f"{peak / GB:.2f}",
                         f"{max(r['hwm'] for r in rs) / GB:.2f}"])
        if len(set(fit_x)) >= 2:
            b, a = np.polyfit(fit_x, fit_y, 1)
            pred = np.polyval([b, a], fit_x)
            r2 = 1 - np.sum((np.array(fit_y) - pred) ** 2) / np.sum((np.array(fit_y) - np.mean(fit_y)) ** 2)
            per_s = [statistics.median(r["seconds"] for r in results[(p, s)]) / s for s in lengths if s >= 30]
            spread = max(per_s) / min(per_s) - 1
            notes.append(f"{p}: time = {a:.2f} s + {b:.4f} s x audio seconds for 30 s and longer (R^2 {r2:.4f}); "
                         f"seconds per audio second vary by {spread:.1%} from 30 s to {max(lengths):g} s.")
            targets.append(Target(f"{p} encode time linear in length (s per audio-s, 30 s .. {max(lengths):g} s)",
                                  "linear", f"slope {b:.4f} s/s, spread {spread:.1%}, R^2 {r2:.4f}",
                                  spread <= 0.15))
        peaks = {s: max(r["peak_rss"] - r["rss_loaded"] for r in results[(p, s)]) for s in lengths}
        multi = [s for s in lengths if s >= 60]  # two windows or more
        if len(multi) >= 2:
            lo, hi = peaks[min(multi)], max(peaks[s] for s in multi)
            targets.append(Target(f"{p} peak RSS flat in length ({min(multi):g} s .. {max(multi):g} s)", "flat",
                                  f"{lo / GB:.2f} -> {hi / GB:.2f} GB above the loaded RSS",
                                  hi <= 1.1 * lo + 0.05 * GB))
            if 30 in peaks:
                notes.append(f"{p}: peak RSS+ {peaks[30] / GB:.2f} GB for one 30 s window, {lo / GB:.2f} GB from two "
                             f"windows on: ONNX Runtime's CPU arena grows once more during the second run of the "
                             f"same shape (see the memory section), then stays; nothing grows with the length.")
    table = markdown_table(["encoder", "audio s", "windows", "median s", "s per audio-s", "spread", "RSS loaded GB",
                            "peak RSS+ GB", "VmHWM GB"], rows)
    body = (f"`Captioner.encode(path)` (streamed from a WAV file in 30 s windows), MERT-330M shape (1024 x 24 "
            f"layers), 2 threads, a fresh process per measurement, {args.rounds} rounds in random order. "
            f"Peak RSS+ = the highest RSS sampled during the encode minus the RSS after loading and a 1 s warm-up.\n\n"
            + table)
    if args.max_seconds is not None:
        notes.append(f"Lengths above --max-seconds {args.max_seconds:g} were left out.")
    notes.append("Short clips are cheaper per second than 30 s windows: attention inside a window grows with the "
                 "square of its length, so a 5 s clip costs less per second; from 30 s on every window is "
                 "(nearly) 30 s and the cost per second is constant.")
    return body, targets, notes


# ------------------------------------------------------------------------------------------------- batch
def run_batch(bundle: Path, args: argparse.Namespace) -> tuple[str, list[Target], list[str]]:
    from mullama_sdk import Captioner

    n = args.batch
    clips = [_music(args.clip_seconds, offset_s=1.1 * i) for i in range(n)]
    cap = Captioner.from_pretrained(bundle, device="cpu", encoder_precision=args.batch_precision,
                                    quant=args.quant, n_threads=2, n_ctx=256, batch_size=n)
    kw = {"sample_rate": SR, "max_new_tokens": args.new_tokens, "temperature": 0}
    # Warm-up: allocate both contexts and the ORT arena.
    cap.caption_batch(clips[:2], max_new_tokens=2, sample_rate=SR, temperature=0)
    cap.caption(clips[0], max_new_tokens=2, sample_rate=SR, temperature=0)

    def batch():
        return cap.caption_batch(clips, **kw)

    def loop():
        return [cap.caption(c, **kw) for c in clips]

    runs: dict[str, list[dict]] = {"loop": [], "batch": []}
    rng = random.Random(args.seed)
    outputs = {}
    for r in range(args.batch_rounds):
        for name in rng.sample(["loop", "batch"], 2):
            t0 = time.perf_counter()
            caps = batch() if name == "batch" else loop()
            wall = time.perf_counter() - t0
            outputs[name] = caps
            tm = [c.timings for c in caps]
            llm_prefill = (tm[0].prefill_ms if name == "batch" else sum(t.prefill_ms for t in tm)) / 1e3
            llm_decode = (tm[0].decode_ms if name == "batch" else sum(t.decode_ms for t in tm)) / 1e3
            runs[name].append({"wall": wall, "tokens": sum(len(c.tokens) for c in caps),
                               "encode": sum(t.encode_ms + t.adapter_ms for t in tm) / 1e3,
                               "prefill": llm_prefill, "decode": llm_decode,
                               "prompt": sum(t.n_prompt_tokens for t in tm),
                               "steps": max(len(c.tokens) for c in caps)})
            print(f"round {r + 1}/{args.batch_rounds} {name}: {wall:.1f} s, {runs[name][-1]['tokens']} tokens",
                  flush=True)
    cap.close()
    scan = _decode_scan(bundle / f"llm.{args.quant}.gguf", n, args.seed)
    # Same comparison with exact arithmetic (flash attention off, F32 KV): batch must equal the loop.
    with Captioner.from_pretrained(bundle, device="cpu", encoder_precision=args.batch_precision, quant=args.quant,
                                   n_threads=2, n_ctx=256, batch_size=n, exact=True) as ex:
        vecs = [ex.encode(c, sample_rate=SR) for c in clips]
        ekw = {"max_new_tokens": args.exact_tokens, "temperature": 0}
        same_exact = sum(a.tokens == b.tokens for a, b in zip([ex.caption(v, **ekw) for v in vecs],
                                                             ex.caption_batch(vecs, **ekw)))

    same = sum(a.tokens == b.tokens for a, b in zip(outputs["loop"], outputs["batch"]))
    ratios = [lo["wall"] / ba["wall"] * ba["tokens"] / lo["tokens"] if lo["tokens"] else float("nan")
              for lo, ba in zip(runs["loop"], runs["batch"])]
    ratio = statistics.median(ratios)
    rows = []
    med = {}
    for name, label in (("loop", f"{n} x `caption`"), ("batch", f"`caption_batch` of {n}")):
        rs = runs[name]
        m = sorted(rs, key=lambda r: r["wall"])[(len(rs) - 1) // 2]  # the median round, whole: parts add up
        med[name] = m
        other = m["wall"] - m["encode"] - m["prefill"] - m["decode"]
        rows.append([label, f"{m['wall']:.1f}", f"{m['tokens']:.0f}", f"{m['tokens'] / m['wall']:.1f}",
                     f"{m['encode']:.1f} ({m['encode'] / m['wall']:.0%})",
                     f"{m['prefill']:.1f} ({m['prefill'] / m['wall']:.0%})",
                     f"{m['decode']:.1f} ({m['decode'] / m['wall']:.0%})", f"{other:.1f}"])
    table = markdown_table(["variant", "wall s", "tokens", "tokens/s", "encoder s (share)", "prefill s (share)",
                            "decode s (share)", "other s"], rows)
    lo, ba = med["loop"], med["batch"]
    llm_ratio = (lo["prefill"] + lo["decode"]) / (ba["prefill"] + ba["decode"])
    step_1 = 1e3 * lo["decode"] / max(lo["tokens"] - n, 1)  # the first token of each clip comes from prefill
    step_n = 1e3 * ba["decode"] / max(ba["steps"] - 1, 1)
    pre_1 = 1e3 * lo["prefill"] / lo["prompt"]
    pre_n = 1e3 * ba["prefill"] / ba["prompt"]
    body = (f"{n} clips of {args.clip_seconds:g} s, {args.new_tokens} new tokens each, greedy; encoder "
            f"{args.batch_precision}, LLM `{args.quant}` (LLaMA-2-7B widths, {BUNDLE['n_layers']} layers), 2 threads, "
            f"{args.batch_rounds} rounds, in random order; the rows show the round with the median wall time, the ratio "
            f"is the median of the per-round ratios.\n\n{table}\n\n"
            + markdown_table(["", "1 sequence (loop)", f"{n} sequences (batch)", "batch / loop"], [
                ["decode: ms per step", f"{step_1:.1f}", f"{step_n:.1f}", f"{step_n / step_1:.2f}x"],
                ["decode: ms per generated token", f"{step_1:.1f}", f"{step_n / n:.1f}", f"{step_1 / (step_n / n):.2f}x faster"],
                ["prefill: ms per prompt token", f"{pre_1:.2f}", f"{pre_n:.2f}", f"{pre_1 / pre_n:.2f}x faster"],
            ]))
    body += ("\n\nDecode step vs sequences in the batch (plain llama.cpp on the same GGUF, 2 threads, one context per "
             "batch size, sizes in random order at every step, medians):\n\n"
             + markdown_table(["sequences", "ms per step", "vs 1 sequence", "tokens/s", "tokens/s vs 1"],
                              [[k, f"{v:.1f}", f"{v / scan[1]:.2f}x", f"{1e3 * k / v:.0f}",
                                f"{k * scan[1] / v:.2f}x"] for k, v in scan.items()]))
    targets = [Target(f"caption_batch vs caption loop, N = {n}: throughput (tokens/s incl. encoding)", ">= 3x",
                      f"{ratio:.2f}x", ratio >= TARGET_BATCH)]
    notes = [f"LLM part alone (prefill + decode): {llm_ratio:.2f}x. Greedy captions identical between batch and "
             f"loop: {same}/{n} with the default arithmetic (flash attention, F16 KV cache: a batch sums in another "
             f"order, and this random model's top tokens are near-ties, so a pick can flip), {same_exact}/{n} "
             f"({args.exact_tokens} tokens each) with `exact=True` (no flash attention, F32 KV cache). With a quantized "
             f"GGUF llama.cpp also rounds the activations to 8 bits before each matrix product, and a row's position "
             f"in a batch changes the summation order slightly, which flips some of those roundings: plain llama.cpp "
             f"(no hook) gives the same prompt logits for the first sequence of a batch as alone (2e-6) but differs "
             f"by ~0.06-0.08 for the others, with q4_k_m and q8_0 alike (checked separately), so near-tied greedy "
             f"picks of this random model can still flip; the hook adds nothing to that."]
    if ratio < TARGET_BATCH:
        notes.append(
            f"Why not {TARGET_BATCH:g}x: in caption_batch a decode step for {n} sequences costs "
            f"{step_n / step_1:.1f}x a single-sequence step (plain llama.cpp: {scan[n] / scan[1]:.1f}x, scan "
            f"table). Batching shares the weight reads between the sequences but not the multiply-adds, which "
            f"grow with the number of rows; batching pays off as far as decode is bandwidth-bound, and with 4-bit "
            f"weights on 2 cores unpacking and multiplying take most of a step (see the bandwidth section). The "
            f"prefill is the same arithmetic in both (one batch of all prompts runs it {pre_1 / pre_n:.1f}x faster per "
            f"token: {pre_1:.2f} vs {pre_n:.2f} ms); with {lo['prompt'] / n:.0f}-token prompts it is "
            f"{lo['prefill'] / lo['wall']:.0%} of the loop's time. The encoder ({lo['encode'] / lo['wall']:.0%} of the "
            f"loop's time) runs clip by clip in both, so it caps the overall ratio.")
    return body, targets, notes


def _decode_scan(gguf: Path, n_max: int, seed: int, steps: int = 24) -> dict[int, float]:
    """Median ms of one decode step with k sequences, k = 1, 2, 4, ... n_max (interleaved)."""
    from mullama_sdk.llm import LlamaContext, LlamaModel

    sizes = sorted({1, n_max} | {k for k in (2, 4, 8, 16) if k < n_max})
    model = LlamaModel(gguf)
    prompt = 8
    ctxs = {k: LlamaContext(model, None, n_ctx=k * (prompt + steps + 8), n_seq_max=k, n_threads=2) for k in sizes}
    rng = random.Random(seed)
    tok = [rng.randrange(3, model.n_vocab) for _ in range(prompt + steps)]
    for k, c in ctxs.items():
        c.decode(tok[:prompt] * k, list(range(prompt)) * k, [j for j in range(k) for _ in range(prompt)],
                 [False] * (prompt * k - 1) + [True])
    times: dict[int, list[float]] = {k: [] for k in sizes}
    for i in range(prompt, prompt + steps):
        for k in rng.sample(sizes, len(sizes)):
            t0 = time.perf_counter()
            ctxs[k].decode([tok[i]] * k, [i] * k, list(range(k)), [True] * k)
            times[k].append(1e3 * (time.perf_counter() - t0))
    for c in ctxs.values():
        c.close()
    model.close()
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", nargs="+", choices=["encode", "batch"], default=["encode", "batch"])
    ap.add_argument("--seconds", type=float, nargs="+", default=[5, 30, 60, 120, 600])
    ap.add_argument("--max-seconds", type=float, default=None, help="leave out longer audio lengths")
    ap.add_argument("--rounds", type=int, default=2, help="encode: processes per length")
    ap.add_argument("--precisions", nargs="+", default=["int8"], choices=["int8", "fp32"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--clip-seconds", type=float, default=5.0)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch-rounds", type=int, default=3)
    ap.add_argument("--exact-tokens", type=int, default=16, help="tokens of the exact-arithmetic equality check")
    ap.add_argument("--batch-precision", default="int8", choices=["int8", "fp32"])
    ap.add_argument("--quant", default="q4_k_m", choices=["q4_k_m", "q8_0"])
    ap.add_argument("--quick", action="store_true",
                    help="encode 5/30/60 s once, batch 1 round of 16 tokens (for trying things)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child-encode", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bundle", help=argparse.SUPPRESS)
    ap.add_argument("--precision", help=argparse.SUPPRESS)
    ap.add_argument("--audio", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_encode:
        _child_encode(args)
        return 0
    if args.quick:
        args.seconds, args.rounds, args.batch_rounds, args.new_tokens = [5, 30, 60], 1, 1, 16

    from bench import assets

    t0 = time.perf_counter()
    bundle = assets.shape_bundle(**BUNDLE)
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; bundle ready in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    for part in args.part:
        t1 = time.perf_counter()
        load0 = os.getloadavg()[0]
        body, targets, notes = run_encode(bundle, args) if part == "encode" else run_batch(bundle, args)
        notes.append(f"Load average (1 min) {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, on "
                     f"{os.cpu_count()} CPUs (above ~1, other jobs shared the cores); wall time "
                     f"{(time.perf_counter() - t1) / 60:.1f} min.")
        print(f"\n{body}\n({part}: {time.perf_counter() - t1:.0f} s)", flush=True)
        if part == "encode":
            write_section("scaling", "Scaling: encoder time and memory vs audio length", body, targets,
                          notes="\n\n".join(notes))
        else:
            write_section("scaling_batch", "Scaling: caption_batch vs a caption loop", body, targets,
                          notes="\n\n".join(notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
