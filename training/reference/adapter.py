"""The music adapter: MERT state means -> music query ``a`` (docs/model.md section 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.reference.dims import AdapterDims


class RMSNorm(nn.Module):
    """Root-mean-square norm with a weight and no bias, computed in float32 as Meta's LLaMA does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class AdapterBlock(nn.Module):
    """``z + W2(silu(W1 n) * W3 n)`` with ``n = RMSNorm(z)``; no biases."""

    def __init__(self, dim: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, eps)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        n = self.norm(z)
        return z + self.w2(F.silu(self.w1(n)) * self.w3(n))


class MusicAdapter(nn.Module):
    """Layer mix over the MERT states, L2 normalisation, projection to LLaMA width, residual blocks."""

    def __init__(self, dims: AdapterDims) -> None:
        super().__init__()
        self.dims = dims
        # A kernel-1 Conv1d over the state axis is a learned weighted sum of the states plus a bias.
        self.layer_mix = nn.Conv1d(dims.n_states, 1, kernel_size=1)
        self.proj = nn.Linear(dims.mert_dim, dims.dim)
        self.blocks = nn.ModuleList(
            AdapterBlock(dims.dim, dims.block_hidden, dims.norm_eps) for _ in range(dims.n_blocks)
        )

    def unit_vector(self, state_means: torch.Tensor) -> torch.Tensor:
        """``u``: the L2-normalised layer mix, ``(batch, mert_dim)``, from ``(batch, n_states, mert_dim)``.

        The published training code also divides u by (1 + 1e-6) (a kNN-blend weight normalisation);
        a 1e-6 relative change below every tolerance we state, so it is left out.
        """
        mixed = self.layer_mix(state_means).squeeze(1)
        return F.normalize(mixed, p=2.0, dim=-1, eps=1e-12)

    def forward(self, state_means: torch.Tensor) -> torch.Tensor:
        """The music query ``a``: ``(batch, dim)``."""
        z = self.proj(self.unit_vector(state_means))
        for block in self.blocks:
            z = block(z)
        return z
