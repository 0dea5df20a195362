"""Meta-format LLaMA folders: which published layouts ``--llama-dir`` may name, and reading their shards.

Meta's download and MU-LLaMA's repository arrange the same files differently (docs/model.md section 2); this
module finds ``params.json``, the ``consolidated.*.pth`` shards and ``tokenizer.model`` in each, refuses
a Hugging Face layout with a message saying what to pass instead, and joins model-parallel shards.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from mullama_sdk.errors import CheckpointError, ConfigError
from training.reference.loading import torch_load

log = logging.getLogger(__name__)

# Meta's LLaMA-1 shards carry the RoPE table; it is derived from params, so it is dropped.
_DERIVED_LLAMA_KEYS = {"rope.freqs"}
# How Meta's model-parallel shards split each matrix (column-parallel on dim 0, row-parallel on dim 1).
_SHARD_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}


@dataclass(frozen=True)
class LlamaFolder:
    """Where the files of a Meta-format LLaMA are, whichever published layout holds them.

    Attributes:
        weights: The model folder: ``params.json`` and ``consolidated.*.pth`` (and Meta's ``checklist.chk``).
        tokenizer: ``tokenizer.model``, in ``weights`` or its parent.
    """

    weights: Path
    tokenizer: Path

    @property
    def params(self) -> Path:
        return self.weights / "params.json"


_META_LAYOUT = ("Meta's original LLaMA format: a model folder with params.json and consolidated.*.pth "
                "(llama-2-7b/ or 7B/), tokenizer.model beside it or one level up")
_HF_WEIGHTS = ("model.safetensors", "model-*.safetensors", "model.safetensors.index.json",
               "pytorch_model*.bin", "pytorch_model.bin.index.json")


def _is_hf_layout(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(any(folder.glob(g)) for g in _HF_WEIGHTS)


def resolve_llama_dir(llama_dir: Path) -> LlamaFolder:
    """Find the model folder and ``tokenizer.model`` that ``--llama-dir`` names.

    Accepted layouts (docs/model.md section 2): the model folder itself with ``tokenizer.model`` next to the weights
    or one level up (Meta's LLaMA-2 download keeps it beside ``llama-2-7b/``, MU-LLaMA's ``LLaMA/`` beside
    ``7B/``); or the parent folder holding exactly one model folder (a subfolder with ``params.json``).

    Raises:
        ConfigError: naming the folder and what to pass instead (including for a Hugging Face layout).
    """
    llama_dir = Path(llama_dir)
    if not llama_dir.is_dir():
        raise ConfigError(f"LLaMA folder not found: {llama_dir} (--llama-dir takes {_META_LAYOUT})")
    if (llama_dir / "params.json").is_file():
        weights = llama_dir
    else:
        models = sorted(d for d in llama_dir.iterdir() if d.is_dir() and (d / "params.json").is_file())
        if not models and _is_hf_layout(llama_dir):
            raise ConfigError(
                f"{llama_dir} is an HF-layout folder (config.json + model.safetensors/pytorch_model*.bin, no "
                f"params.json); --llama-dir takes {_META_LAYOUT}. Download Meta's original checkpoint "
                "(e.g. meta-llama/Llama-2-7b, not the -hf repository) and pass its model folder"
            )
        if not models:
            raise ConfigError(
                f"{llama_dir} has no params.json, nor a model folder holding one; --llama-dir takes {_META_LAYOUT}"
            )
        if len(models) > 1:
            raise ConfigError(
                f"{llama_dir} holds {len(models)} LLaMA model folders ({', '.join(d.name for d in models)}); "
                "pass the one to use as --llama-dir"
            )
        weights = models[0]
        log.info("LLaMA: using %s, the only model folder in %s", weights, llama_dir)
    for folder in (weights, weights.parent):
        if (folder / "tokenizer.model").is_file():
            return LlamaFolder(weights, folder / "tokenizer.model")
    raise ConfigError(
        f"no tokenizer.model in {weights} or {weights.parent}: Meta's download keeps it one level above the "
        "model folder (llama/tokenizer.model beside llama/llama-2-7b/); put it there or next to params.json"
    )


def load_meta_shards(
    llama_dir: Path, needed: set[str], expected: set[str], trust_pickle: bool
) -> dict[str, torch.Tensor]:
    """The ``needed`` base tensors from ``consolidated.*.pth``, shards joined the way Meta split them."""
    shards = sorted(llama_dir.glob("consolidated.*.pth"))
    if not shards:
        raise CheckpointError(
            f"the checkpoint lacks LLaMA base weights ({len(needed)} tensors, e.g. {sorted(needed)[0]}) and "
            f"{llama_dir} has no consolidated.*.pth shards to take them from"
        )
    parts = [torch_load(s, trust_pickle=trust_pickle) for s in shards]
    for shard, part in zip(shards, parts):
        unexpected = set(part) - expected - _DERIVED_LLAMA_KEYS
        if unexpected:
            raise CheckpointError(f"{shard}: unexpected key(s) {sorted(unexpected)[:10]} for this LLaMA")
    out = {}
    for key in needed:
        pieces = [p[key] for p in parts if key in p]
        if not pieces:
            continue  # reported as missing by the strict load
        if len(pieces) == 1 or pieces[0].dim() == 1:  # norms are replicated, not split
            out[key] = pieces[0]
        else:
            leaf = key.rsplit(".", 2)[-2] if key.count(".") >= 2 else key.split(".")[0]
            out[key] = torch.cat(pieces, dim=_SHARD_DIM[leaf])
    return out
