"""Which parameters each training stage trains, which it saves, and which get weight decay.

The two stages differ only in these sets (see :mod:`training.recipes.stages`); the optimizer, the
checkpoint writer and the demo model all take them from here so the stages cannot drift apart.
"""

from __future__ import annotations

import torch

from mullama_sdk.errors import ConfigError
from training.reference.model import MullamaModel


def trainable_names(model: MullamaModel, stage: str) -> list[str]:
    """Parameter names (of ``model``) that a stage trains, in ``named_parameters`` order."""
    gates = {f"llama.layers.{l}.attention.gate" for l in model.inject_layers}
    out = []
    for name, _ in model.named_parameters():
        if stage == "pretrain":
            ok = name.startswith(("adapter.", "prefix_query.")) or name in gates
        elif stage == "finetune":
            ok = name.startswith("llama.") and (name.endswith(("norm.weight", ".bias")) or ".lora_" in name)
        else:
            raise ConfigError(f"unknown stage {stage!r}")
        if ok:
            out.append(name)
    return out


def saved_names(model: MullamaModel, stage: str) -> list[str]:
    """What a stage's checkpoint holds: everything that is not in the LLaMA and MERT folders.

    Pretrain: adapter, prefix queries, every layer's gate (the model has a gate in every layer; the
    ones outside the injected layers stay zero). Finetune: the same plus norms, biases and LoRA.
    """
    out = []
    for name, _ in model.named_parameters():
        if name.startswith("mert."):
            continue
        music = name.startswith(("adapter.", "prefix_query.")) or name.endswith(".attention.gate")
        delta = name.startswith("llama.") and (name.endswith(("norm.weight", ".bias")) or ".lora_" in name)
        if music or (stage == "finetune" and delta):
            out.append(name)
    return out


def decays(param: torch.Tensor) -> bool:
    """Weight decay applies to matrices: tensors with at least two dimensions larger than one.

    This leaves out norms, biases, the per-head gates ``(1, heads, 1, 1)`` and the layer-mix weights
    ``(1, n_states, 1)``, which are vectors stored in higher-rank shapes.
    """
    return sum(s > 1 for s in param.shape) >= 2
