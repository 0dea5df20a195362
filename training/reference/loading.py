"""Checkpoint files: the one ``torch.load`` gate, reading both checkpoint kinds, writing ours.

Two checkpoint kinds are read:
(a) the published MU-LLaMA ``checkpoint.pth`` (``{'model': state_dict, 'args': ...}``), full or holding
    only the trained parts (then the folders supply the base weights);
(b) our own training checkpoints (``{'format': 'mullama-checkpoint', 'format_version', 'config', ...}``),
    whose ``model`` uses the same published key names.

Every pickle-based weight file (checkpoints, Meta's shards, MERT's ``pytorch_model.bin``) goes through
:func:`torch_load`, so the no-arbitrary-unpickling rule has exactly one place to hold. Memory: files
are memory-mapped, so a 7B checkpoint is never held twice. Turning the tensors into a model is
:mod:`training.reference.model_sources` (checks) and :mod:`training.reference.build` (the model).
"""

from __future__ import annotations

import argparse
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mullama_sdk.errors import CheckpointError
from mullama_sdk.files import atomic_path
from training.reference.dims import MullamaConfig

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "mullama-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1


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
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def read_mert_weights(mert_dir: Path, trust_pickle: bool) -> dict[str, torch.Tensor]:
    """MERT's weights from its folder: ``model.safetensors``, else ``pytorch_model.bin`` (through the gate)."""
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
