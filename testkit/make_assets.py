"""Deterministic stand-ins for every file MU-LLaMA needs, in the real formats, generated in seconds.

Nothing is downloaded: the tokenizer is trained on the spot, weights are seeded random values, audio is
synthesised. Two layouts:

* :func:`build_tiny_assets` - tiny widths (LLaMA dim 64, MERT hidden 32) for unit and equivalence tests.
* :func:`build_shape_assets` - real widths (LLaMA-2-7B, MERT-v1-330M) with a configurable LLaMA layer
  count, for benchmarks.

Both write (spec sections 2-3), with the published files' field lists and key sets (only widths shrink):

* ``llama/`` - Meta's original format: ``params.json`` (``vocab_size: -1``, as LLaMA-2's), ``consolidated.00.pth``
  (bf16), ``checklist.chk`` and ``tokenizer.model``. Tiny assets use the published download layout:
  ``llama/tokenizer.model`` + ``llama/tokenizer_checklist.chk`` one level above the model folder ``llama/7B/``
  (MU-LLaMA's ``LLaMA/7B/``; Meta's LLaMA-2 download names it ``llama-2-7b/``). Real-width assets keep the
  flat folder (tokenizer next to the weights), which benchmarks read;
* ``mert/`` - MERT-v1-330M's folder: ``config.json`` (every field of the published one, e.g.
  ``attention_relax: 32.0``), ``preprocessor_config.json``, ``pytorch_model.bin``;
* ``checkpoint.pth`` - the published MU-LLaMA checkpoint layout (full state dict);
* ``checkpoint_deltas.pth`` - the same envelope holding only the trained parts.

Every ``.pth``/``.bin`` is byte-identical to what ``torch.save`` writes for its content, but is written
tensor by tensor (see :func:`_save_streamed`), so a real-width build needs little more memory than the MERT
weights. Base LLaMA weights are exactly representable in bf16 and fp16, so the bf16 shard and the fp16 copy in
``checkpoint.pth`` hold the same numbers.

CLI: ``python -m testkit.make_assets OUT_DIR [--shapes --n-layers N --mert-layers M --llama-only]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import mmap
import random
import struct
import sys
import time
import zipfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm
import soundfile as sf
import torch
from sentencepiece import sentencepiece_model_pb2
from transformers import HubertConfig, HubertModel

from mullama_sdk.prompt import CAPTION_QUESTIONS, PROMPT_TEMPLATE
from training.reference.mert import MERT_PREPROCESSOR, check_mert_config, mert_folder_config
from training.reference.tokenizer import train_llama_tokenizer

__all__ = [
    "AssetDims",
    "ShapeAssets",
    "TinyAssets",
    "build_shape_assets",
    "build_tiny_assets",
    "main",
    "write_test_audio",
]


# --------------------------------------------------------------------------------------------- dimensions
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
_TINY_DIMS = AssetDims(
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

_TINY_VOCAB_SIZE = 512  # room for 256 byte pieces + 3 specials + ~80 characters + merges
_REAL_VOCAB_SIZE = 32000


def _real_dims(n_layers: int, mert_layers: int) -> AssetDims:
    """LLaMA-2-7B / MERT-v1-330M / MU-LLaMA widths with chosen layer counts (spec sections 1-3)."""
    return AssetDims(
        dim=4096,
        n_layers=n_layers,
        n_heads=32,
        multiple_of=256,
        norm_eps=1e-5,
        vocab_size=_REAL_VOCAB_SIZE,
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


# ------------------------------------------------------------------------------------------------ results
@dataclasses.dataclass(frozen=True)
class TinyAssets:
    """Paths and widths of a tiny asset set written by :func:`build_tiny_assets`.

    Attributes:
        root: The output folder.
        llama_dir: The LLaMA model folder ``llama/7B/`` (``params.json``, ``consolidated.00.pth``,
            ``checklist.chk``); its ``tokenizer.model`` is one level up (:attr:`tokenizer`).
        mert_dir: MERT folder (``config.json``, ``preprocessor_config.json``, ``pytorch_model.bin``).
        checkpoint: Full MU-LLaMA checkpoint (published layout).
        checkpoint_deltas: Checkpoint holding only the trained parts.
        audio: Test audio by file name (see :func:`write_test_audio`).
        dims: The widths used.
        llama_root: The download folder ``llama/``: ``tokenizer.model``, ``tokenizer_checklist.chk``, ``7B/``.
        tokenizer: ``llama/tokenizer.model``.
    """

    root: Path
    llama_dir: Path
    mert_dir: Path
    checkpoint: Path
    checkpoint_deltas: Path
    audio: Mapping[str, Path]
    dims: AssetDims
    llama_root: Path
    tokenizer: Path


@dataclasses.dataclass(frozen=True)
class ShapeAssets:
    """Paths and widths of a real-width asset set written by :func:`build_shape_assets`.

    Attributes:
        root: The output folder.
        llama_dir: Meta LLaMA folder.
        mert_dir: MERT folder, ``None`` when built with ``llama_only``.
        checkpoint: Full MU-LLaMA checkpoint, ``None`` when built with ``llama_only``.
        checkpoint_deltas: Trained-parts checkpoint, ``None`` when built with ``llama_only``.
        dims: The widths used.
    """

    root: Path
    llama_dir: Path
    mert_dir: Path | None
    checkpoint: Path | None
    checkpoint_deltas: Path | None
    dims: AssetDims


# ----------------------------------------------------------------------------------------------- builders
def build_tiny_assets(out: Path, seed: int = 0) -> TinyAssets:
    """Write the tiny asset set into ``out`` (created if needed; existing files are overwritten).

    The same ``seed`` gives byte-identical files. Audio and tokenizer do not depend on ``seed``.

    Args:
        out: Output folder.
        seed: Seeds every weight.

    Returns:
        The paths and widths written.
    """
    out = Path(out)
    tokenizer = _train_tokenizer(_TINY_VOCAB_SIZE)
    dims = dataclasses.replace(_TINY_DIMS, vocab_size=_piece_count(tokenizer))
    paths = _write_model_files(out, dims, tokenizer, seed, llama_only=False, model_folder=TINY_MODEL_FOLDER)
    return TinyAssets(
        root=out,
        llama_dir=paths.llama_dir,
        mert_dir=paths.mert_dir,
        checkpoint=paths.checkpoint,
        checkpoint_deltas=paths.checkpoint_deltas,
        audio=write_test_audio(out / "audio"),
        dims=dims,
        llama_root=out / "llama",
        tokenizer=out / "llama" / "tokenizer.model",
    )


def build_shape_assets(
    out: Path, n_layers: int = 2, *, mert_layers: int = 24, seed: int = 0, llama_only: bool = False
) -> ShapeAssets:
    """Write model files at real widths (LLaMA-2-7B, MERT-v1-330M, MU-LLaMA adapter) for benchmarks.

    Sizes: the LLaMA shard is ~0.52 GB + 0.40 GB per layer; ``checkpoint.pth`` adds MERT (~1.3 GB at 24
    layers) and the adapter (~2.4 GB) to an fp16 copy of the shard. Writes are streamed, so memory stays
    around the MERT weights (~1.3 GB) plus one tensor.

    Args:
        out: Output folder.
        n_layers: LLaMA layer count (the real model has 32); ``n_inject = min(20, n_layers)``.
        mert_layers: MERT transformer layer count (the real model has 24).
        seed: Seeds every weight.
        llama_only: Write only ``llama/`` (no MERT, no checkpoints).

    Returns:
        The paths and widths written.
    """
    out = Path(out)
    dims = _real_dims(n_layers, mert_layers)
    tokenizer = _pad_tokenizer(_train_tokenizer(_TINY_VOCAB_SIZE), _REAL_VOCAB_SIZE)
    return _write_model_files(out, dims, tokenizer, seed, llama_only=llama_only)


#: The model folder of the tiny assets' Meta layout: MU-LLaMA's ``LLaMA/7B/`` (tokenizer one level up).
TINY_MODEL_FOLDER = "7B"


def _write_model_files(
    out: Path,
    dims: AssetDims,
    tokenizer: bytes,
    seed: int,
    *,
    llama_only: bool,
    model_folder: str | None = None,
) -> ShapeAssets:
    """Write ``llama/`` and, unless ``llama_only``, ``mert/`` and both checkpoints.

    ``model_folder`` given: Meta's download layout, ``llama/tokenizer.model`` above ``llama/<model_folder>/``;
    ``None``: one flat ``llama/`` folder.
    """
    root = out / "llama"
    llama_dir = root / model_folder if model_folder else root
    llama_dir.mkdir(parents=True, exist_ok=True)
    (root / "tokenizer.model").write_bytes(tokenizer)
    # Meta's llama-2-7b/params.json: these keys, this order, one line; LLaMA-2 says vocab_size -1 (the
    # tokenizer's size).
    params = {
        "dim": dims.dim,
        "multiple_of": dims.multiple_of,
        "n_heads": dims.n_heads,
        "n_layers": dims.n_layers,
        "norm_eps": dims.norm_eps,
        "vocab_size": -1,
    }
    (llama_dir / "params.json").write_text(json.dumps(params))
    _save_streamed(
        llama_dir / "consolidated.00.pth",
        {spec.key: spec for spec in _llama_base_specs(dims, torch.bfloat16)},
        seed,
    )
    # Meta's download checks files with `md5sum -c`: checklist.chk beside the weights, tokenizer_checklist.chk
    # beside tokenizer.model (written only in the download layout, where the tokenizer has its own folder).
    _write_checklist(
        llama_dir / "checklist.chk", [llama_dir / "consolidated.00.pth", llama_dir / "params.json"]
    )
    if model_folder:
        _write_checklist(root / "tokenizer_checklist.chk", [root / "tokenizer.model"])
    if llama_only:
        return ShapeAssets(
            root=out, llama_dir=llama_dir, mert_dir=None, checkpoint=None, checkpoint_deltas=None, dims=dims
        )

    mert_dir = out / "mert"
    mert_dir.mkdir(parents=True, exist_ok=True)
    config = _mert_config(dims)
    (mert_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (mert_dir / "preprocessor_config.json").write_text(
        json.dumps(MERT_PREPROCESSOR, indent=2, sort_keys=True) + "\n"
    )
    mert_sd = _mert_state_dict(config, seed)
    _save_streamed(mert_dir / "pytorch_model.bin", mert_sd, seed)

    full, deltas = _checkpoint_entries(dims, mert_sd)
    del mert_sd
    envelope = {"optimizer": {}, "epoch": 3, "scaler": {}, "args": _checkpoint_args()}
    checkpoint, checkpoint_deltas = out / "checkpoint.pth", out / "checkpoint_deltas.pth"
    _save_streamed(checkpoint, full, seed, envelope=envelope)
    del full
    _save_streamed(checkpoint_deltas, deltas, seed, envelope=envelope)
    return ShapeAssets(
        root=out,
        llama_dir=llama_dir,
        mert_dir=mert_dir,
        checkpoint=checkpoint,
        checkpoint_deltas=checkpoint_deltas,
        dims=dims,
    )


def _write_checklist(path: Path, files: Sequence[Path]) -> None:
    """An ``md5sum`` listing (``<md5>  <name>`` per line) of ``files``, as Meta's ``*checklist.chk``."""
    lines = []
    for f in files:
        md5 = hashlib.md5()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                md5.update(block)
        lines.append(f"{md5.hexdigest()}  {f.name}\n")
    path.write_text("".join(lines))


# ------------------------------------------------------------------------------------------- tensor specs
@dataclasses.dataclass(frozen=True)
class _Random:
    """A tensor of seeded random values ``mean + std * N(0, 1)``, generated when it is written.

    Attributes:
        key: Seeds the values (with the build seed); equal keys give equal values in every file.
        shape: Tensor shape.
        dtype: Stored dtype.
        std: Standard deviation.
        mean: Offset (1.0 for norm weights).
        exact16: Round to bf16 and flush ``|w| < 2**-14`` to zero, so the value is exact in bf16 AND fp16.
    """

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    std: float
    mean: float = 0.0
    exact16: bool = False


_Source = _Random | torch.Tensor

# Norm weights and biases are pushed away from 1 and 0 so a test that drops or swaps one fails.
_NORM_STD = 0.1
_BIAS_STD = 0.1


def _llama_base_specs(d: AssetDims, dtype: torch.dtype) -> Iterator[_Random]:
    """Base LLaMA tensors under Meta's names, in Meta's shard order.

    Matrices use std ``fan_in ** -0.5`` so every projection keeps activations O(1) at any width: logits
    and attention scores come out O(1), neither flat nor saturated.
    """

    def matrix(name: str, rows: int, cols: int) -> _Random:
        return _Random(name, (rows, cols), dtype, std=cols**-0.5, exact16=True)

    def norm(name: str) -> _Random:
        return _Random(name, (d.dim,), dtype, std=_NORM_STD, mean=1.0, exact16=True)

    yield _Random("tok_embeddings.weight", (d.vocab_size, d.dim), dtype, std=1.0, exact16=True)
    yield norm("norm.weight")
    yield matrix("output.weight", d.vocab_size, d.dim)
    for i in range(d.n_layers):
        p = f"layers.{i}."
        for w in ("wq", "wk", "wv", "wo"):
            yield matrix(f"{p}attention.{w}.weight", d.dim, d.dim)
        yield matrix(f"{p}feed_forward.w1.weight", d.ffn_hidden, d.dim)
        yield matrix(f"{p}feed_forward.w2.weight", d.dim, d.ffn_hidden)
        yield matrix(f"{p}feed_forward.w3.weight", d.ffn_hidden, d.dim)
        yield norm(f"{p}attention_norm.weight")
        yield norm(f"{p}ffn_norm.weight")


def _checkpoint_entries(
    d: AssetDims, mert_sd: Mapping[str, torch.Tensor]
) -> tuple[dict[str, _Source], dict[str, _Source]]:
    """The ``model`` dicts of ``checkpoint.pth`` (everything) and ``checkpoint_deltas.pth`` (trained parts).

    Layout and dtypes follow spec section 3: LLaMA matrices fp16 (the same values as the bf16 shard), gates
    fp16, every other trained tensor fp32; trained norms replace the base ones.
    """
    f32, f16 = torch.float32, torch.float16
    full: dict[str, _Source] = {f"mert_model.{name}": t for name, t in mert_sd.items()}
    deltas: dict[str, _Source] = {}

    def trained(
        name: str, shape: tuple[int, ...], std: float, *, mean: float = 0.0, dtype: torch.dtype = f32
    ) -> None:
        full[name] = deltas[name] = _Random(f"trained/{name}", shape, dtype, std=std, mean=mean)

    def lora(prefix: str, fan_in: int, fan_out: int) -> None:
        # The L2 scale makes L2 @ L1 about 30% of the base matrix: clearly visible, still a perturbation.
        trained(f"{prefix}_l1.weight", (d.lora_rank, fan_in), fan_in**-0.5)
        trained(f"{prefix}_l2.weight", (fan_out, d.lora_rank), 0.3 * d.lora_rank**-0.5)

    n = d.mert_n_states
    trained("mu_mert_agg.weight", (1, n, 1), 0.5 / n, mean=1.0 / n)
    trained("mu_mert_agg.bias", (1,), _BIAS_STD)
    # The adapter input is a unit vector, so std 1 makes its projection O(1) per entry.
    trained("mu_mert_proj.weight", (d.dim, d.mert_hidden_size), 1.0)
    trained("mu_mert_proj.bias", (d.dim,), _BIAS_STD)
    for k in range(1, d.adapter_blocks + 1):
        trained(f"mu_mert_norm_{k}.weight", (d.dim,), _NORM_STD, mean=1.0)
        trained(f"mu_mert_f1_{k}.weight", (d.adapter_hidden, d.dim), d.dim**-0.5)
        trained(f"mu_mert_f2_{k}.weight", (d.dim, d.adapter_hidden), d.adapter_hidden**-0.5)
        trained(f"mu_mert_f3_{k}.weight", (d.adapter_hidden, d.dim), d.dim**-0.5)

    base = {spec.key: spec for spec in _llama_base_specs(d, f16)}
    ffn = (("w1", d.dim, d.ffn_hidden), ("w2", d.ffn_hidden, d.dim), ("w3", d.dim, d.ffn_hidden))
    full["llama.tok_embeddings.weight"] = base["tok_embeddings.weight"]
    for i in range(d.n_layers):
        p = f"llama.layers.{i}."
        for w in ("wq", "wk", "wv", "wo"):
            full[f"{p}attention.{w}.weight"] = base[f"layers.{i}.attention.{w}.weight"]
            if w in ("wq", "wo"):
                trained(f"{p}attention.{w}.bias", (d.dim,), _BIAS_STD)
        for w in ("wq", "wk", "wv", "wo"):
            lora(f"{p}attention.lora_{w}", d.dim, d.dim)
        # tanh(0.5 * N(0, 1)) is clearly non-zero for most heads, and of both signs.
        trained(f"{p}attention.gate", (1, d.n_heads, 1, 1), 0.5, dtype=f16)
        for w, _, fan_out in ffn:
            full[f"{p}feed_forward.{w}.weight"] = base[f"layers.{i}.feed_forward.{w}.weight"]
            trained(f"{p}feed_forward.{w}.bias", (fan_out,), _BIAS_STD)
        for w, fan_in, fan_out in ffn:
            lora(f"{p}feed_forward.lora_{w}", fan_in, fan_out)
        trained(f"{p}attention_norm.weight", (d.dim,), _NORM_STD, mean=1.0)
        trained(f"{p}ffn_norm.weight", (d.dim,), _NORM_STD, mean=1.0)
    trained("llama.norm.weight", (d.dim,), _NORM_STD, mean=1.0)
    full["llama.output.weight"] = base["output.weight"]
    # The music query's own offsets are O(1) per entry, like the adapter output they are added to.
    trained("prefix_query.weight", (d.n_inject, d.dim), 1.0)
    return full, deltas


def _checkpoint_args() -> argparse.Namespace:
    """The ``args`` entry: an ``argparse.Namespace`` like the training script pickled (a few fields)."""
    return argparse.Namespace(
        llama_type="7B",
        max_words=96,
        batch_size=1,
        accum_iter=32,
        epochs=4,
        weight_decay=0.05,
        blr=1e-3,
        warmup_epochs=1,
        mert_path="m-a-p/MERT-v1-330M",
    )


# ------------------------------------------------------------------------------------------------- MERT
def mert_330m_config(mert_layers: int = 24) -> dict[str, object]:
    """MERT-v1-330M's ``config.json`` (real widths, random weights are the caller's business)."""
    return _mert_config(_real_dims(1, mert_layers))


def _mert_config(d: AssetDims) -> dict[str, object]:
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


def _mert_state_dict(config: Mapping[str, object], seed: int) -> dict[str, torch.Tensor]:
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
        g = torch.Generator().manual_seed(_seed_for(seed, "mert/norms"))
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, torch.nn.LayerNorm | torch.nn.GroupNorm):
                    module.weight.copy_(1.0 + _NORM_STD * torch.randn(module.weight.shape, generator=g))
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


# ----------------------------------------------------------------------------------------- torch writing
_CHUNK = 1 << 22  # elements per generator call; fixed, because the values depend on it


def _seed_for(seed: int, key: str) -> int:
    """A 63-bit generator seed for one tensor, independent of the order tensors are generated in."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{key}".encode()).digest()[:8], "little") >> 1


def _fill(target: torch.Tensor, spec: _Random, seed: int) -> None:
    """Write ``spec``'s values into ``target`` (contiguous, possibly memory-mapped) chunk by chunk."""
    g = torch.Generator().manual_seed(_seed_for(seed, spec.key))
    flat = target.view(-1)
    for start in range(0, flat.numel(), _CHUNK):
        x = torch.randn(min(_CHUNK, flat.numel() - start), generator=g).mul_(spec.std).add_(spec.mean)
        if spec.exact16:
            x = x.bfloat16()
            # fp16 has 11 significant bits down to 2**-14, bf16 has 8: every bf16 value above that is exact
            # in fp16; below it fp16 turns subnormal and may round, so those become 0.
            x[x.abs() < 2.0**-14] = 0
        flat[start : start + x.numel()].copy_(x)


def _save_streamed(
    path: Path, tensors: Mapping[str, _Source], seed: int, *, envelope: Mapping[str, object] | None = None
) -> None:
    """``torch.save`` ``tensors`` (or ``{"model": tensors, **envelope}``) without holding them in memory.

    ``torch.serialization.skip_data`` writes the file with every storage's bytes left as a hole; the file
    is then memory-mapped (``MAP_SHARED``, so writes reach it) and filled tensor by tensor. That leaves the
    zip CRCs and torch's ``.data/serialization_id`` (derived from the CRCs) stale; :func:`_fix_zip_checksums`
    recomputes them, after which the bytes equal a plain ``torch.save`` (``tests/test_assets.py`` checks).
    """
    # torch.empty reserves address space without touching it, so the skeleton costs no resident memory.
    skeleton = {
        name: src if isinstance(src, torch.Tensor) else torch.empty(src.shape, dtype=src.dtype)
        for name, src in tensors.items()
    }
    obj = skeleton if envelope is None else {"model": skeleton, **envelope}
    with torch.serialization.skip_data():
        torch.save(obj, path)
    del obj, skeleton
    with (
        torch.serialization.set_default_mmap_options(mmap.MAP_SHARED),
        torch.serialization.safe_globals([argparse.Namespace]),
    ):
        loaded = torch.load(path, mmap=True, weights_only=True)
    mapped = loaded if envelope is None else loaded["model"]
    with torch.no_grad():
        for name, src in tensors.items():
            if isinstance(src, torch.Tensor):
                mapped[name].copy_(src)
            else:
                _fill(mapped[name], src, seed)
    del loaded, mapped  # unmaps; the page cache already holds the writes
    _fix_zip_checksums(path)


_ZIP_CENTRAL = b"PK\x01\x02"
_ZIP_DESCRIPTOR = b"PK\x07\x08"
_SERIALIZATION_ID = "/.data/serialization_id"
_U64 = (1 << 64) - 1


def _fix_zip_checksums(path: Path) -> None:
    """Recompute the CRC-32 of every record of a torch zip and torch's ``serialization_id``.

    Torch's writer puts each CRC in a data descriptor after the record (the local header holds 0) and in the
    central directory. ``serialization_id`` is 40 digits: a hash of the record names (unchanged by filling),
    then the fold ``h = h ^ (crc + 0x9e3779b9 + (h << 6) + (h >> 2))`` (c10::hash_combine, 64-bit) over the
    CRCs of all records written before it.
    """
    with zipfile.ZipFile(path) as zf:
        records = zf.infolist()
    with open(path, "r+b") as f:
        central = _central_directory_offset(f)
        combined = 0
        for info in records:
            f.seek(info.header_offset + 26)
            name_len, extra_len = struct.unpack("<HH", f.read(4))
            data_at = info.header_offset + 30 + name_len + extra_len
            if info.filename.endswith(_SERIALIZATION_ID):
                f.seek(data_at)
                old = f.read(info.file_size)
                new = old[:20] + b"%020d" % combined
                if len(new) != len(old):
                    raise RuntimeError(f"{path}: unexpected serialization_id {old!r}")
                f.seek(data_at)
                f.write(new)
            crc = _crc32_of_region(f, data_at, info.file_size)
            combined = combined ^ ((crc + 0x9E3779B9 + ((combined << 6) & _U64) + (combined >> 2)) & _U64)
            f.seek(data_at + info.file_size)
            if f.read(4) != _ZIP_DESCRIPTOR:
                raise RuntimeError(f"{path}: record {info.filename} has no data descriptor")
            f.write(struct.pack("<I", crc))
            f.seek(central)
            header = f.read(46)
            if header[:4] != _ZIP_CENTRAL:
                raise RuntimeError(f"{path}: central directory out of step at {info.filename}")
            f.seek(central + 16)
            f.write(struct.pack("<I", crc))
            central += 46 + sum(struct.unpack("<HHH", header[28:34]))


def _central_directory_offset(f: io.BufferedRandom) -> int:
    """Offset of a zip's central directory, read from its (zip64) end record. Torch writes no comment."""
    f.seek(-22, io.SEEK_END)
    end = f.read(22)
    if end[:4] != b"PK\x05\x06":
        raise RuntimeError("zip end-of-central-directory record not found")
    offset = struct.unpack("<I", end[16:20])[0]
    if offset != 0xFFFFFFFF:
        return offset
    f.seek(-22 - 20, io.SEEK_END)
    locator = f.read(20)
    if locator[:4] != b"PK\x06\x07":
        raise RuntimeError("zip64 end-of-central-directory locator not found")
    f.seek(struct.unpack("<Q", locator[8:16])[0])
    end64 = f.read(56)
    if end64[:4] != b"PK\x06\x06":
        raise RuntimeError("zip64 end-of-central-directory record not found")
    return struct.unpack("<Q", end64[48:56])[0]


def _crc32_of_region(f: io.BufferedRandom, start: int, size: int) -> int:
    """CRC-32 of ``size`` bytes of ``f`` from ``start``, read in 16 MiB blocks."""
    f.seek(start)
    crc = 0
    while size:
        block = f.read(min(size, 1 << 24))
        crc = zlib.crc32(block, crc)
        size -= len(block)
    return crc


# -------------------------------------------------------------------------------------------- tokenizer
# Vocabulary of the caption corpus, as comma-separated strings to keep the lists short.
_INSTRUMENTS = tuple(
    "piano, acoustic guitar, electric guitar, bass guitar, drums, violin, cello, flute, saxophone, "
    "trumpet, synthesizer, organ, strings, harp, ukulele, clarinet, percussion, choir, vocals, "
    "drum machine".split(", ")
)
_MOODS = tuple(
    "calm, happy, sad, energetic, dark, uplifting, melancholic, relaxing, dreamy, tense, playful, "
    "romantic, epic, mellow, aggressive, nostalgic".split(", ")
)
_GENRES = tuple(
    "rock, jazz, pop, classical, electronic, hip-hop, blues, folk, ambient, funk, reggae, metal, "
    "country, soul, techno, lo-fi".split(", ")
)
_KEYS = tuple(
    "C major, A minor, D major, E minor, F major, G major, B flat major, F# minor, E flat major, "
    "C# minor".split(", ")
)
_PLACES = tuple(
    "a film soundtrack, a video game, a quiet evening, a road trip, a dance party, a coffee shop, "
    "a workout, a meditation session, a wedding, an advertisement".split(", ")
)
_TEMPLATES = (
    "This is a {mood} {genre} song featuring {inst} and {inst2}.",
    "The tempo is {bpm} BPM and the song is in the key of {key}.",
    "The music is {mood} and {mood2}, with a steady beat played on the {inst}.",
    "It starts with a soft {inst} intro, then the {inst2} plays the main melody.",
    "The {inst} carries the melody while the {inst2} keeps the rhythm in {meter}/4 time.",
    "This piece would fit {place}: it sounds {mood} and {mood2}.",
    "The song is about {secs} seconds long; it has a {genre} groove at roughly {bpm} beats per minute.",
    "Instruments: {inst}, {inst2} and drums. Genre: {genre}. Mood: {mood}.",
    "A {mood} {genre} track (in {key}) with a repeating {inst} riff!",
    "You can hear a {inst}, a {inst2}, and some light percussion; the mix is {mood}.",
    "The audio is a {genre} instrumental - the {inst} plays chords and the {inst2} answers.",
    "Is it {mood}? Yes, the {inst} and the {key} harmony make it feel {mood2}.",
)


def _tokenizer_corpus() -> list[str]:
    """Training text: MU-LLaMA's prompt (weighted, so its words become single pieces) and music captions.

    The text is split on newlines: a newline never becomes a character piece and is encoded as the byte
    piece ``<0x0A>``, as LLaMA's tokenizer does.
    """
    prompt_lines = [
        line for q in CAPTION_QUESTIONS for line in PROMPT_TEMPLATE.format(question=q).split("\n")
    ]
    rng = random.Random(0)  # fixed: the tokenizer is the same for every build seed
    captions = []
    for _ in range(600):
        fields = {
            "mood": rng.choice(_MOODS),
            "mood2": rng.choice(_MOODS),
            "genre": rng.choice(_GENRES),
            "inst": rng.choice(_INSTRUMENTS),
            "inst2": rng.choice(_INSTRUMENTS),
            "key": rng.choice(_KEYS),
            "bpm": rng.randint(60, 180),
            "meter": rng.choice((3, 4, 6)),
            "secs": rng.randint(5, 240),
            "place": rng.choice(_PLACES),
        }
        captions.append(rng.choice(_TEMPLATES).format(**fields))
    return prompt_lines * 20 + captions


def _train_tokenizer(vocab_size: int) -> bytes:
    """The test tokenizer: LLaMA's conventions (see :func:`training.reference.tokenizer.train_llama_tokenizer`)."""
    return train_llama_tokenizer(_tokenizer_corpus(), vocab_size)


def _piece_count(model: bytes) -> int:
    return spm.SentencePieceProcessor(model_proto=model).get_piece_size()


def _pad_tokenizer(model: bytes, vocab_size: int) -> bytes:
    """Append normal pieces (unique strings, decreasing scores) until the model has ``vocab_size`` pieces.

    Existing ids do not move, so the padded model tokenizes exactly like the unpadded one.
    """
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model)
    score = min(p.score for p in proto.pieces)
    for i in range(vocab_size - len(proto.pieces)):
        piece = proto.pieces.add()
        piece.piece = f"\u2581pad{i:05d}"
        piece.score = score - 1.0 - i
        piece.type = sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL
    proto.trainer_spec.vocab_size = vocab_size
    padded = proto.SerializeToString(deterministic=True)
    if _piece_count(padded) != vocab_size:
        raise RuntimeError(f"padded tokenizer has {_piece_count(padded)} pieces, expected {vocab_size}")
    return padded


# ------------------------------------------------------------------------------------------------ audio
@dataclasses.dataclass(frozen=True)
class _Song:
    """Musical parameters of one synthesised clip."""

    seconds: float
    sample_rate: int
    stereo: bool
    tempo_bpm: float
    tonic_midi: int
    minor: bool
    rolloff: float  # partial k has amplitude k ** -rolloff: small = bright, large = mellow
    drums: float  # gain of the drum kit
    seed: int


#: Three clips that differ in tempo, key, mode, timbre and drum level so tests can tell them apart. The drum
#: level matters most to the tiny random MERT: its GroupNorm standardises every channel over the clip, which
#: hides spectral balance and leaves mostly the transient-versus-sustained character.
_SONGS = {
    "music_24k_mono": _Song(
        seconds=4.0,
        sample_rate=24000,
        stereo=False,
        tempo_bpm=76,
        tonic_midi=45,
        minor=True,
        rolloff=2.5,
        drums=0.3,
        seed=1,
    ),
    "music_44k_stereo": _Song(
        seconds=3.0,
        sample_rate=44100,
        stereo=True,
        tempo_bpm=128,
        tonic_midi=62,
        minor=False,
        rolloff=1.0,
        drums=1.0,
        seed=2,
    ),
    "music_24k_mono_10s": _Song(
        seconds=10.0,
        sample_rate=24000,
        stereo=False,
        tempo_bpm=150,
        tonic_midi=65,
        minor=False,
        rolloff=0.7,
        drums=2.5,
        seed=3,
    ),
}

_MAJOR = (0, 2, 4, 5, 7, 9, 11)
_MINOR = (0, 2, 3, 5, 7, 8, 10)
_OGG_SERIAL = 0x4D4C4C41  # fixed Ogg stream serial: libsndfile draws a time-seeded one


def write_test_audio(out: Path) -> dict[str, Path]:
    """Write the synthesised test clips into ``out`` (PCM_16); deterministic, independent of any seed.

    Files: ``music_24k_mono.wav`` (4 s, 24 kHz mono; A minor, 76 BPM, dark, soft drums),
    ``music_44k_stereo.wav`` (3 s, 44.1 kHz stereo; D major, 128 BPM, bright) and the same stereo content as
    ``music_44k_stereo.flac`` (identical samples) and ``music_44k_stereo.ogg`` (Vorbis),
    ``music_24k_mono_10s.wav`` (10 s, 24 kHz mono; F major, 150 BPM, brightest, loud drums).

    Args:
        out: Output folder (created if needed).

    Returns:
        Paths by file name.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for stem, song in _SONGS.items():
        # Quantise once: libsndfile's float->PCM_16 rounding differs between WAV and FLAC by one LSB.
        pcm = np.clip(np.round(_render(song) * 32768), -32768, 32767).astype(np.int16)
        wav = out / f"{stem}.wav"
        sf.write(wav, pcm, song.sample_rate, subtype="PCM_16")
        paths[wav.name] = wav
        if song.stereo:
            flac = out / f"{stem}.flac"
            sf.write(flac, pcm, song.sample_rate, format="FLAC", subtype="PCM_16")
            paths[flac.name] = flac
            buffer = io.BytesIO()
            sf.write(buffer, pcm / 32768, song.sample_rate, format="OGG", subtype="VORBIS")
            ogg = out / f"{stem}.ogg"
            ogg.write_bytes(_fix_ogg_serial(buffer.getvalue(), _OGG_SERIAL))
            paths[ogg.name] = ogg
    return paths


def _render(song: _Song) -> np.ndarray:
    """Synthesise a clip: chord pad, bass, melody with vibrato, kick/snare/hat; peak 0.5.

    Returns:
        ``(n,)`` for mono or ``(n, 2)`` for stereo, float64.
    """
    sr = song.sample_rate
    rng = np.random.default_rng(song.seed)
    n = round(song.seconds * sr)
    mix = np.zeros((n, 2))
    beat = 60.0 / song.tempo_bpm
    scale = _MINOR if song.minor else _MAJOR
    progression = (0, 5, 2, 6) if song.minor else (0, 4, 5, 3)  # i-VI-III-VII / I-V-vi-IV

    def pitch(degree: int) -> int:
        octave, step = divmod(degree, 7)
        return song.tonic_midi + 12 * octave + scale[step]

    for bar in range(int(np.ceil(song.seconds / (4 * beat)))):
        t0 = bar * 4 * beat
        root = progression[bar % len(progression)]
        pad = {"length": 4 * beat, "amp": 0.10, "rolloff": song.rolloff, "adsr": (0.08, 0.3, 0.7, 0.3)}
        for voice, pan in zip((root, root + 2, root + 4), (-0.4, 0.0, 0.4)):
            _add_note(mix, sr, start=t0, midi=pitch(voice), pan=pan, **pad)
        bass = {
            "length": 1.5 * beat,
            "amp": 0.22,
            "rolloff": song.rolloff + 0.5,
            "adsr": (0.01, 0.2, 0.6, 0.1),
        }
        for b in (0, 2):
            _add_note(mix, sr, start=t0 + b * beat, midi=pitch(root - 14), pan=0.0, **bass)
        lead = {"length": 0.45 * beat, "amp": 0.16, "rolloff": song.rolloff, "adsr": (0.005, 0.1, 0.5, 0.08)}
        for eighth in range(8):
            if rng.random() < 0.2:
                continue  # a rest
            degree = root + 7 + int(rng.choice((0, 2, 4, 7, 9, 11, 1, 3)))
            _add_note(
                mix,
                sr,
                start=t0 + eighth * beat / 2,
                midi=pitch(degree),
                pan=0.25,
                vibrato_cents=25.0,
                **lead,
            )
        for b in range(4):
            _add_drum(mix, sr, t0 + b * beat, "kick" if b % 2 == 0 else "snare", song.drums, rng)
            for half in (0.0, 0.5):
                _add_drum(mix, sr, t0 + (b + half) * beat, "hat", song.drums, rng)
    out = mix if song.stereo else mix.mean(axis=1)
    return out * (0.5 / np.abs(out).max())


def _pan_gains(pan: float) -> tuple[float, float]:
    """Constant-power gains for ``pan`` in [-1 (left), 1 (right)]."""
    angle = (pan + 1.0) * np.pi / 4.0
    return float(np.cos(angle)), float(np.sin(angle))


def _add_note(
    mix: np.ndarray,
    sr: int,
    *,
    start: float,
    length: float,
    midi: int,
    amp: float,
    pan: float,
    rolloff: float,
    adsr: tuple[float, float, float, float],
    vibrato_cents: float = 0.0,
) -> None:
    """Add a harmonic tone with an ADSR envelope (attack, decay, sustain level, release) to ``mix``.

    Args:
        mix: ``(n, 2)`` buffer to add into.
        sr: Sample rate.
        start: Onset in seconds.
        length: Seconds until the release starts.
        midi: MIDI pitch.
        amp: Peak amplitude.
        pan: Stereo position in [-1, 1].
        rolloff: Partial ``k`` has amplitude ``k ** -rolloff``.
        adsr: Attack and decay in seconds, sustain level, release in seconds.
        vibrato_cents: Depth of a 5.5 Hz vibrato.
    """
    attack, decay, sustain, release = adsr
    i0 = round(start * sr)
    count = min(round((length + release) * sr), mix.shape[0] - i0)
    if count <= 0:
        return
    t = np.arange(count) / sr
    freq = 440.0 * 2.0 ** ((midi - 69) / 12) * 2.0 ** (vibrato_cents / 1200 * np.sin(2 * np.pi * 5.5 * t))
    phase = 2 * np.pi * np.cumsum(freq) / sr
    tone = np.zeros(count)
    # At most 12 partials: enough for a distinct timbre, and they dominate the build time.
    for k in range(1, min(12, int(0.45 * sr / freq.max())) + 1):
        tone += k**-rolloff * np.sin(k * phase)
    env = np.interp(
        t,
        (0.0, attack, attack + decay, max(length, attack + decay), length + release),
        (0.0, 1.0, sustain, sustain, 0.0),
    )
    left, right = _pan_gains(pan)
    mix[i0 : i0 + count] += (amp * env * tone)[:, None] * (left, right)


def _add_drum(
    mix: np.ndarray, sr: int, start: float, kind: str, gain: float, rng: np.random.Generator
) -> None:
    """Add a kick (pitch-swept sine), snare (noise + body tone) or hat (differentiated noise) hit."""
    i0 = round(start * sr)
    count = min(round({"kick": 0.3, "snare": 0.2, "hat": 0.06}[kind] * sr), mix.shape[0] - i0)
    if count <= 0:
        return
    t = np.arange(count) / sr
    if kind == "kick":
        phase = 2 * np.pi * np.cumsum(50.0 + 90.0 * np.exp(-t / 0.03)) / sr
        hit, pan = 0.5 * np.sin(phase) * np.exp(-t / 0.12), 0.0
    elif kind == "snare":
        noise = rng.standard_normal(count)
        hit = 0.2 * noise * np.exp(-t / 0.05) + 0.25 * np.sin(2 * np.pi * 185 * t) * np.exp(-t / 0.08)
        pan = -0.1
    else:
        noise = np.diff(rng.standard_normal(count + 1))  # differencing tilts white noise towards the highs
        hit, pan = 0.06 * noise * np.exp(-t / 0.012), 0.35
    left, right = _pan_gains(pan)
    mix[i0 : i0 + count] += gain * hit[:, None] * (left, right)


def _ogg_crc_table() -> tuple[int, ...]:
    """Table of Ogg's page CRC-32 (polynomial 0x04C11DB7, not reflected, init 0)."""
    table = []
    for i in range(256):
        r = i << 24
        for _ in range(8):
            r = ((r << 1) ^ 0x04C11DB7) if r & 0x80000000 else r << 1
        table.append(r & 0xFFFFFFFF)
    return tuple(table)


_OGG_CRC_TABLE = _ogg_crc_table()


def _fix_ogg_serial(data: bytes, serial: int) -> bytes:
    """Set the stream serial number of every Ogg page to ``serial`` and recompute the page CRCs."""
    out = bytearray(data)
    pos = 0
    while pos < len(out):
        if out[pos : pos + 4] != b"OggS":
            raise RuntimeError(f"not an Ogg page at byte {pos}")
        segments = out[pos + 26]
        end = pos + 27 + segments + sum(out[pos + 27 : pos + 27 + segments])
        out[pos + 14 : pos + 18] = struct.pack("<I", serial)
        out[pos + 22 : pos + 26] = bytes(4)
        crc = 0
        for byte in out[pos:end]:
            crc = ((crc << 8) & 0xFFFFFFFF) ^ _OGG_CRC_TABLE[(crc >> 24) ^ byte]
        out[pos + 22 : pos + 26] = struct.pack("<I", crc)
        pos = end
    return bytes(out)


# -------------------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    """Build tiny (default) or real-width (``--shapes``) assets into OUT_DIR and list the files."""
    parser = argparse.ArgumentParser(
        prog="python -m testkit.make_assets", description=__doc__.split("\n")[0]
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--shapes", action="store_true", help="real widths (GBs on disk) instead of tiny ones"
    )
    parser.add_argument("--n-layers", type=int, default=2, help="LLaMA layers with --shapes")
    parser.add_argument("--mert-layers", type=int, default=24, help="MERT layers with --shapes")
    parser.add_argument("--llama-only", action="store_true", help="with --shapes: write only llama/")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if args.shapes:
        assets = build_shape_assets(
            args.out_dir,
            args.n_layers,
            mert_layers=args.mert_layers,
            seed=args.seed,
            llama_only=args.llama_only,
        )
    else:
        assets = build_tiny_assets(args.out_dir, seed=args.seed)
    for path in sorted(p for p in args.out_dir.rglob("*") if p.is_file()):
        print(f"{path.stat().st_size:>14,d}  {path}")
    print(f"{assets.dims}\nbuilt in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
