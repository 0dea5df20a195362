"""End to end, audio file -> 64 caption tokens: the SDK (int8 encoder + q4_k_m llama.cpp) vs the torch reference.

Launch:  .venv/bin/python -m bench.bench_end_to_end [--layers 6 --rounds 3 --lengths 10 60 --no-bf16 --quick]

Model: random weights at real widths - MERT-v1-330M (1024 wide, 24 layers), the MU-LLaMA adapter, LLaMA-2-7B
widths (4096 / FFN 11008 / 32 heads / vocab 32000) with ``--layers`` LLaMA layers (the real model has 32; the
torch float32 reference of all 32 would need ~35 GB). Built once with the product's own code
(:func:`testkit.make_assets.build_shape_assets`, then :func:`export.build.build_bundle` with q4_k_m and an
int8 encoder; its ONNX checks against torch run as in any export, the LLM check is skipped, see
:func:`bench.end_to_end_assets.build_bundle_q4_int8`) and cached in ``~/.cache/mullama/bench/e2e-<shape>/`` (``$MULLAMA_BENCH_CACHE``
overrides the root); the first run reports how long that took.

Measured, for each clip length (a synthesised song, 24 kHz mono WAV), each variant in a fresh process per
measurement (variants alternate, their order reversed every round, ``--rounds`` rounds, medians):

* ``sdk``: ``Captioner.from_pretrained(bundle, n_threads=2)`` then ``caption(path, temperature=0,
  max_new_tokens=64)``; the encoder runs on windows of at most 30 s (frame-weighted mean).
* ``torch fp32`` / ``torch bf16``: :func:`training.reference.build.load_reference` (LLaMA in that dtype; MERT and the
  adapter always float32), ``torch.set_num_threads(2)``, then the steps of ``MullamaModel.generate`` (load
  audio, ``state_means`` with its default 30 s windows - the same windows and math as the SDK - music query,
  KV-cached ``generate_from_query``). The published MU-LLaMA code encodes the first 60 s in ONE window instead;
  ``--ref-window 60`` measures that (slower and larger: eager attention over 4500 frames).

torch bf16 costs ~4 min per round, so it runs in the first ``--bf16-rounds`` (1) rounds only.

Both sides generate exactly ``--tokens`` tokens greedily: a sampler that bans EOS (the random model may emit
it) picks every token and stamps its time; the first stamp is the time to first token (TTFT, from the call
with the audio path; model loading is reported apart), the stamps give decode ms/token. Peak RSS is the
process's VmHWM: at load, then reset (``/proc/self/clear_refs``), and during captioning; the peak is the
larger. Ratios are medians of per-round paired ratios against torch fp32 (same round, minutes apart).

32-layer estimate: encoder unchanged; the SDK adapter grows with the injected layers (20 at 32 layers;
``min(20, layers)`` here); prefill scales with the layer count; decode per token with the weight bytes read
per token (layers + output head); RSS grows by the resident bytes of the extra layers (weights, KV cache
and, for torch, the float16 checkpoint pages its loader leaves mapped). See
:func:`bench.end_to_end_stats.extrapolate_to_real_layers`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from bench.end_to_end_assets import PRECISION, QUANT, child_build, clip, ensure_assets
from bench.end_to_end_stats import (
    REAL_INJECT,
    REAL_LAYERS,
    common_prefix_len,
    extrapolate_to_real_layers,
    median_of,
    paired_ratio,
    peak_rss,
    sdk_sizes,
    total_of,
    ttft_of,
)
from bench.measure import GB, cpu_wait_share, mapped_rss, proc_status, reset_peak, run_json_child, sched_times
from bench.report import Target, markdown_table, write_section

VARIANTS = {"sdk": "SDK int8 + q4_k_m", "ref-fp32": "torch fp32", "ref-bf16": "torch bf16"}
TARGET_SPEEDUP = 5.0
TARGET_RSS = 0.35
CHILD_TIMEOUT_S = 3600

# ---------------------------------------------------------------------------------------- the EOS ban
def _forced_sampler_class():
    """A greedy :class:`~mullama_sdk.sampling.Sampler` that never picks EOS and stamps each pick's time."""
    from mullama_sdk.sampling import Sampler

    class ForcedSampler(Sampler):
        eos_id = 2
        stamps: list[float] = []
        eos_banned = 0

        def pick(self, logits: np.ndarray) -> int:
            z = np.array(logits, dtype=np.float32, copy=True).reshape(-1)
            if 0 <= self.eos_id < len(z):
                ForcedSampler.eos_banned += int(np.argmax(z) == self.eos_id)
                z[self.eos_id] = -np.inf
            token = super().pick(z)
            ForcedSampler.stamps.append(time.perf_counter())
            return token

    return ForcedSampler


# ----------------------------------------------------------------------------------------------- children
def _child_sdk(a: argparse.Namespace) -> dict:
    import mullama_sdk.options as capmod
    from mullama_sdk import Captioner

    bundle = Path(a.dir) / "bundle"
    t0 = time.perf_counter()
    cap = Captioner.from_pretrained(bundle, device="cpu", n_threads=a.threads, quant=QUANT,
                                    encoder_precision=PRECISION)
    load_s = time.perf_counter() - t0
    at_load = proc_status()
    reset = reset_peak()
    forced = _forced_sampler_class()
    forced.eos_id = cap.manifest.eos_id
    capmod.Sampler = lambda t, p, seed: forced(t, p, seed)  # what GenerationOptions.new_sampler builds
    sched = sched_times()
    t_start = time.perf_counter()
    res = cap.caption(a.audio, max_new_tokens=a.tokens, temperature=0.0)
    t_end = time.perf_counter()
    cpu_wait = cpu_wait_share(sched)
    end = proc_status()
    m = cap.manifest
    files = [bundle / m.llm[QUANT], bundle / m.encoder[PRECISION], bundle / m.adapter[PRECISION]]
    mapped = mapped_rss(files)
    tm = res.timings
    out = {
        "load_s": load_s, "encode_s": tm.encode_ms / 1e3, "adapter_s": tm.adapter_ms / 1e3,
        "prefill_s": tm.prefill_ms / 1e3, "ttft_s": forced.stamps[0] - t_start, "total_s": t_end - t_start,
        "decode_s_per_token": _per_token(forced.stamps), "tokens": list(res.tokens), "n_prompt": len(res.prompt_tokens),
        "stop_reason": res.stop_reason, "eos_banned": forced.eos_banned, "windows": len(_windows(a, m)),
        "rss_load_peak": at_load["VmHWM"], "rss_after_load": at_load["VmRSS"], "rss_run_peak": end["VmHWM"],
        "peak_reset": reset, "rss_anon_end": end["RssAnon"], "rss_file_end": end["RssFile"], "mapped": mapped,
        "n_ctx": cap.n_ctx, "cpu_wait": cpu_wait,
    }
    cap.close()
    return out


def _windows(a: argparse.Namespace, manifest) -> list[tuple[int, int]]:
    import soundfile as sf

    from mullama_sdk.audio import window_bounds

    n = sf.info(a.audio).frames
    return window_bounds(n, max_window_samples=int(manifest.max_window_seconds * manifest.sample_rate))


def _per_token(stamps: list[float]) -> float:
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else float("nan")


def _child_ref(a: argparse.Namespace, dtype_name: str) -> dict:
    import torch

    from mullama_sdk.audio import load_audio
    from training.reference.build import load_reference

    torch.set_num_threads(a.threads)
    d = Path(a.dir)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    t0 = time.perf_counter()
    model = load_reference(d / "checkpoint.pth", d / "llama", d / "mert", dtype=dtype)
    load_s = time.perf_counter() - t0
    at_load = proc_status()
    reset = reset_peak()
    forced = _forced_sampler_class()
    forced.eos_id = model.tokenizer.eos_id
    sampler = forced(0.0, 1.0, 0)
    sched = sched_times()
    with torch.inference_mode():
        t_start = time.perf_counter()
        wave = load_audio(a.audio)
        means, _frames = model.state_means(wave, max_window_seconds=a.ref_window)
        t_enc = time.perf_counter()
        query = model.music_query(means)
        t_ad = time.perf_counter()
        prompt = model.tokenizer.encode_prompt(None)
        gen = model.generate_from_query(query, prompt, sampler, a.tokens)
        t_end = time.perf_counter()
    cpu_wait = cpu_wait_share(sched)
    end = proc_status()
    # llama/consolidated.00.pth (real-width assets) or llama/7B/consolidated.00.pth (tiny: Meta's layout)
    mapped = mapped_rss([d / "checkpoint.pth", *sorted((d / "llama").rglob("consolidated.00.pth"))[:1]])
    layer0 = dict(model.llama.layers[0].named_parameters())
    base = {f"attention.{w}.weight" for w in ("wq", "wk", "wv", "wo")}
    base |= {f"feed_forward.{w}.weight" for w in ("w1", "w2", "w3")}
    n_windows = -(-len(wave) // int(a.ref_window * 24000))
    return {
        "load_s": load_s, "encode_s": t_enc - t_start, "adapter_s": t_ad - t_enc,
        "prefill_s": forced.stamps[0] - t_ad, "ttft_s": forced.stamps[0] - t_start, "total_s": t_end - t_start,
        "decode_s_per_token": _per_token(forced.stamps), "tokens": gen.tokens, "n_prompt": len(prompt),
        "stop_reason": "eos" if gen.stopped_at_eos else "max_new_tokens", "eos_banned": forced.eos_banned,
        "windows": n_windows, "cpu_wait": cpu_wait,
        "rss_load_peak": at_load["VmHWM"], "rss_after_load": at_load["VmRSS"], "rss_run_peak": end["VmHWM"],
        "peak_reset": reset, "rss_anon_end": end["RssAnon"], "rss_file_end": end["RssFile"], "mapped": mapped,
        # Bytes per LLaMA layer: as held by the model, and as stored in checkpoint.pth (fp16 base matrices,
        # fp16 gate, fp32 trained parts) - the loader's mapped source pages.
        "layer_bytes": sum(p.numel() * p.element_size() for p in layer0.values()),
        "layer_ckpt_bytes": sum(p.numel() * (2 if k in base or k == "attention.gate" else 4)
                                for k, p in layer0.items()),
        "head_bytes": model.llama.output.weight.numel() * model.llama.output.weight.element_size(),
        # The music term re-reads the base Wv of every injected layer at every forward (one adapter token).
        "wv_bytes": model.llama.layers[0].attention.wv.weight.numel()
        * model.llama.layers[0].attention.wv.weight.element_size(),
        "n_inject": len(model.inject_layers),
        "kv_bytes_per_layer": 2 * (len(prompt) + a.tokens) * model.config.llama.dim
        * model.llama.output.weight.element_size(),
    }


def _run_child(argv: list[str]) -> dict:
    """Run one measurement in a fresh interpreter and return its JSON result."""
    return run_json_child([sys.executable, "-m", "bench.bench_end_to_end", *argv], f"child {argv[:2]}",
                          timeout=CHILD_TIMEOUT_S)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=6, help="LLaMA layers of the random model (real: 32)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--lengths", type=float, nargs="+", default=[10.0, 60.0], help="clip lengths, seconds")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens generated (EOS is banned)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-bf16", action="store_true", help="skip the torch bfloat16 variant")
    ap.add_argument("--bf16-rounds", type=int, default=1,
                    help="rounds that include torch bf16 (the first N; it adds ~4 min per round)")
    ap.add_argument("--ref-window", type=float, default=30.0,
                    help="torch encoder window, seconds (30 = the reference's and the SDK's; 60 = published code)")
    ap.add_argument("--quick", action="store_true", help="tiny model (plumbing check, seconds)")
    ap.add_argument("--no-report", action="store_true", help="do not write bench/results/end_to_end.md")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ap.add_argument("--audio", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a.child:
        if a.child.startswith("build-"):
            res = child_build(a)
        elif a.child == "sdk":
            res = _child_sdk(a)
        else:
            res = _child_ref(a, a.child.removeprefix("ref-"))
        print(json.dumps(res), flush=True)
        return 0

    t_begin = time.perf_counter()
    folder, built = ensure_assets(a.quick, a.layers, a.threads)
    build = built or json.loads((folder / "build.json").read_text())
    layers = json.loads(sorted((folder / "llama").rglob("params.json"))[0].read_text())["n_layers"]
    sizes = sdk_sizes(folder)
    variants = ["sdk", "ref-fp32"] + ([] if a.no_bf16 or a.bf16_rounds < 1 else ["ref-bf16"])
    load_avg = [os.getloadavg()[0]]
    clips = {s: clip(folder, s) for s in a.lengths}
    print(f"{folder}: LLaMA {sizes['n_embd']} x {layers} layers ({sizes['n_inject']} injected), "
          f"{a.rounds} rounds x {len(a.lengths)} lengths x {len(variants)} variants, {a.threads} threads, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)

    results: dict[tuple[str, float, int], dict] = {}
    for rnd in range(a.rounds):
        for s in a.lengths:
            this = [v for v in variants if v != "ref-bf16" or rnd < a.bf16_rounds]
            order = this if rnd % 2 == 0 else this[::-1]
            for v in order:
                child = ["--child", v, "--dir", str(folder), "--audio", str(clips[s]), "--tokens", str(a.tokens),
                         "--threads", str(a.threads), "--ref-window", str(a.ref_window)]
                r = _run_child(child)
                results[(v, s, rnd)] = r
                print(f"round {rnd + 1}/{a.rounds} {s:g} s {v:9}: load {r['load_s']:6.1f} s  TTFT "
                      f"{r['ttft_s']:7.2f} s  total {r['total_s']:7.2f} s  peak {peak_rss(r) / GB:5.2f} GB  "
                      f"CPU wait {r['cpu_wait']:4.0%}  ({len(r['tokens'])} tokens, {r['eos_banned']} EOS banned)", flush=True)
    wall = time.perf_counter() - t_begin
    load_avg.append(os.getloadavg()[0])

    # ---- tables
    header = ["clip", "variant", "load s", "encode s", "adapter s", "prefill s", "TTFT s", "decode ms/tok",
              "total s", "peak RSS GB (load / run)", "TTFT x", "total x", "RSS x", "CPU wait"]
    est_header = ["clip", "variant", "encode s", "adapter s", "prefill s", "TTFT s", "decode ms/tok", "total s",
                  "peak RSS GB", "TTFT x", "total x", "RSS x"]
    rows, est_rows, targets, checks, vs_bf16 = [], [], [], [], []
    ext: dict[tuple[str, float], dict] = {}
    for s in a.lengths:
        for v in variants:
            rs = [results[(v, s, r)] for r in range(a.rounds) if (v, s, r) in results]
            e = ext[(v, s)] = extrapolate_to_real_layers(v, rs, sizes, layers)
            ttft_x = paired_ratio(results, s, a.rounds, "ref-fp32", v, ttft_of)
            total_x = paired_ratio(results, s, a.rounds, "ref-fp32", v, total_of)
            rss_x = paired_ratio(results, s, a.rounds, v, "ref-fp32", peak_rss)
            rows.append([f"{s:g} s", VARIANTS[v], f"{median_of(rs, 'load_s'):.1f}", f"{median_of(rs, 'encode_s'):.2f}",
                         f"{median_of(rs, 'adapter_s'):.2f}", f"{median_of(rs, 'prefill_s'):.2f}", f"{median_of(rs, 'ttft_s'):.2f}",
                         f"{1e3 * median_of(rs, 'decode_s_per_token'):.0f}", f"{median_of(rs, 'total_s'):.1f}",
                         f"{e['peak_measured'] / GB:.2f} "
                         f"({median_of(rs, 'rss_load_peak') / GB:.2f} / {median_of(rs, 'rss_run_peak') / GB:.2f})",
                         f"{ttft_x:.2f}x", f"{total_x:.2f}x", f"{rss_x:.2f}x",
                         f"{statistics.median(r['cpu_wait'] for r in rs):.0%}"])
        f = ext[("ref-fp32", s)]
        for v in variants:
            e = ext[(v, s)]
            est_rows.append([f"{s:g} s", VARIANTS[v], f"{e['encode_s']:.2f}", f"{e['adapter_s']:.2f}",
                             f"{e['prefill_s']:.2f}", f"{e['ttft_s']:.2f}", f"{1e3 * e['decode_s_per_token']:.0f}",
                             f"{e['total_s']:.1f}", f"{e['peak'] / GB:.2f}", f"{f['ttft_s'] / e['ttft_s']:.2f}x",
                             f"{f['total_s'] / e['total_s']:.2f}x", f"{e['peak'] / f['peak']:.2f}x"])
        ttft_x = paired_ratio(results, s, a.rounds, "ref-fp32", "sdk", ttft_of)
        total_x = paired_ratio(results, s, a.rounds, "ref-fp32", "sdk", total_of)
        rss_x = paired_ratio(results, s, a.rounds, "sdk", "ref-fp32", peak_rss)
        e = ext[("sdk", s)]
        tag = f"at {layers} layers"
        targets += [
            Target(f"{s:g} s clip: TTFT, SDK vs torch fp32", f">= {TARGET_SPEEDUP:g}x faster",
                   f"{ttft_x:.2f}x {tag} (32-layer estimate {f['ttft_s'] / e['ttft_s']:.2f}x)",
                   ttft_x >= TARGET_SPEEDUP),
            Target(f"{s:g} s clip: total for {a.tokens} tokens, SDK vs torch fp32", f">= {TARGET_SPEEDUP:g}x faster",
                   f"{total_x:.2f}x {tag} (32-layer estimate {f['total_s'] / e['total_s']:.2f}x)",
                   total_x >= TARGET_SPEEDUP),
            Target(f"{s:g} s clip: peak RSS, SDK / torch fp32", f"<= {TARGET_RSS:g}x",
                   f"{rss_x:.2f}x {tag} (32-layer estimate {e['peak'] / f['peak']:.2f}x)", rss_x <= TARGET_RSS),
        ]
        if "ref-bf16" in variants:
            b = ext[("ref-bf16", s)]
            vs_bf16.append(
                f"{s:g} s: TTFT {paired_ratio(results, s, a.rounds, 'ref-bf16', 'sdk', ttft_of):.2f}x, total "
                f"{paired_ratio(results, s, a.rounds, 'ref-bf16', 'sdk', total_of):.2f}x, RSS "
                f"{paired_ratio(results, s, a.rounds, 'sdk', 'ref-bf16', peak_rss):.2f}x (32-layer estimate "
                f"{b['ttft_s'] / e['ttft_s']:.2f}x / {b['total_s'] / e['total_s']:.2f}x / {e['peak'] / b['peak']:.2f}x)")
        sdk_tok = results[("sdk", s, 0)]["tokens"]
        for v in variants[1:]:
            same = common_prefix_len(sdk_tok, results[(v, s, 0)]["tokens"])
            checks.append(f"{s:g} s, SDK vs {VARIANTS[v]}: the first {same} of {a.tokens} greedy tokens are equal")

    body = markdown_table(header, rows)
    est_body = markdown_table(est_header, est_rows)
    print()
    print(f"measured at {layers} LLaMA layers (medians of {a.rounds} rounds; x = vs torch fp32, paired per round)")
    print(body)
    print()
    print(f"estimated at {REAL_LAYERS} LLaMA layers ({REAL_INJECT} injected)")
    print(est_body)
    for t in targets:
        print(t.row())

    last = a.lengths[-1]
    r_sdk, r_ref = results[("sdk", last, 0)], results[("ref-fp32", last, 0)]
    banned = sum(r["eos_banned"] for r in results.values())
    shape = ("tiny widths (plumbing check)" if a.quick else
             "real widths: MERT 1024 x 24 layers, adapter 1024 -> 4096 (3 blocks of 16384), LLaMA 4096 / FFN "
             "11008 / 32 heads / vocab 32000")
    notes = [
        f"Random weights at {shape} with **{layers} LLaMA layers** ({sizes['n_inject']} injected): the torch "
        f"float32 reference of 32 layers (~30 GB) does not fit in this machine's memory. {a.tokens} new tokens, "
        f"greedy, EOS banned on both sides ({banned} EOS picks avoided over all runs), {a.threads} threads, a "
        f"fresh process per measurement, variants alternating over {a.rounds} rounds"
        f"{f' (torch bf16 in the first {min(a.bf16_rounds, a.rounds)})' if 'ref-bf16' in variants else ''}; "
        f"prompt {r_sdk['n_prompt']} tokens on both sides (SDK: llama.cpp's tokenizer, torch: SentencePiece). "
        f"Load average {load_avg[0]:.1f} at the start, {load_avg[1]:.1f} at the end ({os.cpu_count()} CPUs).",
        f"Windows: the SDK encodes at most 30 s per window ({r_sdk['windows']} window(s) for the {last:g} s "
        f"clip); torch `state_means` with {a.ref_window:g} s windows ({r_ref['windows']}). The published "
        "MU-LLaMA code encodes the first 60 s as one window (eager attention over 4500 frames; a torch probe "
        "here took ~3.5 min and +3.3 GB for MERT alone on a busy machine); `--ref-window 60` measures that.",
        "TTFT = from `caption(path)` / `load_audio(path)` to the first picked token: audio decoding, encoder, "
        "adapter, prompt prefill. Load = `Captioner.from_pretrained` / `load_reference` with the files in the "
        "page cache. Peak RSS = VmHWM of the process over load and captioning (each in parentheses); it "
        "includes memory-mapped file pages: the GGUF for the SDK; for torch the checkpoint pages its loader "
        f"read and keeps mapped (the adapter is used in place). At the end of the {last:g} s run: SDK anon "
        f"{r_sdk['rss_anon_end'] / GB:.2f} GB + file {r_sdk['rss_file_end'] / GB:.2f} GB; torch fp32 anon "
        f"{r_ref['rss_anon_end'] / GB:.2f} GB + file {r_ref['rss_file_end'] / GB:.2f} GB.",
        "CPU wait = share of the measured threads' runnable time spent waiting for a core (schedstat), ~0 % on "
        "an idle machine. llama.cpp's threads meet at a spinning barrier after every graph operation (hundreds "
        "per token), so when other processes hold the cores its 2-thread decode slows down far more than torch's "
        "large kernels do: only a run with low CPU wait gives representative SDK/torch ratios.",
        f"32-layer estimate (second table): encoder as measured; SDK adapter scaled by its parameters with "
        f"{REAL_INJECT} instead of {sizes['n_inject']} folded injection matrices (torch computes the injection "
        f"inside the layers); prefill x {REAL_LAYERS}/{layers}; decode per token x the weight bytes read per "
        f"token (SDK {sizes['layer_bytes'] / 1e6:.0f} MB per layer + head {sizes['head_bytes'] / 1e6:.0f} MB; "
        f"torch fp32 {r_ref['layer_bytes'] / 1e6:.0f} MB per layer + Wv again per injected layer + head "
        f"{r_ref['head_bytes'] / 1e6:.0f} MB); peak RSS + {REAL_LAYERS - layers} layers x resident bytes per "
        f"layer (SDK {ext[('sdk', last)]['per_layer_rss'] / 1e6:.0f} MB incl. the F16 KV cache of n_ctx "
        f"{r_sdk['n_ctx']}; torch fp32 {ext[('ref-fp32', last)]['per_layer_rss'] / 1e6:.0f} MB incl. its mapped "
        "float16 source pages). The verdicts use the measured values.",
    ]
    if vs_bf16:
        notes.append("SDK vs torch bf16 (times: bf16 / SDK; RSS: SDK / bf16): " + "; ".join(vs_bf16) + ".")
    notes.append(
        f"Same model on both sides: {'; '.join(checks)} (the SDK runs q4_k_m + int8; random weights give "
        "near-flat logits, so the greedy paths part after a few tokens).")
    b = build
    notes.append(
        f"Assets, cached in `{folder}` ({b.get('bytes', 0) / GB:.1f} GB): sources built in "
        f"{b['build-assets']['seconds']:.0f} s (peak RSS {b['build-assets']['peak_rss'] / GB:.1f} GB), bundle "
        f"export (ONNX checks vs torch on; LLM check off) in {b['build-bundle']['seconds']:.0f} s (peak RSS "
        f"{b['build-bundle']['peak_rss'] / GB:.1f} GB){', by this run' if built else ''}. Wall time of this run "
        f"{wall / 60:.1f} min.")
    print()
    print("\n\n".join(notes))
    if not a.no_report and not a.quick:
        title = f"End to end: audio file -> {a.tokens} tokens, SDK vs torch reference"
        full = (f"Measured at {layers} LLaMA layers (medians of {a.rounds} rounds; x = torch fp32 / variant for "
                f"times, variant / torch fp32 for RSS, paired per round):\n\n{body}\n\n"
                f"Estimated at {REAL_LAYERS} LLaMA layers ({REAL_INJECT} injected):\n\n{est_body}")
        path = write_section("end_to_end", title, full, targets, notes="\n\n".join(notes))
        print(f"\nwrote {path}")
    elif a.quick:
        print("\n(--quick: tiny model, bench/results/end_to_end.md left as it was)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

