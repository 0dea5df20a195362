"""Strict state-dict loading that names every missing, unexpected or mis-shaped key."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from mullama_sdk.errors import CheckpointError

_MAX_NAMES = 12


def _name_list(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_MAX_NAMES])
    more = f" (+{len(keys) - _MAX_NAMES} more)" if len(keys) > _MAX_NAMES else ""
    return f"{shown}{more}"


def check_keys(
    expected: Mapping[str, tuple[int, ...]], got: Mapping[str, torch.Tensor], *, what: str
) -> None:
    """Raise :class:`CheckpointError` unless ``got`` has exactly the keys and shapes of ``expected``."""
    missing = set(expected) - set(got)
    unexpected = set(got) - set(expected)
    bad_shape = [
        f"{k}: {tuple(got[k].shape)} != expected {tuple(expected[k])}"
        for k in sorted(set(expected) & set(got))
        if tuple(got[k].shape) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s): {_name_list(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): {_name_list(unexpected)}")
    if bad_shape:
        problems.append(f"{len(bad_shape)} shape mismatch(es): " + "; ".join(bad_shape[:_MAX_NAMES]))
    if problems:
        raise CheckpointError(f"{what} weights do not match the model: " + " | ".join(problems))


def load_strict(module: nn.Module, sd: Mapping[str, torch.Tensor], *, what: str, assign: bool = False) -> None:
    """Check ``sd`` against ``module``'s state dict, then load it.

    Each tensor is cast to the dtype of the parameter it replaces, one tensor at a time, so that a
    memory-mapped fp16 checkpoint is never materialised whole in another dtype.

    Args:
        module: The target; may live on the ``meta`` device when ``assign`` is true.
        sd: Tensors by the module's own names.
        what: Human name of the part ("MERT", "LLaMA", ...) used in error messages.
        assign: Take the given tensors as the parameters (no copy when dtypes agree).
    """
    own = module.state_dict()
    check_keys({k: tuple(v.shape) for k, v in own.items()}, sd, what=what)
    cast = {k: (v if v.dtype == own[k].dtype else v.to(own[k].dtype)) for k, v in sd.items()}
    module.load_state_dict(cast, strict=True, assign=assign)
