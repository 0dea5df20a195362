"""The numbers :mod:`bench.bench_end_to_end` reports: paired medians, and the estimate at 32 LLaMA layers.

The random benchmark model has fewer LLaMA layers than the real one (the float32 torch reference of 32
layers does not fit in memory), so measured times and memory are scaled to 32 layers by what grows with
the layer count (see :func:`extrapolate_to_real_layers`).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from bench.end_to_end_assets import PRECISION, QUANT

REAL_LAYERS = 32
REAL_INJECT = 20


# -------------------------------------------------------------------------------------------- model sizes
def sdk_sizes(folder: Path) -> dict:
    """Bytes of one GGUF layer (mean), of the output head, KV per layer, adapter params per injected layer."""
    import gguf

    manifest = json.loads((folder / "bundle" / "mullama.json").read_text())
    reader = gguf.GGUFReader(folder / "bundle" / manifest["llm"][QUANT])
    layers: dict[int, int] = {}
    head = 0
    for t in reader.tensors:
        if t.name.startswith("blk."):
            i = int(t.name.split(".")[1])
            layers[i] = layers.get(i, 0) + int(t.n_bytes)
        elif t.name.startswith(("output.", "output_norm")):
            head += int(t.n_bytes)
    del reader
    dims = manifest["dims"]
    n, mert = dims["n_embd"], dims["mert_dim"]
    fixed = mert * n + n + 3 * (3 * n * 4 * n) + 3 * n + dims["mert_states"] + 1  # proj + 3 SwiGLU blocks
    per_inject = n * n + n  # folded M_l and its offset
    return {
        "n_layer": dims["n_layer"], "n_inject": dims["n_inject"], "n_embd": n,
        "layer_bytes": statistics.mean(layers.values()), "head_bytes": head,
        "adapter_params": fixed + dims["n_inject"] * per_inject, "adapter_params_per_inject": per_inject,
        "adapter_file_bytes": (folder / "bundle" / manifest["adapter"][PRECISION]).stat().st_size,
    }


# ------------------------------------------------------------------------------------------------- report
def median_of(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def peak_rss(r: dict) -> float:
    return max(r["rss_load_peak"], r["rss_run_peak"])


def extrapolate_to_real_layers(v: str, rows: list[dict], sizes: dict, layers: int) -> dict:
    """Median times and peak RSS of ``rows`` scaled to 32 LLaMA layers (see the module docstring)."""
    enc, ad, pre = median_of(rows, "encode_s"), median_of(rows, "adapter_s"), median_of(rows, "prefill_s")
    ttft, total, dec = median_of(rows, "ttft_s"), median_of(rows, "total_s"), median_of(rows, "decode_s_per_token")
    n_tok = len(rows[0]["tokens"])
    other = ttft - enc - ad - pre
    tail = total - ttft - (n_tok - 1) * dec
    peak = statistics.median(peak_rss(r) for r in rows)
    r0 = rows[0]
    if v == "sdk":
        n_inj = sizes["n_inject"]
        ad_scale = (sizes["adapter_params"] + (REAL_INJECT - n_inj) * sizes["adapter_params_per_inject"]) \
            / sizes["adapter_params"]
        layer_b, head_b = sizes["layer_bytes"], sizes["head_bytes"]
        gguf_rss = [m for p, m in r0["mapped"].items() if p.endswith(".gguf")]
        frac = gguf_rss[0][0] / gguf_rss[0][1] if gguf_rss else 1.0
        kv = 2 * r0["n_ctx"] * sizes["n_embd"] * 2  # F16 K and V, n_ctx cells
        per_layer_rss = layer_b * frac + kv
        extra_rss = (REAL_INJECT - n_inj) * sizes["adapter_params_per_inject"] * sizes["adapter_file_bytes"] \
            / sizes["adapter_params"]
        read_l = layers * layer_b + head_b
        read_32 = REAL_LAYERS * layer_b + head_b
    else:
        ad_scale = 1.0  # torch computes the injection inside the LLaMA layers
        layer_b = r0["layer_bytes"]
        # Decode bytes per token: layers, Wv again in each injected layer, output head.
        read_l = layers * layer_b + r0["n_inject"] * r0["wv_bytes"] + r0["head_bytes"]
        read_32 = REAL_LAYERS * layer_b + REAL_INJECT * r0["wv_bytes"] + r0["head_bytes"]
        ck = [m for p, m in r0["mapped"].items() if p.endswith("checkpoint.pth")]
        frac = ck[0][0] / ck[0][1] if ck else 0.0
        per_layer_rss = layer_b + r0["layer_ckpt_bytes"] * frac + r0["kv_bytes_per_layer"]
        extra_rss = 0.0
    ad32 = ad * ad_scale
    pre32 = pre * REAL_LAYERS / layers
    dec32 = dec * read_32 / read_l
    ttft32 = enc + ad32 + pre32 + other
    return {
        "encode_s": enc, "adapter_s": ad32, "prefill_s": pre32, "ttft_s": ttft32,
        "decode_s_per_token": dec32, "total_s": ttft32 + (n_tok - 1) * dec32 + tail,
        "peak": peak + (REAL_LAYERS - layers) * per_layer_rss + extra_rss, "peak_measured": peak,
        "per_layer_rss": per_layer_rss,
    }


def paired_ratio(results: dict, length: float, rounds: int, num: str, den: str, value) -> float:
    """Median over rounds of ``value(num's run) / value(den's run)`` (same round and clip, both measured)."""
    return statistics.median(value(results[(num, length, r)]) / value(results[(den, length, r)])
                             for r in range(rounds) if (num, length, r) in results and (den, length, r) in results)


def ttft_of(r: dict) -> float:
    return r["ttft_s"]


def total_of(r: dict) -> float:
    return r["total_s"]


def common_prefix_len(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
