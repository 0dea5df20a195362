"""Starting weights of a stage that the given files lack: a fresh music adapter, fresh finetune deltas.

Both are seeded and chosen so that step 0 reproduces the model the stage starts from (zero gates,
zero biases, zero LoRA ``L2``).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from mullama_sdk.errors import CheckpointError
from training.recipes.config import RecipeConfig
from training.reference.dims import AdapterDims, DeltaDims, InjectionDims, LlamaParams, MullamaConfig
from training.reference.llama_folder import resolve_llama_dir
from training.reference.loading import Checkpoint
from training.reference.mert import read_mert_folder
from training.reference.model_sources import ModelSources
from training.reference.tokenizer import Tokenizer


def fresh_pretrain_checkpoint(cfg: RecipeConfig) -> Checkpoint:
    """An in-memory checkpoint with a newly initialised adapter, prefix queries and zero gates.

    Initialisation is torch's default for each module (under the recipe's seed): Conv1d/Linear
    Kaiming-uniform, RMSNorm weights 1, prefix queries N(0, 1); gates 0 so that the untrained music
    path injects nothing (tanh 0 = 0) and step 0 is the base LLaMA.
    """
    from training.reference.adapter import MusicAdapter
    from training.reference.checkpoint_layout import adapter_key_to_published

    m = cfg.model
    folder = resolve_llama_dir(Path(m.llama_dir))
    tokenizer = Tokenizer(folder.tokenizer)
    params = LlamaParams.from_params_json(folder.params, vocab_size=tokenizer.n_vocab)
    mert_raw, do_normalize = read_mert_folder(Path(m.mert_dir))
    dims = AdapterDims(n_states=int(mert_raw["num_hidden_layers"]) + 1, mert_dim=int(mert_raw["hidden_size"]),
                       dim=params.dim, n_blocks=m.adapter_blocks, block_hidden=m.adapter_hidden or 4 * params.dim)
    injection = InjectionDims(n_layers=m.n_inject, query_len=m.query_len)
    injection.layer_ids(params.n_layers)
    config = MullamaConfig(llama=params, mert=mert_raw, adapter=dims, injection=injection,
                           deltas=DeltaDims(bias=False, lora_rank=0), mert_do_normalize=do_normalize)
    adapter = MusicAdapter(dims)
    prefix = nn.Embedding(injection.n_layers * injection.query_len, params.dim)
    sd = {adapter_key_to_published(k): v.detach() for k, v in adapter.state_dict().items()}
    sd["prefix_query.weight"] = prefix.weight.detach()
    for l in range(params.n_layers):
        sd[f"llama.layers.{l}.attention.gate"] = torch.zeros(1, params.n_heads, 1, 1)
    return Checkpoint(Path("<fresh pretrain init>"), sd, config.to_dict(), None, {"stage": "init"})


def fresh_deltas(src: ModelSources, want: DeltaDims, seed: int) -> dict[str, torch.Tensor]:
    """Initial finetune deltas missing from ``src``: zero biases, LoRA ``L1`` Kaiming-uniform and ``L2`` zero.

    ``L2 = 0`` and zero biases make the finetune start exactly at the pretrained model.
    """
    from training.reference.llama import Llama

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Llama(src.config.llama, want).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(set(shapes) - set(src.llama)):
        shape = shapes[key]
        if key.endswith(".bias") or key.endswith("_l2.weight"):
            out[key] = torch.zeros(shape)
        elif key.endswith("_l1.weight"):
            bound = 1.0 / math.sqrt(shape[1])  # nn.Linear's default (kaiming_uniform_, a=sqrt(5))
            out[key] = torch.empty(shape).uniform_(-bound, bound, generator=gen)
        else:
            raise CheckpointError(f"LLaMA weight {key} is missing and is not a finetune delta")
    return out
