"""Deterministic stand-ins for every file MU-LLaMA needs, in the real formats, generated in seconds.

Nothing is downloaded: the tokenizer is trained on the spot, weights are seeded random values, audio is
synthesised. Two layouts:

* :func:`build_tiny_assets` - tiny widths (LLaMA dim 64, MERT hidden 32) for unit and equivalence tests.
* :func:`build_shape_assets` - real widths (LLaMA-2-7B, MERT-v1-330M) with a configurable LLaMA layer
  count, for benchmarks.

Both write (docs/model.md sections 2-3), with the published files' field lists and key sets (only widths shrink):

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
tensor by tensor (see :func:`testkit.streamed_torch_save.save_streamed`), so a real-width build needs little
more memory than the MERT weights. Base LLaMA weights are exactly representable in bf16 and fp16, so the bf16
shard and the fp16 copy in ``checkpoint.pth`` hold the same numbers.

This module puts the folders together; the parts live beside it: widths in :mod:`testkit.asset_dims`, tensor
names and scales in :mod:`testkit.weight_specs`, MERT in :mod:`testkit.mert_files`, the tokenizer in
:mod:`testkit.tokenizer`, audio in :mod:`testkit.audio`, the streamed writer in
:mod:`testkit.streamed_torch_save`.

CLI: ``python -m testkit.make_assets OUT_DIR [--shapes --n-layers N --mert-layers M --llama-only]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from testkit.asset_dims import REAL_VOCAB_SIZE, TINY_DIMS, TINY_VOCAB_SIZE, AssetDims, real_dims
from testkit.audio import write_test_audio
from testkit.mert_files import mert_config, mert_state_dict
from testkit.streamed_torch_save import save_streamed
from testkit.tokenizer import pad_tokenizer, piece_count, train_tokenizer
from testkit.weight_specs import checkpoint_args, checkpoint_entries, llama_base_specs
from training.reference.mert import MERT_PREPROCESSOR

__all__ = [
    "AssetDims",
    "ShapeAssets",
    "TinyAssets",
    "build_shape_assets",
    "build_tiny_assets",
    "main",
    "write_test_audio",
]


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
    tokenizer = train_tokenizer(TINY_VOCAB_SIZE)
    dims = dataclasses.replace(TINY_DIMS, vocab_size=piece_count(tokenizer))
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
    dims = real_dims(n_layers, mert_layers)
    tokenizer = pad_tokenizer(train_tokenizer(TINY_VOCAB_SIZE), REAL_VOCAB_SIZE)
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
    save_streamed(
        llama_dir / "consolidated.00.pth",
        {spec.key: spec for spec in llama_base_specs(dims, torch.bfloat16)},
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
    config = mert_config(dims)
    (mert_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (mert_dir / "preprocessor_config.json").write_text(
        json.dumps(MERT_PREPROCESSOR, indent=2, sort_keys=True) + "\n"
    )
    mert_sd = mert_state_dict(config, seed)
    save_streamed(mert_dir / "pytorch_model.bin", mert_sd, seed)

    full, deltas = checkpoint_entries(dims, mert_sd)
    del mert_sd
    envelope = {"optimizer": {}, "epoch": 3, "scaler": {}, "args": checkpoint_args()}
    checkpoint, checkpoint_deltas = out / "checkpoint.pth", out / "checkpoint_deltas.pth"
    save_streamed(checkpoint, full, seed, envelope=envelope)
    del full
    save_streamed(checkpoint_deltas, deltas, seed, envelope=envelope)
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


# -------------------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    """Build tiny (default) or real-width (``--shapes``) assets into OUT_DIR and list the files."""
    parser = argparse.ArgumentParser(prog="python -m testkit.make_assets", description=__doc__.split("\n")[0])
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
