"""MERT-v1-330M's Hugging Face folder at any width: ``config.json`` and randomly initialised weights.

The weights come from ``transformers``' own ``HubertModel`` (the architecture MERT's loader maps to), renamed
to the 2023-style keys released MERT files carry.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from transformers import HubertConfig, HubertModel

from testkit.asset_dims import AssetDims, real_dims
from testkit.streamed_torch_save import seed_for
from testkit.weight_specs import NORM_STD
from training.reference.mert import check_mert_config, mert_folder_config

__all__ = ["mert_330m_config", "mert_config", "mert_state_dict"]


def mert_330m_config(mert_layers: int = 24) -> dict[str, object]:
    """MERT-v1-330M's ``config.json`` (real widths, random weights are the caller's business)."""
    return mert_config(real_dims(1, mert_layers))


def mert_config(d: AssetDims) -> dict[str, object]:
    """MERT-v1-330M's ``config.json`` (every published field, see :func:`training.reference.mert.mert_folder_config`) at
    the widths of ``d``."""
    return mert_folder_config(
        hidden_size=d.mert_hidden_size,
        num_hidden_layers=d.mert_num_hidden_layers,
        num_attention_heads=d.mert_num_attention_heads,
        intermediate_size=d.mert_intermediate_size,
        conv_dim=d.mert_conv_dim,
        num_conv_pos_embeddings=d.mert_num_conv_pos_embeddings,
        num_conv_pos_embedding_groups=d.mert_num_conv_pos_embedding_groups,
    )


def mert_state_dict(config: Mapping[str, object], seed: int) -> dict[str, torch.Tensor]:
    """Weights of a randomly initialised ``HubertModel`` equivalent to ``config``, under 2023-style names.

    Newer transformers name the weight-normed positional conv ``...conv.parametrizations.weight.original0/1``;
    released MERT files (and the MU-LLaMA checkpoint) say ``...conv.weight_g/weight_v``, so we rename.
    """
    # The HubertConfig the loader maps this config.json to (MERT-only fields and metadata left out).
    hubert = HubertConfig(**check_mert_config(dict(config)))
    # fork_rng: seed the global RNG that HubertModel's init draws from without disturbing the caller's.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = HubertModel(hubert)
        g = torch.Generator().manual_seed(seed_for(seed, "mert/norms"))
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, torch.nn.LayerNorm | torch.nn.GroupNorm):
                    module.weight.copy_(1.0 + NORM_STD * torch.randn(module.weight.shape, generator=g))
                    module.bias.copy_(0.05 * torch.randn(module.bias.shape, generator=g))
    renames = {
        ".parametrizations.weight.original0": ".weight_g",
        ".parametrizations.weight.original1": ".weight_v",
    }
    sd: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        for old, new in renames.items():
            name = name.replace(old, new)
        sd[name] = tensor.detach()  # parameters own their storages: no copy needed, none made
    return sd
