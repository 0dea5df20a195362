"""Build the reference model from :class:`~training.reference.model_sources.ModelSources`, one tensor at a time.

The model is constructed on the ``meta`` device and every tensor is cast on its own into it, so a 7B
checkpoint is never held twice. :func:`load_reference` is the usual entry point (files -> model).
"""

from __future__ import annotations

from pathlib import Path

import torch

from mullama_sdk.errors import CheckpointError
from training.reference.mert import MertEncoder
from training.reference.model import MullamaModel
from training.reference.model_sources import ModelSources, open_sources
from training.reference.state_dict import load_strict


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
            (see :func:`training.reference.llama_folder.resolve_llama_dir`).
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

