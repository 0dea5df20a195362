"""Which tensors each generated LLaMA / MU-LLaMA file holds, under which names, with which random scale.

The names, order and dtypes follow Meta's shard and the published MU-LLaMA ``checkpoint.pth`` (docs/model.md section
3); the scales keep activations O(1) at any width so the tiny and real-width models behave alike.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Mapping

import torch

from testkit.asset_dims import AssetDims
from testkit.streamed_torch_save import RandomTensor, TensorSource

__all__ = ["BIAS_STD", "NORM_STD", "checkpoint_args", "checkpoint_entries", "llama_base_specs"]

# Norm weights and biases are pushed away from 1 and 0 so a test that drops or swaps one fails.
NORM_STD = 0.1
BIAS_STD = 0.1


def llama_base_specs(d: AssetDims, dtype: torch.dtype) -> Iterator[RandomTensor]:
    """Base LLaMA tensors under Meta's names, in Meta's shard order.

    Matrices use std ``fan_in ** -0.5`` so every projection keeps activations O(1) at any width: logits
    and attention scores come out O(1), neither flat nor saturated.
    """

    def matrix(name: str, rows: int, cols: int) -> RandomTensor:
        return RandomTensor(name, (rows, cols), dtype, std=cols**-0.5, exact16=True)

    def norm(name: str) -> RandomTensor:
        return RandomTensor(name, (d.dim,), dtype, std=NORM_STD, mean=1.0, exact16=True)

    yield RandomTensor("tok_embeddings.weight", (d.vocab_size, d.dim), dtype, std=1.0, exact16=True)
    yield norm("norm.weight")
    yield matrix("output.weight", d.vocab_size, d.dim)
    for i in range(d.n_layers):
        p = f"layers.{i}."
        for w in ("wq", "wk", "wv", "wo"):
            yield matrix(f"{p}attention.{w}.weight", d.dim, d.dim)
        yield matrix(f"{p}feed_forward.w1.weight", d.ffn_hidden, d.dim)
        yield matrix(f"{p}feed_forward.w2.weight", d.dim, d.ffn_hidden)
        yield matrix(f"{p}feed_forward.w3.weight", d.ffn_hidden, d.dim)
        yield norm(f"{p}attention_norm.weight")
        yield norm(f"{p}ffn_norm.weight")


def checkpoint_entries(
    d: AssetDims, mert_sd: Mapping[str, torch.Tensor]
) -> tuple[dict[str, TensorSource], dict[str, TensorSource]]:
    """The ``model`` dicts of ``checkpoint.pth`` (everything) and ``checkpoint_deltas.pth`` (trained parts).

    Layout and dtypes follow docs/model.md section 3: LLaMA matrices fp16 (the same values as the bf16 shard), gates
    fp16, every other trained tensor fp32; trained norms replace the base ones.
    """
    f32, f16 = torch.float32, torch.float16
    full: dict[str, TensorSource] = {f"mert_model.{name}": t for name, t in mert_sd.items()}
    deltas: dict[str, TensorSource] = {}

    def trained(
        name: str, shape: tuple[int, ...], std: float, *, mean: float = 0.0, dtype: torch.dtype = f32
    ) -> None:
        full[name] = deltas[name] = RandomTensor(f"trained/{name}", shape, dtype, std=std, mean=mean)

    def lora(prefix: str, fan_in: int, fan_out: int) -> None:
        # The L2 scale makes L2 @ L1 about 30% of the base matrix: clearly visible, still a perturbation.
        trained(f"{prefix}_l1.weight", (d.lora_rank, fan_in), fan_in**-0.5)
        trained(f"{prefix}_l2.weight", (fan_out, d.lora_rank), 0.3 * d.lora_rank**-0.5)

    n = d.mert_n_states
    trained("mu_mert_agg.weight", (1, n, 1), 0.5 / n, mean=1.0 / n)
    trained("mu_mert_agg.bias", (1,), BIAS_STD)
    # The adapter input is a unit vector, so std 1 makes its projection O(1) per entry.
    trained("mu_mert_proj.weight", (d.dim, d.mert_hidden_size), 1.0)
    trained("mu_mert_proj.bias", (d.dim,), BIAS_STD)
    for k in range(1, d.adapter_blocks + 1):
        trained(f"mu_mert_norm_{k}.weight", (d.dim,), NORM_STD, mean=1.0)
        trained(f"mu_mert_f1_{k}.weight", (d.adapter_hidden, d.dim), d.dim**-0.5)
        trained(f"mu_mert_f2_{k}.weight", (d.dim, d.adapter_hidden), d.adapter_hidden**-0.5)
        trained(f"mu_mert_f3_{k}.weight", (d.adapter_hidden, d.dim), d.dim**-0.5)

    base = {spec.key: spec for spec in llama_base_specs(d, f16)}
    ffn = (("w1", d.dim, d.ffn_hidden), ("w2", d.ffn_hidden, d.dim), ("w3", d.dim, d.ffn_hidden))
    full["llama.tok_embeddings.weight"] = base["tok_embeddings.weight"]
    for i in range(d.n_layers):
        p = f"llama.layers.{i}."
        for w in ("wq", "wk", "wv", "wo"):
            full[f"{p}attention.{w}.weight"] = base[f"layers.{i}.attention.{w}.weight"]
            if w in ("wq", "wo"):
                trained(f"{p}attention.{w}.bias", (d.dim,), BIAS_STD)
        for w in ("wq", "wk", "wv", "wo"):
            lora(f"{p}attention.lora_{w}", d.dim, d.dim)
        # tanh(0.5 * N(0, 1)) is clearly non-zero for most heads, and of both signs.
        trained(f"{p}attention.gate", (1, d.n_heads, 1, 1), 0.5, dtype=f16)
        for w, _, fan_out in ffn:
            full[f"{p}feed_forward.{w}.weight"] = base[f"layers.{i}.feed_forward.{w}.weight"]
            trained(f"{p}feed_forward.{w}.bias", (fan_out,), BIAS_STD)
        for w, fan_in, fan_out in ffn:
            lora(f"{p}feed_forward.lora_{w}", fan_in, fan_out)
        trained(f"{p}attention_norm.weight", (d.dim,), NORM_STD, mean=1.0)
        trained(f"{p}ffn_norm.weight", (d.dim,), NORM_STD, mean=1.0)
    trained("llama.norm.weight", (d.dim,), NORM_STD, mean=1.0)
    full["llama.output.weight"] = base["output.weight"]
    # The music query's own offsets are O(1) per entry, like the adapter output they are added to.
    trained("prefix_query.weight", (d.n_inject, d.dim), 1.0)
    return full, deltas


def checkpoint_args() -> argparse.Namespace:
    """The ``args`` entry: an ``argparse.Namespace`` like the training script pickled (a few fields)."""
    return argparse.Namespace(
        llama_type="7B",
        max_words=96,
        batch_size=1,
        accum_iter=32,
        epochs=4,
        weight_decay=0.05,
        blr=1e-3,
        warmup_epochs=1,
        mert_path="m-a-p/MERT-v1-330M",
    )
