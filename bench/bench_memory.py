"""Memory of a loaded Captioner vs the bundle files it loads: does anything sit in memory twice?

Launch:  .venv/bin/python -m bench.bench_memory [--variants int8:q4_k_m int8:q4_k_m:low ... --new-tokens 16]

Bundle: the real-width benchmark bundle of :mod:`bench.assets` (LLaMA-2-7B widths with 4 layers, MERT-v1-330M
shape, MU-LLaMA adapter; random weights). Each variant (encoder precision : GGUF [: ``low`` for
``low_memory=True``]) runs in a fresh child process, which

1. imports everything and initialises llama.cpp (the baseline: libraries are not model memory);
2. ``Captioner.from_pretrained(bundle, encoder_precision=..., quant=..., n_threads=2, low_memory=...)`` ->
   "after load";
3. captions one 10 s clip (greedy, ``--new-tokens`` tokens) -> "after first caption".

At each point it reads ``/proc/self/status`` (VmRSS, RssAnon, RssFile) and ``/proc/self/smaps_rollup``
(PSS; USS = private clean + private dirty). The ratio is (RSS - baseline RSS) / bytes of the files the
Captioner loads (encoder + its external data, adapter, GGUF). The GGUF is memory-mapped: its pages count
in RSS only once touched (llama.cpp touches them all in the first decode), and they are page cache that
other processes mapping the same file share (that is what PSS shows when they do).

Profile (where the excess comes from): each component alone in a fresh process - the encoder and adapter
ONNX Runtime sessions (after creation and after two runs), the GGUF (after load, with a context and a
first decode) - and the knobs that trade that memory for speed: ONNX Runtime's weight prepacking
(``session.disable_prepacking``) and CPU memory arena (``enable_cpu_mem_arena``), llama.cpp's CPU weight
repacking (``llama_model_params.use_extra_bufts``). Their speed cost is measured interleaved in one process
(encoder: 10 s windows in random order; LLM: decode steps in random order; the whole Captioner with and
without ``low_memory``: 10 s captions in random order).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from bench.measure import GB, proc_status, run_json_child, snapshot
from bench.report import Target, markdown_table, write_section

TARGET_RATIO = 1.15
#: The benchmark bundle every CPU benchmark here shares (see bench.assets.shape_bundle).
BUNDLE = {"n_layers": 4, "quants": ("q4_k_m", "q8_0"), "encoder_precisions": ("fp32", "int8")}


# ------------------------------------------------------------------------------------------- child
def _child(args: argparse.Namespace) -> None:
    import llama_cpp  # noqa: F401 - part of the baseline
    import numpy as np
    import onnxruntime  # noqa: F401

    from mullama_sdk import Captioner
    from mullama_sdk.encoder_backend import choose_encoder_backend
    from mullama_sdk.llm import ensure_backend
    from mullama_sdk.manifest import load_manifest
    from native_bridge import InjectionHook
    from testkit.audio import write_test_audio

    prec, quant, *mode = args.variant.split(":")
    low = mode == ["low"]
    bundle = Path(args.bundle)
    manifest = load_manifest(bundle)
    choice = choose_encoder_backend(manifest, device="cpu", encoder_backend="onnxruntime", encoder_precision=prec)
    files = choice.files(manifest) + [manifest.llm[quant]]
    file_bytes = {f: (bundle / f).stat().st_size for f in files}
    audio = write_test_audio(Path(args.tmp))["music_24k_mono_10s.wav"]
    ensure_backend()
    InjectionHook(manifest.dims.n_embd, manifest.dims.n_layer).close()  # compiles/loads the C hook library
    np.zeros(1)
    points = {"baseline": snapshot()}
    t0 = time.perf_counter()
    cap = Captioner.from_pretrained(bundle, device="cpu", encoder_precision=prec, quant=quant, n_threads=2,
                                    low_memory=low)
    load_s = time.perf_counter() - t0
    points["after load"] = snapshot()
    t0 = time.perf_counter()
    res = cap.caption(audio, max_new_tokens=args.new_tokens, temperature=0)
    cap_s = time.perf_counter() - t0
    points["after first caption"] = snapshot()
    cap.caption(audio, max_new_tokens=args.new_tokens, temperature=0, question="What instruments are playing?")
    points["after second caption"] = snapshot()
    print(json.dumps({"variant": args.variant, "files": file_bytes, "points": points, "load_s": load_s,
                      "caption_s": cap_s, "tokens": len(res.tokens), "n_ctx": cap.n_ctx,
                      "hwm": proc_status()["VmHWM"]}))
    cap.close()

#: Component rows of the profile: (label, kind, file, knobs).
COMPONENTS = [
    ("encoder int8", "onnx", "encoder.int8.onnx", {}),
    ("encoder int8, prepacking off", "onnx", "encoder.int8.onnx", {"prepack": False}),
    ("encoder int8, arena off", "onnx", "encoder.int8.onnx", {"arena": False}),
    ("adapter int8", "onnx", "adapter.int8.onnx", {}),
    ("LLM q4_k_m", "llm", "llm.q4_k_m.gguf", {}),
    ("LLM q4_k_m, repack off", "llm", "llm.q4_k_m.gguf", {"repack": False}),
    ("LLM q8_0", "llm", "llm.q8_0.gguf", {}),
]


def _ort_session(path: Path, prepack: bool = True, arena: bool = True):
    import onnxruntime as ort

    from mullama_sdk.encoder_ort import session_options

    return ort.InferenceSession(str(path), session_options(2, prepack=prepack, arena=arena),
                                providers=["CPUExecutionProvider"])


def _llama(path: Path, repack: bool = True):
    from mullama_sdk.llm import LlamaModel

    return LlamaModel(path, repack_weights=repack)


def _ort_feed(sess, rng) -> dict:
    name = sess.get_inputs()[0].name
    if name == "waveform":
        return {name: (0.1 * rng.standard_normal((1, 10 * 24000))).astype("float32")}
    return {name: rng.standard_normal((25, 1024)).astype("float32")}


def _child_component(args: argparse.Namespace) -> None:
    import numpy as np

    from mullama_sdk.llm import LlamaContext, ensure_backend

    label, kind, name, knobs = COMPONENTS[args.child_component]
    path = Path(args.bundle) / name
    files = sum(p.stat().st_size for p in path.parent.glob(name + "*"))
    ensure_backend()
    import onnxruntime  # noqa: F401 - baseline

    rng = np.random.default_rng(0)
    points = {"baseline": snapshot()}
    if kind == "onnx":
        sess = _ort_session(path, **knobs)
        points["loaded"] = snapshot()
        for _ in range(2):
            sess.run(None, _ort_feed(sess, rng))
        points["used"] = snapshot()
    else:
        model = _llama(path, **knobs)
        points["loaded"] = snapshot()
        ctx = LlamaContext(model, None, n_ctx=1024, n_threads=2)
        toks = [int(t) for t in rng.integers(3, model.n_vocab, 76)]
        ctx.decode(toks[:60], range(60), [0] * 60, [False] * 59 + [True])
        for i in range(60, 76):
            ctx.decode([toks[i]], [i], [0], [True])
        points["used"] = snapshot()
    print(json.dumps({"label": label, "files": files, "points": points}))


def _child_speed(args: argparse.Namespace) -> None:
    """Speed cost of the memory knobs, each pair interleaved in this process."""
    import random
    import statistics

    import numpy as np

    from mullama_sdk.llm import LlamaContext, ensure_backend

    bundle = Path(args.bundle)
    rng, order = np.random.default_rng(0), random.Random(0)
    ensure_backend()
    out = {}
    sessions = {"default": _ort_session(bundle / "encoder.int8.onnx"),
                "prepacking off": _ort_session(bundle / "encoder.int8.onnx", prepack=False),
                "arena off": _ort_session(bundle / "encoder.int8.onnx", arena=False)}
    feed = _ort_feed(sessions["default"], rng)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for rep in range(args.speed_reps + 1):
        for k in order.sample(list(sessions), len(sessions)):
            t0 = time.perf_counter()
            sessions[k].run(None, feed)
            if rep:  # the first round is the warm-up
                times[k].append(time.perf_counter() - t0)
    out["encoder"] = {k: statistics.median(v) for k, v in times.items()}
    del sessions
    models = {"default": _llama(bundle / "llm.q4_k_m.gguf"),
              "repack off": _llama(bundle / "llm.q4_k_m.gguf", repack=False)}
    ctxs = {k: LlamaContext(m, None, n_ctx=256, n_threads=2) for k, m in models.items()}
    toks = [int(t) for t in rng.integers(3, models["default"].n_vocab, 16 + args.speed_steps)]
    for c in ctxs.values():
        c.decode(toks[:16], range(16), [0] * 16, [False] * 15 + [True])
    ltimes: dict[str, list[float]] = {k: [] for k in ctxs}
    for i in range(16, 16 + args.speed_steps):
        for k in order.sample(list(ctxs), len(ctxs)):
            t0 = time.perf_counter()
            ctxs[k].decode([toks[i]], [i], [0], [True])
            ltimes[k].append(time.perf_counter() - t0)
    out["llm"] = {k: statistics.median(v) for k, v in ltimes.items()}
    for c in ctxs.values():
        c.close()
    del ctxs, models
    # The whole Captioner, default vs low_memory=True, captions interleaved (both on the same q4_k_m bundle).
    from mullama_sdk import Captioner
    from testkit.audio import write_test_audio

    audio = write_test_audio(Path(args.tmp))["music_24k_mono_10s.wav"]
    caps = {low: Captioner.from_pretrained(bundle, device="cpu", encoder_precision="int8", quant="q4_k_m",
                                           n_threads=2, low_memory=low) for low in (False, True)}
    parts: dict[bool, dict[str, list[float]]] = {low: {"encode": [], "prefill": [], "decode": [], "total": []}
                                                 for low in caps}
    for rep in range(args.speed_reps + 1):
        for low in order.sample(list(caps), len(caps)):
            t0 = time.perf_counter()
            res = caps[low].caption(audio, max_new_tokens=16, temperature=0)
            total = time.perf_counter() - t0
            if rep:
                t = res.timings
                for key, value in (("encode", t.encode_ms + t.adapter_ms), ("prefill", t.prefill_ms),
                                   ("decode", t.decode_ms / max(1, t.n_tokens)), ("total", 1e3 * total)):
                    parts[low][key].append(value)
    out["captioner"] = {str(low): {k: statistics.median(v) for k, v in d.items()} for low, d in parts.items()}
    for c in caps.values():
        c.close()
    print(json.dumps(out))


def profile(bundle: Path, args: argparse.Namespace, tmp: Path) -> tuple[str, str, float]:
    """(components table, knobs table) from fresh child processes."""
    me = [sys.executable, "-m", "bench.bench_memory", "--bundle", str(bundle)]
    rows, loaded = [], {}
    for i in range(len(COMPONENTS)):
        r = run_json_child(me + ["--child-component", str(i)], f"component {COMPONENTS[i][0]}")
        b, lo, us = r["points"]["baseline"], r["points"]["loaded"], r["points"]["used"]

        def gb(p, key, b=b):
            return (p[key] - b[key]) / GB

        loaded[r["label"]] = (lo["VmRSS"] - b["VmRSS"], r["files"])
        rows.append([r["label"], f"{r['files'] / GB:.3f}", f"{gb(lo, 'VmRSS'):.3f}",
                     f"{gb(lo, 'RssAnon'):.3f} / {gb(lo, 'RssFile'):.3f}", f"{gb(lo, 'VmRSS') * GB / r['files']:.2f}x",
                     f"{gb(us, 'VmRSS'):.3f}", f"{gb(us, 'RssAnon'):.3f} / {gb(us, 'RssFile'):.3f}",
                     f"{gb(us, 'VmRSS') * GB / r['files']:.2f}x"])
        print(f"component {r['label']}: {rows[-1][2]} GB after load, {rows[-1][5]} GB after use", flush=True)
    comp = markdown_table(["component (alone)", "file GB", "loaded RSS+ GB", "anon / file GB", "/ file",
                           "used RSS+ GB", "anon / file GB", "/ file"], rows)
    sp = run_json_child(me + ["--child-speed", "--speed-reps", str(args.speed_reps), "--speed-steps",
                         str(args.speed_steps), "--tmp", str(tmp)], "knob speed")
    enc, llm = sp["encoder"], sp["llm"]
    knobs = markdown_table(["knob", "default", "knob set", "time vs default"], [
        ["ONNX Runtime prepacking off (encoder int8, 10 s window)", f"{enc['default']:.2f} s",
         f"{enc['prepacking off']:.2f} s", f"{enc['prepacking off'] / enc['default']:.2f}x"],
        ["ONNX Runtime CPU arena off (encoder int8, 10 s window)", f"{enc['default']:.2f} s",
         f"{enc['arena off']:.2f} s", f"{enc['arena off'] / enc['default']:.2f}x"],
        ["llama.cpp repacking off (q4_k_m decode, ms/token)", f"{1e3 * llm['default']:.1f}",
         f"{1e3 * llm['repack off']:.1f}", f"{llm['repack off'] / llm['default']:.2f}x"],
        *[[f"`Captioner(low_memory=True)`, int8 + q4_k_m, 10 s clip: {label}", f"{cap['False'][key]:.0f} ms",
           f"{cap['True'][key]:.0f} ms", f"{cap['True'][key] / cap['False'][key]:.2f}x"]
          for cap in [sp["captioner"]]
          for key, label in (("encode", "encode + adapter"), ("prefill", "prefill"),
                             ("decode", "decode per token"), ("total", "whole caption (16 tokens)"))],
    ])
    lean = [loaded[k] for k in ("encoder int8, prepacking off", "adapter int8", "LLM q4_k_m, repack off")]
    lean_ratio = sum(m for m, _ in lean) / sum(f for _, f in lean)
    return comp, knobs, lean_ratio


def run_child(bundle: Path, variant: str, new_tokens: int, tmp: Path) -> dict:
    cmd = [sys.executable, "-m", "bench.bench_memory", "--child", "--bundle", str(bundle), "--variant", variant,
           "--new-tokens", str(new_tokens), "--tmp", str(tmp)]
    return run_json_child(cmd, f"memory child {variant}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=["int8:q4_k_m", "int8:q4_k_m:low", "int8:q8_0", "int8:q8_0:low"],
                    help="encoder precision:GGUF quant[:low = Captioner(low_memory=True)], each in its own "
                         "process (fp32:q4_k_m peaks at ~6.5 GB)")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--speed-reps", type=int, default=5, help="profile: encoder runs per knob")
    ap.add_argument("--speed-steps", type=int, default=32, help="profile: decode steps per knob")
    ap.add_argument("--no-profile", action="store_true", help="skip the component breakdown")
    ap.add_argument("--quick", action="store_true", help="only the default variant, short profile")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bundle", help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    ap.add_argument("--child-component", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child-speed", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args)
        return 0
    if args.child_component is not None:
        _child_component(args)
        return 0
    if args.child_speed:
        _child_speed(args)
        return 0
    if args.quick:
        args.variants, args.speed_reps, args.speed_steps = args.variants[:2], 2, 8

    import tempfile

    from bench import assets

    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    bundle = assets.shape_bundle(**BUNDLE)
    print(f"bundle {bundle} ready in {time.perf_counter() - t0:.0f} s", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for v in args.variants:
            r = run_child(bundle, v, args.new_tokens, Path(tmp))
            results.append(r)
            print(f"{v}: files {sum(r['files'].values()) / GB:.2f} GB, RSS after load "
                  f"{(r['points']['after load']['VmRSS'] - r['points']['baseline']['VmRSS']) / GB:.2f} GB", flush=True)

    rows, ratios = [], {}
    for r in results:
        files = sum(r["files"].values())
        base = r["points"]["baseline"]
        for point in ("after load", "after first caption", "after second caption"):
            p = r["points"][point]

            def d(key: str, p=p, base=base) -> str:
                return f"{(p[key] - base[key]) / GB:.2f}" if key in p and key in base else "-"

            ratio = (p["VmRSS"] - base["VmRSS"]) / files
            ratios[(r["variant"], point)] = ratio
            rows.append([r["variant"] if point == "after load" else "", f"{files / GB:.2f}" if point == "after load"
                         else "", point, d("VmRSS"), d("RssAnon"), d("RssFile"), d("Pss"), d("USS"),
                         f"**{ratio:.2f}x**"])
    table = markdown_table(["encoder:GGUF", "files loaded GB", "when", "RSS+ GB", "anon+ GB", "file+ GB", "PSS+ GB",
                            "USS+ GB", "RSS+ / files"], rows)
    files_rows = []
    for r in results:
        files_rows.append([r["variant"], ", ".join(f"`{f}` {b / GB:.3f} GB" for f, b in r["files"].items()),
                           f"{r['load_s']:.1f}", f"{r['caption_s']:.1f}", f"{r['hwm'] / GB:.2f}"])
    files_table = markdown_table(["encoder:GGUF", "files", "load s", "first caption s", "process peak RSS GB"],
                                 files_rows)
    print()
    print(table)
    print()
    print(files_table)

    first = results[0]
    v0 = first["variant"]
    worst = max(ratios[(v0, p)] for p in ("after load", "after first caption"))
    base_rss = first["points"]["baseline"]["VmRSS"] / GB
    body = (f"Benchmark bundle `{bundle.name}` (LLaMA-2-7B widths with {BUNDLE['n_layers']} layers, MERT-330M "
            f"shape, real-width adapter; random weights), `n_ctx` {first['n_ctx']}, 2 threads, one child process "
            f"per row group, `:low` = `low_memory=True`; '+' = above the baseline after imports and llama.cpp init ({base_rss:.2f} GB for "
            f"`{v0}`).\n\n{table}\n\n{files_table}")
    targets = [Target(f"RSS of a loaded Captioner ({v0}) / its bundle files, after load and after the first "
                      "caption (worse of the two)", "<= 1.15x", f"{worst:.2f}x", worst <= TARGET_RATIO)]
    for r in results[1:]:
        w = max(ratios[(r["variant"], p)] for p in ("after load", "after first caption"))
        targets.append(Target(f"same, {r['variant']}", "<= 1.15x", f"{w:.2f}x", w <= TARGET_RATIO))
    notes = (f"The first caption adds what is not a file: llama.cpp's KV cache ({first['n_ctx']} cells) and compute "
             "buffers and ONNX Runtime's activation arena for a 10 s window. The GGUF's pages are resident right "
             "after loading (llama.cpp reads them all at load: RssFile). PSS = RSS here: nothing is shared with "
             "another process; USS is what this process alone holds.")
    if not args.no_profile:
        with tempfile.TemporaryDirectory() as ptmp:
            comp, knobs, lean_ratio = profile(bundle, args, Path(ptmp))
        print()
        print(comp)
        print()
        print(knobs)
        body += ("\n\n**Profile: each component alone** (fresh process each; 'loaded' = after creating the "
                 "session / loading the GGUF, 'used' = after two runs of a 10 s window (encoder) or two adapter "
                 "runs / after a 1024-token context, a 60-token prefill and 16 decode steps (LLM)):\n\n"
                 f"{comp}\n\n**What the memory knobs cost in speed** (interleaved in one process, medians):"
                 f"\n\n{knobs}")
        notes += ("\n\nWhere the excess over the files comes from (component table): (1) llama.cpp repacks Q4_K "
                  "weights into an interleaved layout for its AVX2 kernels (`use_extra_bufts`, on by default): "
                  "the repacked copy is anonymous memory next to the mmap'd original, whose pages were read "
                  "for the repacking and stay resident (clean, reclaimable page cache, but counted in RSS); "
                  "q8_0 is not repacked. (2) ONNX Runtime prepacks the int8 MatMul weights at session creation "
                  "and keeps them beside the initializers. (3) ONNX Runtime's CPU arena keeps the activation "
                  "memory of the largest window run so far (it grows over the first two runs, then stays). "
                  "The knobs table gives the price of turning each off; `Captioner.from_pretrained(low_memory=True)` "
                  "turns all three off (the `:low` rows above; `mullama caption --low-memory`), the default keeps "
                  "them on (speed first). "
                  f"With prepacking and repacking off, the components' loaded memory adds up to {lean_ratio:.2f}x "
                  "their files (int8 encoder + int8 adapter + q4_k_m), i.e. no duplicate remains; the activation "
                  "arena and the KV cache come on top once a caption runs.")
    notes += (f"\n\nLoad average (1 min) {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, on "
              f"{os.cpu_count()} CPUs (timings above ~1 are shared with other jobs; memory is not affected).")
    write_section("memory", "Captioner memory vs bundle files", body, targets, notes=notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
