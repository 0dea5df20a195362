"""Names of the published MU-LLaMA ``checkpoint.pth`` and their mapping onto our modules.

One mapping function each way, raising on anything unknown: a typo or a foreign checkpoint fails
loudly instead of leaving a parameter at its random initial value.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from mullama_sdk.errors import CheckpointError

MERT_PREFIX = "mert_model."
LLAMA_PREFIX = "llama."
ADAPTER_PREFIX = "mu_mert_"
PREFIX_QUERY_KEY = "prefix_query.weight"

_ADAPTER_FIXED = {
    "mu_mert_agg.weight": "layer_mix.weight",
    "mu_mert_agg.bias": "layer_mix.bias",
    "mu_mert_proj.weight": "proj.weight",
    "mu_mert_proj.bias": "proj.bias",
}
_ADAPTER_BLOCK = re.compile(r"mu_mert_(norm|f1|f2|f3)_(\d+)\.weight")
_BLOCK_PART = {"norm": "norm", "f1": "w1", "f2": "w2", "f3": "w3"}
_MODULE_BLOCK = re.compile(r"blocks\.(\d+)\.(norm|w1|w2|w3)\.weight")
_PART_BLOCK = {v: k for k, v in _BLOCK_PART.items()}


def adapter_key_to_module(key: str) -> str:
    """``mu_mert_f1_2.weight`` -> ``blocks.1.w1.weight`` (published blocks count from 1)."""
    if key in _ADAPTER_FIXED:
        return _ADAPTER_FIXED[key]
    m = _ADAPTER_BLOCK.fullmatch(key)
    if not m or int(m.group(2)) < 1:
        raise CheckpointError(f"unknown music-adapter key {key!r}")
    return f"blocks.{int(m.group(2)) - 1}.{_BLOCK_PART[m.group(1)]}.weight"


def adapter_key_to_published(key: str) -> str:
    """Inverse of :func:`adapter_key_to_module`."""
    for pub, mod in _ADAPTER_FIXED.items():
        if mod == key:
            return pub
    m = _MODULE_BLOCK.fullmatch(key)
    if not m:
        raise CheckpointError(f"unknown music-adapter parameter {key!r}")
    return f"mu_mert_{_PART_BLOCK[m.group(2)]}_{int(m.group(1)) + 1}.weight"


def split_published(sd: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Split a published-layout state dict into ``mert``, ``adapter``, ``llama`` and ``prefix`` parts.

    Adapter keys are renamed to our module names; the MERT and LLaMA prefixes are stripped.

    Raises:
        CheckpointError: any key outside the four known groups, named.
    """
    parts: dict[str, dict[str, torch.Tensor]] = {"mert": {}, "adapter": {}, "llama": {}, "prefix": {}}
    unknown = []
    for key, value in sd.items():
        if key.startswith(MERT_PREFIX):
            parts["mert"][key[len(MERT_PREFIX):]] = value
        elif key.startswith(LLAMA_PREFIX):
            parts["llama"][key[len(LLAMA_PREFIX):]] = value
        elif key.startswith(ADAPTER_PREFIX):
            parts["adapter"][adapter_key_to_module(key)] = value
        elif key == PREFIX_QUERY_KEY:
            parts["prefix"]["weight"] = value
        else:
            unknown.append(key)
    if unknown:
        shown = ", ".join(sorted(unknown)[:12])
        raise CheckpointError(
            f"checkpoint has {len(unknown)} key(s) outside mert_model.*, mu_mert_*, llama.*, "
            f"prefix_query.weight: {shown}"
        )
    return parts


def module_to_published(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a :class:`~training.reference.model.MullamaModel` state dict to the published layout."""
    out = {}
    for key, value in sd.items():
        head, _, rest = key.partition(".")
        if head == "mert" and rest.startswith("hubert."):
            out[MERT_PREFIX + rest[len("hubert."):]] = value
        elif head == "adapter":
            out[adapter_key_to_published(rest)] = value
        elif head == "llama":
            out[LLAMA_PREFIX + rest] = value
        elif key == "prefix_query.weight":
            out[PREFIX_QUERY_KEY] = value
        else:
            raise CheckpointError(f"parameter {key!r} has no place in the published layout")
    return out
