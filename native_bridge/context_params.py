"""Settings of ``llama_context_params`` the hook needs: install it, exact arithmetic, multi-clip batches.

They act on llama_cpp's ``llama_context_params`` before ``llama_init_from_model`` (llama.cpp has no
setters for them once the context exists); each returns the params so calls can be chained.
"""

from __future__ import annotations

import ctypes
from typing import Any

from .ggml_mirror import GGML_TYPE_F32
from .hook import InjectionHook

__all__ = ["apply_to_context_params", "enable_multi_clip_batches", "set_exact_arithmetic"]

# enum llama_flash_attn_type { LLAMA_FLASH_ATTN_TYPE_AUTO = -1, _DISABLED = 0, _ENABLED = 1 };
LLAMA_FLASH_ATTN_TYPE_DISABLED = 0


def _field_type(cparams: Any, name: str) -> Any:
    for field in type(cparams)._fields_:
        if field[0] == name:
            return field[1]
    raise TypeError(f"{type(cparams).__name__} has no field {name!r}; is it llama_context_params?")


def apply_to_context_params(cparams: Any, hook: InjectionHook) -> Any:
    """Installs ``hook`` as ``cparams.cb_eval`` / ``cb_eval_user_data`` and returns ``cparams``.

    ``cb_eval`` is a context parameter (no setter exists): do this before
    ``llama_init_from_model``. The hook must stay open until the context is freed.
    """
    if not isinstance(hook, InjectionHook):
        raise TypeError(f"hook must be an InjectionHook, got {type(hook).__name__}")
    if hook.closed:
        raise ValueError("hook is closed")
    cparams.cb_eval = ctypes.cast(hook.cb_eval, _field_type(cparams, "cb_eval"))
    cparams.cb_eval_user_data = hook.user_data
    return cparams


def set_exact_arithmetic(cparams: Any) -> Any:
    """Settings under which llama.cpp matches a float64 reference to ~1e-6 (tests, verification).

    ``flash_attn_type = 0`` (the default "auto" turns flash attention on for CPU) and an F32 KV
    cache (``type_k = type_v = GGML_TYPE_F32``; the default F16 cache alone costs ~1e-3 in logits).
    Slower than the defaults: do not use for production decoding. Returns ``cparams``.
    """
    _field_type(cparams, "flash_attn_type")
    cparams.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED
    cparams.type_k = GGML_TYPE_F32
    cparams.type_v = GGML_TYPE_F32
    return cparams


def enable_multi_clip_batches(cparams: Any, n_seq_max: int | None = None) -> Any:
    """Settings needed to mix sequences with different clips in one batch (row map).

    The hook sees ubatches, not sequence ids; it follows the row map only if the ubatches are
    in-order slices of the batch, which llama.cpp guarantees with a single KV stream:
    ``kv_unified = True`` (any ``n_seq_max``) - set here - or ``n_seq_max = 1``. With
    ``kv_unified = False`` and ``n_seq_max > 1`` rows are regrouped by sequence and the map is
    wrong. ``n_seq_max``, if given, is also set. Returns ``cparams``.
    """
    _field_type(cparams, "kv_unified")
    cparams.kv_unified = True
    if n_seq_max is not None:
        if n_seq_max < 1:
            raise ValueError(f"n_seq_max must be >= 1, got {n_seq_max}")
        cparams.n_seq_max = n_seq_max
    return cparams
