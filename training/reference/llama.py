"""LLaMA in Meta's layout with MU-LLaMA's trained deltas and its gated music injection.

Parameter names follow the published checkpoint (``layers.N.attention.wq.bias``,
``lora_wq_l1`` ...), so a checkpoint loads without a renaming table. The injection (docs/model.md section 1):
in each injected layer, the adapter tokens ``p_l + a`` go through the layer's *base* value (and, for
more than one adapter token, key) weights, and the gated result is added to every position's
attention-head output before ``wo``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from training.reference.adapter import RMSNorm
from training.reference.dims import DeltaDims, LlamaParams

_ATTN_PROJ = ("wq", "wk", "wv", "wo")
_FFN_PROJ = ("w1", "w2", "w3")
# The published finetune stage trains biases on these only (never wk, wv).
_BIASED = {"wq", "wo", "w1", "w2", "w3"}


def rope_angles(head_dim: int, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Complex rotations ``exp(i * pos * theta^(-2j/head_dim))``, ``(n_pos, head_dim/2)``."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(positions.to(torch.float32), freqs)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (2j, 2j+1) of ``x`` (batch, seq, heads, head_dim): Meta's interleaved RoPE."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    out = torch.view_as_real(xc * rot[None, :, None, :]).flatten(-2)
    return out.type_as(x)


class _DeltaProjections(nn.Module):
    """Holds base linears, optional biases and optional LoRA pairs, and applies ``W x + b + L2(L1 x)``."""

    def _add_proj(self, name: str, d_in: int, d_out: int, deltas: DeltaDims) -> None:
        setattr(self, name, nn.Linear(d_in, d_out, bias=deltas.bias and name in _BIASED))
        if deltas.lora_rank:
            setattr(self, f"lora_{name}_l1", nn.Linear(d_in, deltas.lora_rank, bias=False))
            setattr(self, f"lora_{name}_l2", nn.Linear(deltas.lora_rank, d_out, bias=False))
        self._lora = bool(deltas.lora_rank)

    def project(self, name: str, x: torch.Tensor) -> torch.Tensor:
        y = getattr(self, name)(x)
        if self._lora:
            y = y + getattr(self, f"lora_{name}_l2")(getattr(self, f"lora_{name}_l1")(x))
        return y


@dataclass
class KVCache:
    """Pre-allocated keys and values of one layer: ``(batch, max_seq, n_kv_heads, head_dim)``."""

    k: torch.Tensor
    v: torch.Tensor


class Attention(_DeltaProjections):
    def __init__(self, p: LlamaParams, deltas: DeltaDims) -> None:
        super().__init__()
        self.p = p
        hd, kv = p.head_dim, p.kv_heads
        self._add_proj("wq", p.dim, p.n_heads * hd, deltas)
        self._add_proj("wk", p.dim, kv * hd, deltas)
        self._add_proj("wv", p.dim, kv * hd, deltas)
        self._add_proj("wo", p.n_heads * hd, p.dim, deltas)
        # One gate per head; tanh(0) = 0, so an untrained gate injects nothing.
        self.gate = nn.Parameter(torch.zeros(1, p.n_heads, 1, 1))

    def _heads(self, t: torch.Tensor, n: int) -> torch.Tensor:
        return t.view(*t.shape[:-1], n, self.p.head_dim)

    def _repeat_kv(self, t: torch.Tensor) -> torch.Tensor:
        rep = self.p.n_heads // self.p.kv_heads
        return t if rep == 1 else t.repeat_interleave(rep, dim=2)

    def music_term(self, adapter: torch.Tensor, q: torch.Tensor | None = None) -> torch.Tensor:
        """The gated adapter contribution per head, ``(batch, heads, seq or 1, head_dim)``.

        Args:
            adapter: Adapter tokens ``p_l + a``, ``(batch, query_len, dim)``.
            q: Rotated queries ``(batch, heads, seq, head_dim)``; needed only when query_len > 1.
        """
        n_kv = self.p.kv_heads
        # Base weights only: the trained LoRA and biases belong to the text path (docs/model.md section 2).
        v_a = self._repeat_kv(self._heads(F.linear(adapter, self.wv.weight), n_kv)).transpose(1, 2)
        gate = torch.tanh(self.gate.float()).type_as(v_a)
        if adapter.shape[1] == 1:
            # One adapter token: softmax over a single key is 1, so every position gets the same vector.
            return gate * v_a
        if q is None:
            raise ValueError("query_len > 1 needs the queries: the injection then depends on the token")
        k_a = self._repeat_kv(self._heads(F.linear(adapter, self.wk.weight), n_kv)).transpose(1, 2)
        scores = q @ k_a.transpose(2, 3) / math.sqrt(self.p.head_dim)
        return gate * (torch.softmax(scores.float(), dim=-1).type_as(q) @ v_a)

    def forward(
        self,
        x: torch.Tensor,
        start_pos: int,
        rot: torch.Tensor,
        cache: KVCache | None,
        adapter: torch.Tensor | None,
    ) -> torch.Tensor:
        bsz, seq, _ = x.shape
        q = apply_rope(self._heads(self.project("wq", x), self.p.n_heads), rot)
        k = apply_rope(self._heads(self.project("wk", x), self.p.kv_heads), rot)
        v = self._heads(self.project("wv", x), self.p.kv_heads)
        if cache is not None:
            cache.k[:bsz, start_pos : start_pos + seq] = k
            cache.v[:bsz, start_pos : start_pos + seq] = v
            k = cache.k[:bsz, : start_pos + seq]
            v = cache.v[:bsz, : start_pos + seq]
        q, k, v = q.transpose(1, 2), self._repeat_kv(k).transpose(1, 2), self._repeat_kv(v).transpose(1, 2)
        scores = q @ k.transpose(2, 3) / math.sqrt(self.p.head_dim)
        if seq > 1:
            # Causal: query i (absolute position start_pos + i) sees keys 0 .. start_pos + i.
            mask = torch.full((seq, start_pos + seq), float("-inf"), device=x.device).triu(start_pos + 1)
            scores = scores + mask
        out = torch.softmax(scores.float(), dim=-1).type_as(q) @ v
        if adapter is not None:
            out = out + self.music_term(adapter, q)
        out = out.transpose(1, 2).reshape(bsz, seq, -1)
        return self.project("wo", out)


class FeedForward(_DeltaProjections):
    def __init__(self, p: LlamaParams, deltas: DeltaDims) -> None:
        super().__init__()
        self._add_proj("w1", p.dim, p.hidden_dim, deltas)
        self._add_proj("w2", p.hidden_dim, p.dim, deltas)
        self._add_proj("w3", p.dim, p.hidden_dim, deltas)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project("w2", F.silu(self.project("w1", x)) * self.project("w3", x))


class TransformerBlock(nn.Module):
    def __init__(self, p: LlamaParams, deltas: DeltaDims) -> None:
        super().__init__()
        self.attention = Attention(p, deltas)
        self.feed_forward = FeedForward(p, deltas)
        self.attention_norm = RMSNorm(p.dim, p.norm_eps)
        self.ffn_norm = RMSNorm(p.dim, p.norm_eps)

    def forward(self, x, start_pos, rot, cache, adapter):
        h = x + self.attention(self.attention_norm(x), start_pos, rot, cache, adapter)
        return h + self.feed_forward(self.ffn_norm(h))


class Llama(nn.Module):
    """Meta's LLaMA with optional bias/LoRA deltas and per-layer music adapters."""

    def __init__(self, p: LlamaParams, deltas: DeltaDims) -> None:
        super().__init__()
        self.params = p
        self.deltas = deltas
        self.tok_embeddings = nn.Embedding(p.vocab_size, p.dim)
        self.layers = nn.ModuleList(TransformerBlock(p, deltas) for _ in range(p.n_layers))
        self.norm = RMSNorm(p.dim, p.norm_eps)
        self.output = nn.Linear(p.dim, p.vocab_size, bias=False)

    def new_cache(self, batch: int, max_seq: int) -> list[KVCache]:
        p, ref = self.params, self.output.weight
        shape = (batch, max_seq, p.kv_heads, p.head_dim)
        return [
            KVCache(torch.zeros(shape, dtype=ref.dtype, device=ref.device),
                    torch.zeros(shape, dtype=ref.dtype, device=ref.device))
            for _ in range(p.n_layers)
        ]

    def forward(
        self,
        tokens: torch.Tensor,
        start_pos: int = 0,
        *,
        cache: list[KVCache] | None = None,
        adapters: dict[int, torch.Tensor] | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits (float32) for ``tokens`` ``(batch, seq)`` at absolute positions ``start_pos ...``.

        Args:
            cache: KV caches from :meth:`new_cache`; ``None`` runs without one (whole sequence at once).
            adapters: Layer index -> adapter tokens ``(batch, query_len, dim)`` for the injected layers.
            last_only: Return only the last position's logits ``(batch, vocab)``.
        """
        seq = tokens.shape[1]
        h = self.tok_embeddings(tokens)
        positions = torch.arange(start_pos, start_pos + seq, device=tokens.device)
        rot = rope_angles(self.params.head_dim, positions, self.params.rope_theta).to(tokens.device)
        adapters = adapters or {}
        for i, layer in enumerate(self.layers):
            h = layer(h, start_pos, rot, None if cache is None else cache[i], adapters.get(i))
        if last_only:
            h = h[:, -1:]
        logits = self.output(self.norm(h)).float()
        return logits[:, -1] if last_only else logits
