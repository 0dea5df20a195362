"""Which tensors a MU-LLaMA GGUF holds, planned before any data is read: Meta -> GGUF tensor names, the
shapes each must have, the LoRA factors merged into each matrix, and llama.cpp's file order.

:func:`export.gguf_export.write_llama_gguf` writes the tensor infos from this plan first and then converts
the tensors one at a time, so a wrong or missing tensor fails before anything is written.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import torch

from mullama_sdk.errors import CheckpointError
from training.reference.dims import LlamaParams

_GLOBAL_NAMES = {
    "tok_embeddings.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "output.weight": "output.weight",
}
# Meta name inside ``layers.N.`` -> GGUF name inside ``blk.N.``. Biases: the published finetune trains
# them on wq, wo, w1, w2, w3 only (docs/model.md section 2); wk/wv biases would be a different model.
_LAYER_NAMES = {
    "attention_norm.weight": "attn_norm.weight",
    "attention.wq.weight": "attn_q.weight",
    "attention.wk.weight": "attn_k.weight",
    "attention.wv.weight": "attn_v.weight",
    "attention.wo.weight": "attn_output.weight",
    "attention.wq.bias": "attn_q.bias",
    "attention.wo.bias": "attn_output.bias",
    "ffn_norm.weight": "ffn_norm.weight",
    "feed_forward.w1.weight": "ffn_gate.weight",
    "feed_forward.w2.weight": "ffn_down.weight",
    "feed_forward.w3.weight": "ffn_up.weight",
    "feed_forward.w1.bias": "ffn_gate.bias",
    "feed_forward.w2.bias": "ffn_down.bias",
    "feed_forward.w3.bias": "ffn_up.bias",
}
_REQUIRED_LAYER = tuple(v for k, v in _LAYER_NAMES.items() if k.endswith(".weight"))
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_LORA_RE = re.compile(r"^(attention|feed_forward)\.lora_(w[a-z0-9]+)_l([12])\.weight$")
_RUNTIME_ONLY_RE = re.compile(r"^attention\.gate$")


def gguf_tensor_name(meta_name: str) -> str:
    """The GGUF tensor name llama.cpp's LLaMA architecture loads for a Meta-layout LLaMA tensor.

    Args:
        meta_name: e.g. ``layers.3.feed_forward.w2.bias`` or ``tok_embeddings.weight``.

    Returns:
        e.g. ``blk.3.ffn_down.bias`` or ``token_embd.weight``.

    Raises:
        CheckpointError: for any name that has no GGUF counterpart (LoRA factors and gates included:
            they are merged or left out by the caller, never written under a name).
    """
    if meta_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[meta_name]
    m = _LAYER_RE.match(meta_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"blk.{int(m.group(1))}.{_LAYER_NAMES[m.group(2)]}"
    raise CheckpointError(
        f"no GGUF name for LLaMA tensor {meta_name!r}; known: {sorted(_GLOBAL_NAMES)} and "
        f"layers.N.{{{', '.join(sorted(_LAYER_NAMES))}}}"
    )


@dataclasses.dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: where it comes from and what it becomes."""

    gguf_name: str
    base_key: str
    lora: tuple[str, str] | None  # (l1, l2) keys
    shape: tuple[int, ...]  # Meta/PyTorch (out, in) order; the writer reverses it into ggml's ne


def _expected_shape(gguf_suffix: str, p: LlamaParams) -> tuple[int, ...]:
    """Meta/PyTorch shape of a GGUF tensor (name inside ``blk.N.``, or a global name) for dims ``p``."""
    q, kv, ff, d = p.n_heads * p.head_dim, p.kv_heads * p.head_dim, p.hidden_dim, p.dim
    return {
        "attn_norm.weight": (d,), "ffn_norm.weight": (d,),
        "attn_q.weight": (q, d), "attn_k.weight": (kv, d), "attn_v.weight": (kv, d), "attn_output.weight": (d, q),
        "ffn_gate.weight": (ff, d), "ffn_up.weight": (ff, d), "ffn_down.weight": (d, ff),
        "attn_q.bias": (q,), "attn_output.bias": (d,), "ffn_gate.bias": (ff,), "ffn_up.bias": (ff,),
        "ffn_down.bias": (d,),
        "token_embd.weight": (p.vocab_size, d), "output.weight": (p.vocab_size, d), "output_norm.weight": (d,),
    }[gguf_suffix]


def plan_tensors(p: LlamaParams, tensors: Mapping[str, torch.Tensor]) -> tuple[list[PlannedTensor], list[str]]:
    """Every output tensor in file order, and the source keys left out on purpose (the gates). Reads no data.

    Raises:
        CheckpointError: a tensor with no GGUF name, beyond ``n_layers``, misshapen, a missing tensor, an
            incomplete or misshapen LoRA pair.
    """
    by_name: dict[str, str] = {}  # gguf name -> base key
    lora: dict[str, dict[str, str]] = {}  # base key -> {"1": key, "2": key}
    skipped: list[str] = []
    for key in tensors:
        m = _LAYER_RE.match(key)
        if m:
            layer, rest = int(m.group(1)), m.group(2)
            if layer >= p.n_layers:
                raise CheckpointError(f"{key}: layer {layer} beyond n_layers={p.n_layers}")
            if _RUNTIME_ONLY_RE.match(rest):
                skipped.append(key)
                continue
            lm = _LORA_RE.match(rest)
            if lm:
                base = f"layers.{layer}.{lm.group(1)}.{lm.group(2)}.weight"
                gguf_tensor_name(base)  # raises for a LoRA on something we do not know
                lora.setdefault(base, {})[lm.group(3)] = key
                continue
        by_name[gguf_tensor_name(key)] = key

    required = [f"blk.{i}.{s}" for i in range(p.n_layers) for s in _REQUIRED_LAYER]
    required += list(_GLOBAL_NAMES.values())
    missing = [n for n in required if n not in by_name]
    if missing:
        raise CheckpointError(f"LLaMA tensors missing for GGUF names {missing[:10]} ({len(missing)} in all)")

    planned = []
    for name in sorted(by_name, key=_file_order):
        key = by_name[name]
        t = tensors[key]
        suffix = name.split(".", 2)[-1] if name.startswith("blk.") else name
        want = _expected_shape(suffix, p)
        if tuple(t.shape) != want:
            raise CheckpointError(f"{key} has shape {list(t.shape)}, expected {list(want)} for {p}")
        pair = lora.pop(key, None)
        lora_keys = None
        if pair is not None:
            if set(pair) != {"1", "2"}:
                raise CheckpointError(f"LoRA of {key} is incomplete: only {sorted(pair.values())}")
            l1, l2 = tensors[pair["1"]], tensors[pair["2"]]
            if l1.dim() != 2 or l2.dim() != 2 or l1.shape[0] != l2.shape[1] or \
                    (l2.shape[0], l1.shape[1]) != tuple(t.shape):
                raise CheckpointError(
                    f"LoRA of {key} ({list(t.shape)}) has factors l1 {list(l1.shape)}, l2 {list(l2.shape)}; "
                    "expected l1 (rank, in) and l2 (out, rank)"
                )
            lora_keys = (pair["1"], pair["2"])
        planned.append(PlannedTensor(name, key, lora_keys, want))
    if lora:  # LoRA on a matrix that is not there (cannot happen with a complete base, kept as a guard)
        raise CheckpointError(f"LoRA factors without a base matrix: {sorted(lora)[:10]}")
    return planned, skipped


def _file_order(name: str) -> tuple[int, int, str]:
    """token_embd first, then blocks by layer, then output_norm and output (as llama.cpp's converter)."""
    if name == "token_embd.weight":
        return (0, 0, name)
    if name.startswith("blk."):
        return (1, int(name.split(".")[1]), name)
    return (2, 0 if name == "output_norm.weight" else 1, name)
