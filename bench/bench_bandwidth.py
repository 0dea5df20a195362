"""Decode speed vs the machine's memory bandwidth: how close llama.cpp gets to the physical limit.

Launch:  .venv/bin/python -m bench.bench_bandwidth [--n-layers 4 --quants f16 q8_0 q4_k_m --rounds 5 --steps 24]

A single-token decode step reads every weight matrix once (all layer matrices and the output matrix; of
the token embedding only one row) plus the KV cache, so ``bytes/token / seconds/token`` is the bandwidth
decode achieves; divided by the bandwidth the machine delivers to a plain streaming read it says how
much of the physical limit is used. Models: plain LLaMA GGUFs (no hook, no MU-LLaMA deltas) at LLaMA-2-7B
widths (4096 / FFN 11008 / 32 heads / vocab 32000) with ``--n-layers`` layers (default 4: three variants
loaded at once stay under 4 GB; a layer is the same work at any depth, only the output matrix weighs
more in a shallow model), built once by :mod:`bench.assets` with the product's converter and quantiser.

One process, variants interleaved: in each of ``--rounds`` rounds the bandwidth kernels run (numpy on a
512 MiB array, far beyond any cache: two read-reduce kernels (``np.maximum.reduce``, ``np.add.reduce``) and
a copy, with 1 and 2 threads, each thread on its share of the array; best of 3 passes per round; the read
ceiling is the faster read kernel), then for each thread count (1 and 2, in random order) every model's
context is cleared and prefilled with 8 tokens, then ``--steps`` decode steps in which the models take
turns in random order. Reported: median ms/token, bytes/token, effective GB/s, and the share
of the 2-thread read bandwidth of the same round (median of the per-round ratios).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

from bench import assets
from bench.report import Target, markdown_table, write_section

GB = 1e9
PROMPT = 8
#: max / sum: read-reduce kernels (``np.maximum.reduce``, ``np.add.reduce``; bytes read), copy: bytes read + written.
KERNELS = {"max": "read-reduce `np.maximum.reduce` (bytes read)", "sum": "read-reduce `np.add.reduce` (bytes read)",
           "copy": "copy `np.copyto` (bytes read + written)"}
TARGET_Q4 = 0.70


# --------------------------------------------------------------------------------------------- bandwidth
class Bandwidth:
    """numpy streaming kernels on ``n_threads`` threads, each on its contiguous share of the arrays."""

    def __init__(self, mib: int) -> None:
        n = mib * 2**20 // 4
        self.src = np.ones(n, np.float32)
        self.dst = np.zeros(n, np.float32)  # touched: no page faults inside the timed copies

    def _run(self, kernel: str, n_threads: int) -> float:
        parts = np.array_split(np.arange(len(self.src)), n_threads)
        bounds = [(int(p[0]), int(p[-1]) + 1) for p in parts]
        barrier = threading.Barrier(n_threads + 1)

        def work(lo: int, hi: int) -> None:
            barrier.wait()
            if kernel == "max":
                np.maximum.reduce(self.src[lo:hi])
            elif kernel == "sum":
                np.add.reduce(self.src[lo:hi])
            else:
                np.copyto(self.dst[lo:hi], self.src[lo:hi])
            barrier.wait()

        threads = [threading.Thread(target=work, args=b) for b in bounds]
        for t in threads:
            t.start()
        barrier.wait()
        t0 = time.perf_counter()
        barrier.wait()
        dt = time.perf_counter() - t0
        for t in threads:
            t.join()
        moved = self.src.nbytes * (2 if kernel == "copy" else 1)  # copy: bytes read + bytes written
        return moved / dt

    def measure(self, passes: int = 3) -> dict[tuple[str, int], float]:
        """Best of ``passes`` GB/s per (kernel, threads); ``("read", n)`` = the faster read kernel."""
        out = {}
        for kernel in KERNELS:
            for n_threads in (1, 2):
                out[(kernel, n_threads)] = max(self._run(kernel, n_threads) for _ in range(passes)) / GB
        for n_threads in (1, 2):
            out[("read", n_threads)] = max(out[("max", n_threads)], out[("sum", n_threads)])
        return out


# ------------------------------------------------------------------------------------------------ models
def bytes_per_token(path: Path) -> tuple[int, int, dict[str, object]]:
    """(weight bytes one decode step reads, bytes of the file's tensors, dims) from the GGUF's tensor table."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    keys = {"embedding_length": "embedding_length", "block_count": "block_count",
            "feed_forward_length": "feed_forward_length", "head_count": "attention.head_count",
            "head_count_kv": "attention.head_count_kv"}
    dims: dict[str, object] = {k: int(reader.get_field(f"llama.{v}").contents()) for k, v in keys.items()}
    read = total = 0
    types: dict[str, int] = {}
    for t in reader.tensors:
        n = int(t.n_bytes)
        total += n
        if t.name == "token_embd.weight":
            read += n // int(t.shape[-1])  # ggml ne = (n_embd, n_vocab): one row of n_vocab
        else:
            read += n
        if len(t.shape) > 1:
            types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    dims["types"] = types
    return read, total, dims


def kv_bytes(dims: dict[str, object], n_past: float) -> float:
    """KV-cache bytes one step reads: K and V (F16) of every layer for ``n_past`` positions."""
    n_embd_kv = int(dims["embedding_length"]) * int(dims["head_count_kv"]) // int(dims["head_count"])
    return int(dims["block_count"]) * n_past * 2 * n_embd_kv * 2


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-layers", type=int, default=4)
    ap.add_argument("--quants", nargs="+", default=["f16", "q8_0", "q4_k_m"],
                    choices=["f16", "q8_0", "q4_k_m"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=24, help="decode steps per round and context")
    ap.add_argument("--mib", type=int, default=512, help="size of the bandwidth test array")
    ap.add_argument("--quick", action="store_true", help="2 rounds of 8 steps, q4_k_m and f16 only")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.steps, args.quants = 2, 8, [q for q in args.quants if q in ("f16", "q4_k_m")]

    from mullama_sdk.llm import LlamaContext, LlamaModel

    load0 = os.getloadavg()[0]
    t_build = time.perf_counter()
    paths = {q: assets.llama_gguf(args.n_layers, q) for q in args.quants}
    t_build = time.perf_counter() - t_build
    info = {q: bytes_per_token(p) for q, p in paths.items()}
    bw = Bandwidth(args.mib)
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; models ready in {t_build:.0f} s: "
          + ", ".join(f"{q} {info[q][1] / GB:.2f} GB" for q in args.quants), flush=True)

    models = {q: LlamaModel(paths[q]) for q in args.quants}
    n_ctx = PROMPT + args.steps + 8
    ctxs = {(q, th): LlamaContext(models[q], None, n_ctx=n_ctx, n_batch=PROMPT, n_threads=th)
            for q in args.quants for th in (1, 2)}
    rng = random.Random(args.seed)
    n_vocab = next(iter(models.values())).n_vocab
    tokens = [rng.randrange(3, n_vocab) for _ in range(PROMPT + args.steps)]

    # Warm-up: page every model in (mmap) and let llama.cpp allocate its buffers.
    for ctx in ctxs.values():
        ctx.clear()
        ctx.decode(tokens[:PROMPT], range(PROMPT), [0] * PROMPT, [False] * (PROMPT - 1) + [True])
        ctx.decode(tokens[PROMPT:PROMPT + 1], [PROMPT], [0], [True])
    bw.measure(passes=1)

    bws: list[dict[tuple[str, int], float]] = []
    loads: list[float] = []
    times: dict[tuple[str, int], list[list[float]]] = {k: [] for k in ctxs}
    for r in range(args.rounds):
        loads.append(os.getloadavg()[0])
        bws.append(bw.measure())
        # One phase per thread count (alternating 1- and 2-thread graphs step by step disturbs OpenMP's
        # thread pool); within a phase the models take turns in random order at every step.
        for th in rng.sample([1, 2], 2):
            time.sleep(0.1)  # let spinning worker threads of the previous phase go idle
            order = [k for k in ctxs if k[1] == th]
            for k in order:
                ctxs[k].clear()
                ctxs[k].decode(tokens[:PROMPT], range(PROMPT), [0] * PROMPT, [False] * (PROMPT - 1) + [True])
                times[k].append([])
            for i in range(PROMPT, PROMPT + args.steps):
                rng.shuffle(order)
                for k in order:
                    t0 = time.perf_counter()
                    ctxs[k].decode([tokens[i]], [i], [0], [True])
                    times[k][-1].append(time.perf_counter() - t0)
        time.sleep(0.1)
        b = bws[-1]
        print(f"round {r + 1}/{args.rounds} (load {loads[-1]:.1f}): read {b[('read', 1)]:.1f} / {b[('read', 2)]:.1f} GB/s (1/2 threads); "
              + ", ".join(f"{q} {1e3 * statistics.median(times[(q, 2)][-1]):.0f} ms" for q in args.quants),
              flush=True)
    for ctx in ctxs.values():
        ctx.close()
    for m in models.values():
        m.close()

    # ---- bandwidth table
    def bw_stats(key: tuple[str, int]) -> tuple[float, float]:
        v = [b[key] for b in bws]
        return statistics.median(v), max(v)

    bw_rows = []
    for kernel, label in [*KERNELS.items(), ("read", "**read ceiling** (faster read kernel per round)")]:
        cells = [label]
        for th in (1, 2):
            med, best = bw_stats((kernel, th))
            cells.append(f"{med:.1f} / {best:.1f}")
        bw_rows.append(cells)
    bw_table = markdown_table(["kernel (512 MiB)", "1 thread GB/s (median / best)", "2 threads GB/s (median / best)"],
                              bw_rows)
    ceiling_med, ceiling_best = bw_stats(("read", 2))

    # ---- decode table
    n_past_mean = PROMPT + (args.steps + 1) / 2
    rows, stats = [], {}
    for q in args.quants:
        w_read, file_bytes, dims = info[q]
        per_tok = w_read + kv_bytes(dims, n_past_mean)
        med = {th: statistics.median([t for rr in times[(q, th)] for t in rr]) for th in (1, 2)}
        # Per round: this round's median step time against this round's read ceiling at the same thread count.
        per_round = {th: [per_tok / statistics.median(times[(q, th)][r]) / GB / bws[r][("read", th)]
                          for r in range(args.rounds)] for th in (1, 2)}
        pct = {th: statistics.median(v) for th, v in per_round.items()}
        best = {th: max(v) for th, v in per_round.items()}
        gbs = {th: per_tok / med[th] / GB for th in (1, 2)}
        stats[q] = {"pct": pct, "best": best, "gbs": gbs, "speedup": med[1] / med[2], "ms": med}
        types = "+".join(f"{n} {t}" for t, n in sorted(dims["types"].items(), key=lambda kv: -kv[1]))
        rows.append([q, f"{file_bytes / GB:.2f}", types, f"{per_tok / GB:.3f}", f"{1e3 * med[1]:.1f}",
                     f"{1e3 * med[2]:.1f}", f"{med[1] / med[2]:.2f}x", f"{gbs[1]:.1f} ({pct[1]:.0%})",
                     f"{gbs[2]:.1f} (**{pct[2]:.0%}**)"])
    dec_table = markdown_table(
        ["GGUF", "file GB", "matrix types", "GB read / token", "ms/token 1 thr", "ms/token 2 thr",
         "2-thr speed-up", "GB/s 1 thr (% of 1-thr ceiling)", "GB/s 2 thr (% of 2-thr ceiling)"], rows)

    print()
    print(bw_table)
    print()
    print(dec_table)
    d = info[args.quants[0]][2]
    shape = (f"LLaMA-2-7B widths (n_embd {d['embedding_length']}, FFN {d['feed_forward_length']}, "
             f"{d['head_count']} heads, vocab {n_vocab}) with {d['block_count']} layers")
    body = (f"{shape}; plain llama.cpp decode (`mullama_sdk.llm`, no hook), default flash attention + F16 KV, "
            f"{args.rounds} rounds x {args.steps} interleaved decode steps after an {PROMPT}-token prompt.\n\n"
            + bw_table + "\n\n" + dec_table)
    load1 = os.getloadavg()[0]
    notes = [
        f"Bytes/token = every weight tensor of the file except the token embedding, of which one row is read, "
        f"+ the F16 KV cache of all layers at the mean context ({n_past_mean:.0f} positions; "
        f"{kv_bytes(d, n_past_mean) / 1e6:.1f} MB, <1 %). GB/s = bytes/token / median s/token; the % is the median "
        f"over rounds of that figure against the read ceiling measured in the same round with the same number "
        f"of threads (2 threads: median {ceiling_med:.1f} GB/s, best {ceiling_best:.1f} GB/s).",
        f"Load average (1 min) {load0:.1f} at the start, {load1:.1f} at the end, "
        f"{', '.join(f'{x:.1f}' for x in loads)} at the start of each round, on {os.cpu_count()} CPUs; "
        f"'best round' is the round where the variant came closest to the ceiling (the least disturbed one).",
    ]
    targets = []
    if "q4_k_m" in stats:
        r4 = stats["q4_k_m"]["pct"][2]
        targets.append(Target("q4_k_m decode bandwidth vs read ceiling (2 threads)", ">= 70 %", f"{r4:.0%}",
                              r4 >= TARGET_Q4))
        if r4 < TARGET_Q4:
            notes.append(_profile_note(stats, max(load0, load1)))
    write_section("bandwidth", "Decode vs memory bandwidth", body, targets, notes="\n\n".join(notes))
    return 0


def _profile_note(stats: dict[str, dict], load: float) -> str:
    q4 = stats["q4_k_m"]
    n_cpu = os.cpu_count() or 1
    if q4["speedup"] < 1.0:
        one = ", ".join(f"{q} {s['pct'][1]:.0%}" for q, s in stats.items())
        return (f"Why q4_k_m is below the ceiling in this run: the second thread made decode slower "
                f"({q4['speedup']:.2f}x), which no bandwidth or compute limit explains - the {n_cpu} cores were "
                f"shared with other jobs (load average up to {load:.1f}). llama.cpp's threads meet at a barrier "
                f"after every graph node (~30 per layer); when one of them is descheduled the other waits, so "
                f"2-thread decode degrades far more than 1-thread decode or numpy's independent halves. The "
                f"1-thread figures are the usable ones from such a run: q4_k_m moves {q4['gbs'][1]:.1f} GB/s, "
                f"{q4['pct'][1]:.0%} of the 1-thread read ceiling ({one}); in its best round the 2-thread decode "
                f"reached {q4['best'][2]:.0%} of the 2-thread ceiling. Rerun on an idle machine for the 2-thread "
                f"verdict.")
    parts = [f"Why q4_k_m stays below the ceiling: with 2 threads it moves {q4['gbs'][2]:.1f} GB/s, with one "
             f"{q4['gbs'][1]:.1f} GB/s ({q4['pct'][1]:.0%} of the 1-thread ceiling); the second thread speeds decode "
             f"up {q4['speedup']:.2f}x."]
    if q4["speedup"] > 1.3:
        parts.append("A bandwidth-bound kernel gains little from a second core once one core nearly saturates "
                     "the memory bus; a large gain means much of the time goes to unpacking 4/6-bit blocks and "
                     "multiplying (compute-bound on 2 cores), so fewer bytes per weight do not turn into "
                     "proportionally faster tokens.")
    for q in ("f16", "q8_0"):
        if q in stats:
            parts.append(f"{q}: {stats[q]['gbs'][2]:.1f} GB/s = {stats[q]['pct'][2]:.0%} of the ceiling with 2 "
                         f"threads, {stats[q]['pct'][1]:.0%} with 1 (f16 needs no dequantisation: the closer it "
                         f"gets, the more q4_k_m's gap is compute).")
    return " ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
