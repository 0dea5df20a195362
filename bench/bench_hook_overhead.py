"""Per-token cost of the injection hook: plain vs native (C) hook vs Python hook contexts.

Launch:  .venv/bin/python -m bench.bench_hook_overhead [--layers 32 --n-embd 1024 --type q8_0 --model PATH]

One random LLaMA GGUF, three contexts on the same loaded model (production settings: default flash
attention "auto" and F16 KV cache), a prompt prefill, then N single-token decode steps; in each
step every variant decodes once, in random order (this VM's speed drifts by +-15 % between runs, so
only paired, interleaved measurements are meaningful). Reported: median ms per token, median of the
per-step difference to plain, and the tokens/s ratio plain/variant.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

import llama_cpp
import numpy as np

from bench.report import Target, markdown_table, write_section
from native_bridge import InjectionHook
from testkit import llama_gguf as H

TARGET = 0.97


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--n-embd", type=int, default=1024)
    ap.add_argument("--n-ff", type=int, default=3584)
    ap.add_argument("--inject", type=int, default=20, help="hooked layers (the last N)")
    ap.add_argument("--type", choices=("f16", "q8_0"), default="q8_0")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", type=Path, help="reuse/keep the GGUF at this path")
    args = ap.parse_args()

    cfg = H.TinyLlamaConfig(
        n_embd=args.n_embd,
        n_layer=args.layers,
        n_head=args.n_embd // 64,
        n_head_kv=args.n_embd // 64,
        n_ff=args.n_ff,
        n_ctx_train=4096,
    )
    H.silence_llama_logs()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or Path(tmp) / f"bench-{args.type}.gguf"
        if not path.exists():
            t0 = time.perf_counter()
            f16 = Path(tmp) / "bench-f16.gguf" if args.type == "q8_0" else path
            H.write_llama_gguf(f16, cfg, H.random_weights(cfg, seed=0), dtype=np.float16)
            if args.type == "q8_0":
                H.quantize_gguf(f16, path, llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, args.threads)
                f16.unlink()
            print(
                f"wrote {path.name} ({path.stat().st_size / 2**20:.0f} MiB) "
                f"in {time.perf_counter() - t0:.1f} s",
                flush=True,
            )
        run(cfg, path, args)


def run(cfg: H.TinyLlamaConfig, path: Path, args: argparse.Namespace) -> None:
    H.silence_llama_logs()
    model = H.load_model(path)
    rng = np.random.default_rng(1)
    layers = list(range(cfg.n_layer - args.inject, cfg.n_layer))
    d = 0.5 * rng.standard_normal((len(layers), cfg.n_embd))
    hooks: dict[str, InjectionHook | None] = {"plain": None}
    for backend in ("native", "python"):
        hook = InjectionHook(cfg.n_embd, cfg.n_layer, backend=backend)
        hook.set_clip_vectors(0, (layers, d))
        hook.use_single_clip(0)
        hooks[backend] = hook
    n_ctx = args.prompt + args.steps + 8
    ctxs = {
        k: H.new_context(model, h, exact=False, n_ctx=n_ctx, n_batch=args.prompt, n_threads=args.threads)
        for k, h in hooks.items()
    }
    tokens = rng.integers(3, cfg.n_vocab, args.prompt + args.steps)
    last = {}
    for ctx in ctxs.values():
        H.decode(ctx, tokens[: args.prompt], range(args.prompt), n_vocab=cfg.n_vocab, want_logits=False)
    times: dict[str, list[float]] = {k: [] for k in ctxs}
    order = list(ctxs)
    for i in range(args.prompt, args.prompt + args.steps):
        random.shuffle(order)
        for k in order:
            t0 = time.perf_counter()
            last[k] = H.decode(ctxs[k], tokens[i : i + 1], [i], n_vocab=cfg.n_vocab)
            times[k].append(1e3 * (time.perf_counter() - t0))
    n_nodes = hooks["native"].counters.ask_calls / (args.steps + 1)  # type: ignore[union-attr]

    plain = np.array(times["plain"])
    setup = (
        f"model: {cfg.n_layer} layers, n_embd {cfg.n_embd}, n_ff {cfg.n_ff}, {args.type}, "
        f"{args.inject} hooked layers, ~{n_nodes:.0f} graph nodes/token; {args.threads} threads, "
        f"{args.steps} paired decode steps after a {args.prompt}-token prompt"
    )
    print(f"\n{setup}")
    print(f"{'variant':<8} {'median ms/token':>16} {'median diff ms':>15} {'tokens/s ratio':>15}")
    rows, ratio, paired = [], {}, {}
    for k, ts in times.items():
        ts = np.array(ts)
        diff = float(np.median(ts - plain))
        ratio[k] = float(np.median(plain) / np.median(ts))
        # Paired: the typical extra cost of a step measured next to its plain twin (robust to drift).
        paired[k] = float(np.median(plain) / (np.median(plain) + diff))
        print(f"{k:<8} {np.median(ts):>16.2f} {diff:>+15.2f} {ratio[k]:>14.3f}x")
        label = {"plain": "plain llama.cpp", "native": "native C hook", "python": "Python hook"}[k]
        rows.append([label, f"{np.median(ts):.2f}", f"{diff:+.2f}", f"{ratio[k]:.3f}x", f"**{paired[k]:.3f}x**"])
    same = np.abs(last["native"] - last["python"]).max()
    moved = np.abs(last["native"] - last["plain"]).max()
    print(f"last-step logits: |native - python| = {same:.2e}, |native - plain| = {moved:.2f}")
    body = (f"Random LLaMA GGUF ({setup}); default flash attention + F16 KV; the three contexts share the "
            f"model and decode in random order at every step (paired).\n\n"
            + markdown_table(["variant", "median ms/token", "median per-step diff ms", "tokens/s vs plain (medians)",
                              "tokens/s vs plain (paired)"], rows))
    write_section(
        "hook_overhead", "Injection hook overhead (decode)", body,
        [Target("decode tokens/s with the native C hook vs plain llama.cpp (paired)", ">= 0.97x",
                f"{paired['native']:.3f}x", paired["native"] >= TARGET)],
        notes=f"Paired = median plain ms / (median plain ms + median per-step difference): each hooked step is "
              f"compared with the plain step measured next to it, which cancels the drift of a shared machine "
              f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs at the end); the ratio of medians "
              f"is shown for reference. "
              f"The Python fallback hook (used without a C compiler) gives {paired['python']:.3f}x. Last-step "
              f"logits: native hook = Python hook (max |diff| {same:.1e}); the music moves them by up to "
              f"{moved:.2f} against plain. The hook's cost is fixed per graph node, so for a 7B model (many "
              f"times more ms/token on this machine) its relative cost is correspondingly smaller.",
    )
    for ctx in ctxs.values():
        llama_cpp.llama_free(ctx)
    for hook in hooks.values():
        if hook is not None:
            hook.close()
    llama_cpp.llama_model_free(model)


if __name__ == "__main__":
    main()
