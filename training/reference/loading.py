"""Build the reference model from files: a checkpoint on top of a Meta LLaMA folder and a MERT folder.

Two checkpoint kinds are read:
(a) the published MU-LLaMA ``checkpoint.pth`` (``{'model': state_dict, 'args': ...}``), full or holding
    only the trained parts (then the folders supply the base weights);
(b) our own training checkpoints (``{'format': 'mullama-checkpoint', 'format_version', 'config', ...}``),
    whose ``model`` uses the same published key names.

Memory: files are memory-mapped and every tensor is cast on its own into the model (which is built on
the ``meta`` device), so a 7B checkpoint is never held twice.
"""

from __future__ import annotations

import argparse
import logging
import pickle
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from mullama_sdk.errors import CheckpointError, ConfigError
from training.reference.checkpoint_layout import split_published
from training.reference.dims import AdapterDims, DeltaDims, InjectionDims, LlamaParams, MullamaConfig
from training.reference.llama import Llama
from training.reference.mert import MertEncoder, read_mert_folder, to_hubert_state_dict
from training.reference.model import MullamaModel
from training.reference.state_dict import check_keys, load_strict
from training.reference.tokenizer import Tokenizer

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "mullama-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1

# Meta's LLaMA-1 shards carry the RoPE table; it is derived from params, so it is dropped.
_DERIVED_LLAMA_KEYS = {"rope.freqs"}
# How Meta's model-parallel shards split each matrix (column-parallel on dim 0, row-parallel on dim 1).
_SHARD_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}


@dataclass
class Checkpoint:
    """A checkpoint file's content: published-layout tensors plus our config when it has one."""

    path: Path
    model: dict[str, torch.Tensor]
    config: dict[str, Any] | None
    args: Any
    info: dict[str, Any]


def torch_load(path: Path, *, trust_pickle: bool = False) -> Any:
    """``torch.load`` memory-mapped and restricted to tensors and plain containers where possible.

    The published checkpoint stores its training ``args`` as an ``argparse.Namespace``; that class is
    allow-listed. Anything else that needs arbitrary unpickling is refused unless ``trust_pickle``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    def refused(e: Exception) -> CheckpointError:
        return CheckpointError(
            f"{path} holds objects beyond tensors and plain containers ({e}); "
            "if you trust where it came from, load it with trust_pickle=True (CLI: --trust-checkpoint)"
        )

    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(path, map_location="cpu", mmap=True, weights_only=not trust_pickle)
        except pickle.UnpicklingError as e:
            raise refused(e) from e
        except EOFError as e:
            raise CheckpointError(f"cannot read {path}: the file is empty or truncated") from e
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise CheckpointError(f"cannot read {path}: {e}") from e
        # Files in torch's legacy (pre-1.6, non-zip) format cannot be memory-mapped.
        log.warning("%s is in torch's legacy format: loading it without mmap (needs RAM for all of it)", path)
        try:
            return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
        except pickle.UnpicklingError as e:  # the legacy format is refused the same way
            raise refused(e) from e
        except (RuntimeError, EOFError) as e:
            raise CheckpointError(f"cannot read {path}: {str(e) or 'the file is empty or truncated'}") from e


def read_checkpoint(path: Path, *, trust_pickle: bool = False) -> Checkpoint:
    """Read either checkpoint kind (see module docstring)."""
    raw = torch_load(path, trust_pickle=trust_pickle)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a dict at the top level, got {type(raw).__name__}")
    if raw.get("format") == CHECKPOINT_FORMAT:
        version = raw.get("format_version")
        if not isinstance(version, int) or version > CHECKPOINT_FORMAT_VERSION:
            raise CheckpointError(
                f"{path}: checkpoint format version {version!r} is newer than this code reads "
                f"(<= {CHECKPOINT_FORMAT_VERSION}); upgrade mullama-sdk"
            )
        info = {k: v for k, v in raw.items() if k not in ("model", "config", "optimizer")}
        return Checkpoint(Path(path), _strip_ddp_prefix(raw["model"], path), dict(raw["config"]), None, info)
    if "model" in raw and isinstance(raw["model"], dict):
        return Checkpoint(Path(path), _strip_ddp_prefix(raw["model"], path), None, raw.get("args"),
                          {"epoch": raw.get("epoch")})
    raise CheckpointError(
        f"{path}: neither a published MU-LLaMA checkpoint (dict with 'model') nor a {CHECKPOINT_FORMAT} "
        f"file; top-level keys: {sorted(map(str, raw))[:10]}"
    )


_DDP_PREFIX = "module."


def _strip_ddp_prefix(sd: dict[str, Any], path: Path) -> dict[str, Any]:
    """The state dict with ``module.`` removed from every key when every key has it (a DDP-wrapped save)."""
    sd = dict(sd)
    if sd and all(isinstance(k, str) and k.startswith(_DDP_PREFIX) for k in sd):
        log.info("%s: state dict saved from a DDP-wrapped model; stripped the %r prefix of its %d keys",
                 path, _DDP_PREFIX, len(sd))
        return {k[len(_DDP_PREFIX):]: v for k, v in sd.items()}
    return sd


def save_checkpoint(
    path: Path, model_state: dict[str, torch.Tensor], config: MullamaConfig, **info: Any
) -> None:
    """Write our self-describing checkpoint (published key names + config + format version).

    ``info`` (stage, step, optimizer state, RNG state, ...) is stored beside the weights. The file is
    written to a temporary name and renamed, so a crash never leaves a truncated checkpoint.
    """
    path = Path(path)
    payload = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_FORMAT_VERSION,
               "config": config.to_dict(), "model": model_state, **info}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def _layer_count(keys) -> int:
    ids = {int(m.group(1)) for k in keys if (m := re.match(r"layers\.(\d+)\.", k))}
    return max(ids) + 1 if ids else 0


def _load_meta_shards(
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

    Accepted layouts (spec section 2): the model folder itself with ``tokenizer.model`` next to the weights
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


@dataclass
class ModelSources:
    """Every tensor of one model, by published-layout part, still memory-mapped; plus the config.

    This is what both :func:`load_reference` and the export stream from: nothing here has been
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
        CheckpointError, ConfigError: see :func:`load_reference`.
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
        base = _load_meta_shards(llama_dir, missing, expected, trust_pickle)
        _check_llama_dims(params, base, f"{llama_dir}/consolidated.*.pth")
        llama.update(base)
    # Every consumer (reference model, GGUF writer) gets a complete, correctly shaped set: fail here,
    # before any export work, naming what is missing, unexpected or mis-shaped.
    check_keys(shapes, llama, what="LLaMA")
    mert = to_hubert_state_dict(parts["mert"] or _read_mert_weights(mert_dir, trust_pickle))
    return ModelSources(config, tokenizer, ckpt, llama, mert, parts["adapter"], prefix, llama_dir, mert_dir)


def _expected_llama_shapes(params: LlamaParams, deltas: DeltaDims) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in Llama(params, deltas).state_dict().items()}


def load_reference(
    checkpoint: Path,
    llama_dir: Path,
    mert_dir: Path,
    *,
    dtype: torch.dtype = torch.float32,
    trust_pickle: bool = False,
) -> MullamaModel:
    """Load MU-LLaMA for inference, strictly (every missing or unexpected key is named).

    Args:
        checkpoint: Published ``checkpoint.pth`` or one of our training checkpoints.
        llama_dir: Meta LLaMA folder: ``params.json``, optional ``consolidated.*.pth``, ``tokenizer.model``
            there or one level up; or the folder holding exactly one such model folder
            (see :func:`resolve_llama_dir`).
        mert_dir: MERT folder: ``config.json``, optional ``preprocessor_config.json`` and weights.
        dtype: Precision of the LLaMA part (MERT and the adapter always run in float32).
        trust_pickle: Allow arbitrary unpickling (only for files from a trusted source).

    Raises:
        CheckpointError: missing/unexpected keys or tensors, unreadable files.
        ConfigError: dimensions that disagree between params.json, the tokenizer and the tensors.
    """
    src = open_sources(checkpoint, llama_dir, mert_dir, trust_pickle=trust_pickle)
    return build_model(src, dtype=dtype)


def _with_music_part(src: ModelSources) -> MullamaModel:
    """A model on the ``meta`` device with its music part (MERT, adapter, prefix queries) loaded."""
    with torch.device("meta"):
        model = MullamaModel(src.config)
    # MERT is small and its weight-norm parametrization does not survive meta construction: build it real.
    model.mert = MertEncoder(model.mert.hubert.config, do_normalize=src.config.mert_do_normalize)
    model.mert.load_weights(src.mert)
    load_strict(model.adapter, src.adapter, what="music adapter", assign=True)
    load_strict(model.prefix_query, {"weight": src.prefix_query}, what="prefix query", assign=True)
    model.adapter.float()
    model.prefix_query.float()
    model.tokenizer = src.tokenizer
    return model


def build_model(src: ModelSources, *, dtype: torch.dtype = torch.float32) -> MullamaModel:
    """Materialise a :class:`MullamaModel` from :func:`open_sources`, one tensor at a time."""
    model = _with_music_part(src)
    model.llama.to(dtype)
    load_strict(model.llama, src.llama, what="LLaMA", assign=True)
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:
        raise CheckpointError(f"no weights were loaded for {on_meta[:10]}")
    return model.eval()


def build_music_model(src: ModelSources) -> MullamaModel:
    """The music half only: MERT, adapter, prefix queries and the injected layers' attention weights.

    Everything else in LLaMA stays on the ``meta`` device (no memory). Enough for
    :meth:`MullamaModel.music_query` and :meth:`MullamaModel.injection_vectors` at 7B size, which is
    what the ONNX export needs; running the LLM needs :func:`build_model`.
    """
    model = _with_music_part(src)
    for layer in model.inject_layers:
        attn = model.llama.layers[layer].attention
        prefix = f"layers.{layer}.attention."
        own = {k: v for k, v in attn.state_dict().items() if "wq" not in k}
        sd = {}
        for k in own:
            if prefix + k not in src.llama:
                raise CheckpointError(f"no weights for LLaMA {prefix + k} (needed by the music injection)")
            sd[k] = src.llama[prefix + k].float()
        attn.load_state_dict(sd, strict=False, assign=True)
        attn.float()
    return model.eval()


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


def _read_mert_weights(mert_dir: Path, trust_pickle: bool) -> dict[str, torch.Tensor]:
    st = mert_dir / "model.safetensors"
    if st.is_file():
        from safetensors.torch import load_file

        return load_file(str(st))
    pt = mert_dir / "pytorch_model.bin"
    if pt.is_file():
        sd = torch_load(pt, trust_pickle=trust_pickle)
        if not isinstance(sd, dict):
            raise CheckpointError(f"{pt}: expected a state dict, got {type(sd).__name__}")
        return sd
    raise CheckpointError(
        f"no MERT weights: the checkpoint has no mert_model.* keys and {mert_dir} has neither "
        "model.safetensors nor pytorch_model.bin"
    )
