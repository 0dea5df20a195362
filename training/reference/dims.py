"""Dimension dataclasses: every shape in the reference model comes from these, nothing is literal.

``LlamaParams`` mirrors Meta's ``params.json``; ``AdapterDims`` and ``InjectionDims`` describe the
MU-LLaMA parts and are read from checkpoint tensor shapes (the published checkpoint carries no config).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from mullama_sdk.errors import ConfigError


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None = None) -> int:
    """Meta's rule for the SwiGLU width: 2/3 of 4*dim, optionally scaled, rounded up to ``multiple_of``."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclasses.dataclass(frozen=True)
class LlamaParams:
    """LLaMA dimensions, as Meta's ``params.json`` states them (plus the resolved FFN width)."""

    dim: int
    n_layers: int
    n_heads: int
    vocab_size: int
    hidden_dim: int
    n_kv_heads: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "hidden_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"LLaMA {name} must be positive, got {getattr(self, name)}")
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ConfigError(
                f"LLaMA dim {self.dim} must split into n_heads={self.n_heads} heads of even width (RoPE pairs)"
            )
        if self.n_heads % self.kv_heads:
            raise ConfigError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.kv_heads}")

    @classmethod
    def from_params_json(cls, path: Path, *, vocab_size: int | None = None) -> LlamaParams:
        """Read Meta's ``params.json``.

        Args:
            path: The ``params.json`` file.
            vocab_size: Used when the file says ``-1`` (LLaMA-2 does): the tokenizer's size.

        Raises:
            ConfigError: a missing key, a non-positive dimension, or vocab -1 with no fallback.
        """
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read LLaMA params {path}: {e}") from e
        missing = [k for k in ("dim", "n_layers", "n_heads", "multiple_of") if k not in raw]
        if missing:
            raise ConfigError(f"{path} lacks {', '.join(missing)} (a Meta LLaMA params.json has them)")
        vocab = int(raw.get("vocab_size", -1))
        if vocab <= 0:
            if vocab_size is None:
                raise ConfigError(f"{path} has vocab_size {vocab} and no tokenizer size was given")
            vocab = vocab_size
        return cls(
            dim=int(raw["dim"]),
            n_layers=int(raw["n_layers"]),
            n_heads=int(raw["n_heads"]),
            n_kv_heads=int(raw["n_kv_heads"]) if raw.get("n_kv_heads") else None,
            vocab_size=vocab,
            hidden_dim=ffn_hidden_dim(int(raw["dim"]), int(raw["multiple_of"]), raw.get("ffn_dim_multiplier")),
            norm_eps=float(raw.get("norm_eps", 1e-5)),
            rope_theta=float(raw.get("rope_theta", 10000.0)),
        )


@dataclasses.dataclass(frozen=True)
class AdapterDims:
    """The music adapter: layer mix over ``n_states`` MERT states, projection, ``n_blocks`` SwiGLU blocks."""

    n_states: int
    mert_dim: int
    dim: int
    n_blocks: int
    block_hidden: int
    norm_eps: float = 1e-6


@dataclasses.dataclass(frozen=True)
class InjectionDims:
    """Which LLaMA layers receive music (the last ``n_layers``) and how many prefix tokens each has."""

    n_layers: int
    query_len: int = 1

    def layer_ids(self, n_llama_layers: int) -> list[int]:
        if not 0 < self.n_layers <= n_llama_layers:
            raise ConfigError(f"cannot inject into {self.n_layers} of {n_llama_layers} LLaMA layers")
        return list(range(n_llama_layers - self.n_layers, n_llama_layers))


@dataclasses.dataclass(frozen=True)
class DeltaDims:
    """The finetune-stage deltas on LLaMA: biases on wq/wo/w1/w2/w3 and LoRA of rank ``lora_rank`` (0 = none)."""

    bias: bool = True
    lora_rank: int = 16


@dataclasses.dataclass(frozen=True)
class MullamaConfig:
    """Everything needed to build the model without looking at tensors; stored in our own checkpoints."""

    llama: LlamaParams
    mert: dict[str, Any]
    adapter: AdapterDims
    injection: InjectionDims
    deltas: DeltaDims
    #: Wav2Vec2FeatureExtractor's ``do_normalize`` from the MERT folder (False for MERT-v1-330M).
    mert_do_normalize: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MullamaConfig:
        try:
            return cls(
                llama=LlamaParams(**d["llama"]),
                mert=dict(d["mert"]),
                adapter=AdapterDims(**d["adapter"]),
                injection=InjectionDims(**d["injection"]),
                deltas=DeltaDims(**d["deltas"]),
                mert_do_normalize=bool(d.get("mert_do_normalize", False)),
            )
        except (KeyError, TypeError) as e:
            raise ConfigError(f"invalid mullama config: {e}") from e
