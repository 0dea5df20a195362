"""Tier 2, native backend of :class:`~native_bridge.InjectionHook`: a ``muhook_state`` of libmuhook.

The C callback costs ~10 ns per graph node. :class:`_NativeState` owns the hook state of one
llama_context and has the same methods as the Python twin :class:`native_bridge.hook_python._PythonState`,
so :class:`~native_bridge.InjectionHook` can use either.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from . import muhook_api
from .ggml_mirror import ggml_backend_sched_eval_callback
from .hook_counters import HookCounters


class _NativeState:
    """Owner of one ``muhook_state`` (C twin of :class:`native_bridge.hook_python._PythonState`)."""

    name = "native"

    def __init__(self, n_embd: int, n_layer: int, cache_dir: Path | str | None) -> None:
        from .build import load_library

        self._lib = load_library(cache_dir=cache_dir)
        ptr = self._lib.muhook_new(n_embd, n_layer)
        if not ptr:
            raise MemoryError("muhook_new failed")
        self._state = ctypes.c_void_p(ptr)
        # a C function pointer, no Python trampoline; the CDLL stays referenced through self._lib
        self.cb_eval = ctypes.cast(self._lib.muhook_cb, ggml_backend_sched_eval_callback)
        self.user_data = ctypes.c_void_p(ptr)

    def _check(self, rc: int, what: str) -> None:
        if rc == muhook_api.MUHOOK_ENOMEM:
            raise MemoryError(f"{what}: out of memory")
        if rc != muhook_api.MUHOOK_OK:
            raise ValueError(f"{what} rejected by the native hook (code {rc})")

    def set_clip(self, clip: int, vectors: dict[int, np.ndarray]) -> None:
        self._check(self._lib.muhook_set_n_clips(self._state, clip + 1), "muhook_set_n_clips")
        self._check(self._lib.muhook_clear_clip(self._state, clip), "muhook_clear_clip")
        for layer, vec in vectors.items():
            ptr = vec.ctypes.data_as(muhook_api.float_p)
            self._check(self._lib.muhook_set_vector(self._state, clip, layer, ptr), "set_vector")

    def use_clip(self, clip: int) -> None:
        self._check(self._lib.muhook_use_clip(self._state, clip), "muhook_use_clip")

    def set_row_clips(self, rows: np.ndarray) -> None:
        ptr = rows.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        self._check(self._lib.muhook_set_row_clips(self._state, ptr, len(rows)), "muhook_set_row_clips")

    def clear(self) -> None:
        self._lib.muhook_clear(self._state)

    def counters(self) -> HookCounters:
        c = muhook_api.MuhookCounters()
        self._lib.muhook_get_counters(self._state, ctypes.byref(c))
        return HookCounters(**{f: getattr(c, f) for f, _ in c._fields_})

    def reset_counters(self) -> None:
        self._lib.muhook_reset_counters(self._state)

    def close(self) -> None:
        if self._state:
            self._lib.muhook_free(self._state)
            self._state = ctypes.c_void_p(None)
