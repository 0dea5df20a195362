"""The widths of a generated asset set: tiny ones for tests, LLaMA-2-7B / MERT-v1-330M ones for benchmarks.

One dataclass names every width so the writers (:mod:`testkit.llama_checkpoints`, :mod:`testkit.mert_files`)
and the tests that check their output agree on them.
"""

from __future__ import annotations

import dataclasses

__all__ = ["REAL_VOCAB_SIZE", "TINY_DIMS", "TINY_VOCAB_SIZE", "AssetDims", "real_dims"]


@dataclasses.dataclass(frozen=True)
class AssetDims:
    """Every width of a generated asset set; LLaMA fields use the words of Meta's ``params.json``.

    Attributes:
        dim: LLaMA model width.
        n_layers: LLaMA layer count.
        n_heads: LLaMA attention heads.
        multiple_of: Rounding of the LLaMA FFN width (see :attr:`ffn_hidden`).
        norm_eps: LLaMA RMSNorm epsilon.
        vocab_size: Tokenizer size (= rows of ``tok_embeddings`` and ``output``).
        lora_rank: Rank of the trained LoRA deltas.
        n_inject: Number of (last) LLaMA layers that receive the music query; rows of ``prefix_query``.
        adapter_blocks: Residual blocks of the MERT->LLaMA adapter.
        mert_hidden_size: MERT transformer width.
        mert_num_hidden_layers: MERT transformer layers.
        mert_num_attention_heads: MERT attention heads.
        mert_intermediate_size: MERT FFN width.
        mert_conv_dim: Channels of each of MERT's 7 feature-encoder convolutions.
        mert_num_conv_pos_embeddings: Kernel of MERT's positional convolution.
        mert_num_conv_pos_embedding_groups: Groups of MERT's positional convolution.
    """

    dim: int
    n_layers: int
    n_heads: int
    multiple_of: int
    norm_eps: float
    vocab_size: int
    lora_rank: int
    n_inject: int
    adapter_blocks: int
    mert_hidden_size: int
    mert_num_hidden_layers: int
    mert_num_attention_heads: int
    mert_intermediate_size: int
    mert_conv_dim: int
    mert_num_conv_pos_embeddings: int
    mert_num_conv_pos_embedding_groups: int

    @property
    def ffn_hidden(self) -> int:
        """LLaMA FFN width, by Meta's rule: ``multiple_of * ceil(int(2 * 4 * dim / 3) / multiple_of)``."""
        hidden = int(2 * 4 * self.dim / 3)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @property
    def adapter_hidden(self) -> int:
        """Hidden width of each adapter block (``mu_mert_f1_k``)."""
        return 4 * self.dim

    @property
    def mert_n_states(self) -> int:
        """Hidden states MERT returns: the embedding-side state plus one per layer."""
        return self.mert_num_hidden_layers + 1


#: Tiny widths; ``vocab_size`` is replaced by the trained tokenizer's size.
TINY_DIMS = AssetDims(
    dim=64,
    n_layers=4,
    n_heads=4,
    multiple_of=32,
    norm_eps=1e-5,
    vocab_size=0,
    lora_rank=4,
    n_inject=2,
    adapter_blocks=3,
    mert_hidden_size=32,
    mert_num_hidden_layers=2,
    mert_num_attention_heads=2,
    mert_intermediate_size=64,
    mert_conv_dim=16,
    mert_num_conv_pos_embeddings=16,
    mert_num_conv_pos_embedding_groups=4,
)

TINY_VOCAB_SIZE = 512  # room for 256 byte pieces + 3 specials + ~80 characters + merges
REAL_VOCAB_SIZE = 32000


def real_dims(n_layers: int, mert_layers: int) -> AssetDims:
    """LLaMA-2-7B / MERT-v1-330M / MU-LLaMA widths with chosen layer counts (docs/model.md sections 1-3)."""
    return AssetDims(
        dim=4096,
        n_layers=n_layers,
        n_heads=32,
        multiple_of=256,
        norm_eps=1e-5,
        vocab_size=REAL_VOCAB_SIZE,
        lora_rank=16,
        n_inject=min(20, n_layers),
        adapter_blocks=3,
        mert_hidden_size=1024,
        mert_num_hidden_layers=mert_layers,
        mert_num_attention_heads=16,
        mert_intermediate_size=4096,
        mert_conv_dim=512,
        mert_num_conv_pos_embeddings=128,
        mert_num_conv_pos_embedding_groups=16,
    )
