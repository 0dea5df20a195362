"""Every tensor of one model, still memory-mapped, and the config they imply, checked for agreement.

:func:`open_sources` puts a checkpoint (either kind, :mod:`training.reference.loading`) on top of a
Meta LLaMA folder (:mod:`training.reference.llama_folder`) and a MERT folder, infers the dimensions
from the tensors and checks them against ``params.json``, the tokenizer, MERT's config and the
checkpoint's saved config. Both the reference model (:mod:`training.reference.build`) and the export
stream from the result, so bad inputs fail here, before any work, with a message naming the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from mullama_sdk.errors import CheckpointError, ConfigError
from training.reference.checkpoint_layout import split_published
from training.reference.dims import AdapterDims, DeltaDims, InjectionDims, LlamaParams, MullamaConfig
from training.reference.llama import Llama
from training.reference.llama_folder import load_meta_shards, resolve_llama_dir
from training.reference.loading import Checkpoint, read_checkpoint, read_mert_weights
from training.reference.mert import read_mert_folder, to_hubert_state_dict
from training.reference.state_dict import check_keys
from training.reference.tokenizer import Tokenizer


@dataclass
class ModelSources:
    """Every tensor of one model, by published-layout part, still memory-mapped; plus the config.

    This is what both :func:`training.reference.build.load_reference` and the export stream from: nothing here has been
    copied or converted yet.
    """

    config: MullamaConfig
    tokenizer: Tokenizer
    checkpoint: Checkpoint
    llama: dict[str, torch.Tensor]
    mert: dict[str, torch.Tensor]
    adapter: dict[str, torch.Tensor]
    prefix_query: torch.Tensor
    #: The LLaMA model folder (params.json, consolidated.*.pth) that ``--llama-dir`` resolved to.
    llama_dir: Path
    mert_dir: Path


def open_sources(
    checkpoint: Path | Checkpoint, llama_dir: Path, mert_dir: Path, *, trust_pickle: bool = False
) -> ModelSources:
    """Read configs, tokenizer and (memory-mapped) tensors; check that all dimensions agree.

    LLaMA tensors present in the checkpoint win over the Meta shards (trained norms replace the base
    ones); MERT weights come from the checkpoint's ``mert_model.*`` when present, else the MERT folder.
    Key sets are not checked here: :func:`training.reference.state_dict.check_keys` does that against a model.
    ``checkpoint`` may also be an in-memory :class:`Checkpoint` (training starts from freshly
    initialised adapter tensors that were never written to a file).

    Raises:
        CheckpointError, ConfigError: see :func:`training.reference.build.load_reference`.
    """
    mert_dir = Path(mert_dir)
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else read_checkpoint(checkpoint, trust_pickle=trust_pickle)
    parts = split_published(ckpt.model)
    folder = resolve_llama_dir(llama_dir)
    llama_dir = folder.weights

    tokenizer = Tokenizer(folder.tokenizer)
    params = LlamaParams.from_params_json(folder.params, vocab_size=tokenizer.n_vocab)
    if params.vocab_size != tokenizer.n_vocab:
        raise ConfigError(
            f"{folder.params}: params.json vocab_size {params.vocab_size} != {tokenizer.path} size "
            f"{tokenizer.n_vocab} (Meta's LLaMA-2 files say -1: the tokenizer's size)"
        )
    _check_llama_dims(params, parts["llama"], str(ckpt.path))

    mert_raw, do_normalize = read_mert_folder(mert_dir)
    if not parts["prefix"]:
        raise CheckpointError(f"{ckpt.path} lacks prefix_query.weight (the per-layer prefix queries)")
    prefix = parts["prefix"]["weight"]
    query_len = _query_len(ckpt)
    if prefix.shape[0] % query_len:
        raise CheckpointError(f"prefix_query has {prefix.shape[0]} rows, not a multiple of query_len {query_len}")
    deltas = _delta_dims(parts["llama"])
    config = MullamaConfig(
        llama=params,
        mert=mert_raw,
        adapter=_adapter_dims(parts["adapter"]),
        injection=InjectionDims(n_layers=prefix.shape[0] // query_len, query_len=query_len),
        deltas=deltas,
        mert_do_normalize=do_normalize,
    )
    if ckpt.config is not None:
        _check_against_saved_config(config, ckpt)
    _check_cross_dims(config)

    llama = dict(parts["llama"])
    shapes = _expected_llama_shapes(params, deltas)
    expected = set(shapes)
    missing = expected - set(llama)
    if missing:
        base = load_meta_shards(llama_dir, missing, expected, trust_pickle)
        _check_llama_dims(params, base, f"{llama_dir}/consolidated.*.pth")
        llama.update(base)
    # Every consumer (reference model, GGUF writer) gets a complete, correctly shaped set: fail here,
    # before any export work, naming what is missing, unexpected or mis-shaped.
    check_keys(shapes, llama, what="LLaMA")
    mert = to_hubert_state_dict(parts["mert"] or read_mert_weights(mert_dir, trust_pickle))
    return ModelSources(config, tokenizer, ckpt, llama, mert, parts["adapter"], prefix, llama_dir, mert_dir)


def _expected_llama_shapes(params: LlamaParams, deltas: DeltaDims) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in Llama(params, deltas).state_dict().items()}


def _layer_count(keys) -> int:
    ids = {int(m.group(1)) for k in keys if (m := re.match(r"layers\.(\d+)\.", k))}
    return max(ids) + 1 if ids else 0


def _adapter_dims(adapter: dict[str, torch.Tensor]) -> AdapterDims:
    try:
        mix, proj = adapter["layer_mix.weight"], adapter["proj.weight"]
        n_blocks = sum(1 for k in adapter if k.endswith(".norm.weight"))
        hidden = adapter["blocks.0.w1.weight"].shape[0] if n_blocks else 0
    except KeyError as e:
        raise CheckpointError(f"checkpoint lacks music-adapter weight {e} (published name mu_mert_*)") from e
    return AdapterDims(n_states=mix.shape[1], mert_dim=proj.shape[1], dim=proj.shape[0],
                       n_blocks=n_blocks, block_hidden=hidden)


def _delta_dims(llama: dict[str, torch.Tensor]) -> DeltaDims:
    lora = llama.get("layers.0.attention.lora_wq_l1.weight")
    return DeltaDims(bias="layers.0.attention.wq.bias" in llama, lora_rank=0 if lora is None else lora.shape[0])


def _check_llama_dims(p: LlamaParams, llama: dict[str, torch.Tensor], source: str) -> None:
    emb = llama.get("tok_embeddings.weight")
    if emb is not None and tuple(emb.shape) != (p.vocab_size, p.dim):
        raise ConfigError(
            f"params.json and tokenizer say vocab {p.vocab_size} x dim {p.dim}, but "
            f"tok_embeddings.weight in {source} is {list(emb.shape)}"
        )
    w1 = llama.get("layers.0.feed_forward.w1.weight")
    if w1 is not None and tuple(w1.shape) != (p.hidden_dim, p.dim):
        raise ConfigError(
            f"params.json gives FFN width {p.hidden_dim} (dim {p.dim}), but layers.0.feed_forward.w1.weight "
            f"in {source} is {list(w1.shape)}"
        )
    n = _layer_count(llama)
    if n and n != p.n_layers:
        raise ConfigError(f"params.json says n_layers={p.n_layers}, but {source} has {n} layers")


def _query_len(ckpt: Checkpoint) -> int:
    if ckpt.config is not None:
        return int(ckpt.config.get("injection", {}).get("query_len", 1))
    return int(getattr(ckpt.args, "query_len", 1) or 1)


def _check_against_saved_config(config: MullamaConfig, ckpt: Checkpoint) -> None:
    saved = MullamaConfig.from_dict(ckpt.config)
    # The folders are the source of MERT's raw config; compare everything the tensors determine.
    if replace(saved, mert=config.mert, mert_do_normalize=config.mert_do_normalize) != config:
        raise ConfigError(
            f"{ckpt.path} was trained for {saved.llama}, {saved.adapter}, {saved.injection}, {saved.deltas}; "
            f"the given files give {config.llama}, {config.adapter}, {config.injection}, {config.deltas}"
        )


def _check_cross_dims(c: MullamaConfig) -> None:
    n_states = int(c.mert.get("num_hidden_layers", 0)) + 1
    if c.adapter.n_states != n_states:
        raise ConfigError(
            f"music adapter mixes {c.adapter.n_states} MERT states but the MERT config has "
            f"{n_states - 1} layers ({n_states} states)"
        )
    if c.adapter.mert_dim != int(c.mert.get("hidden_size", -1)):
        raise ConfigError(
            f"music adapter expects MERT width {c.adapter.mert_dim}, MERT config has {c.mert.get('hidden_size')}"
        )
    if c.adapter.dim != c.llama.dim:
        raise ConfigError(f"music adapter outputs width {c.adapter.dim}, LLaMA dim is {c.llama.dim}")
    c.injection.layer_ids(c.llama.n_layers)

