"""Tier 3: the injection hook that adds d_l to ``attn_out-<l>`` through llama.cpp's cb_eval.

Two interchangeable backends own the hook state of one llama_context:

* ``_NativeState`` (:mod:`native_bridge.hook_native`) - a ``muhook_state`` from libmuhook (C
  callback, ~10 ns per graph node);
* ``_PythonState`` (:mod:`native_bridge.hook_python`) - the same logic as a ctypes callback
  (~1-3 us per graph node: a few ms per token on big graphs), used when no C compiler is available.

:class:`InjectionHook` (tier 3) validates inputs and picks the backend.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import muhook_api
from .errors import NativeBridgeError
from .hook_counters import HookCounters
from .hook_native import _NativeState
from .hook_python import _PythonState

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "native", "python")

#: ``{layer: vector}`` or ``(layer_ids, array of shape (len(layer_ids), n_embd))``.
ClipVectors = Mapping[int, Any] | tuple[Sequence[int], Any]

_python_backend_warned = False


class InjectionHook:
    """Adds per-clip vectors d_l to llama.cpp's ``attn_out-<l>`` nodes through ``cb_eval``.

    One hook per ``llama_context``: install it into the context params before creating the
    context (:func:`native_bridge.apply_to_context_params`), keep it open until ``llama_free``, and
    change its data only between ``llama_decode`` calls. Clear the KV cache of a sequence when its
    clip changes (cached keys/values were computed with the old vectors).

    Example::

        hook = InjectionHook(n_embd, n_layer)
        hook.set_clip_vectors(0, {12: d12, 13: d13})
        hook.use_single_clip(0)
        apply_to_context_params(cparams, hook)
        ctx = llama_cpp.llama_init_from_model(model, cparams)

    Args:
        n_embd: width of the model (length of every vector).
        n_layer: number of layers; layer ids are ``0 .. n_layer - 1``.
        backend: ``"native"`` (C callback, compiled at first use; raises if that fails),
            ``"python"`` (ctypes callback, slower) or ``"auto"`` (native, else python with a
            warning).
        cache_dir: cache root for the compiled library (default ``$MULLAMA_CACHE`` or
            ``~/.cache/mullama``).

    Raises:
        ValueError: bad dimensions or backend name.
        NativeBridgeError: ``backend="native"`` and the C hook cannot be built or loaded.
    """

    def __init__(
        self,
        n_embd: int,
        n_layer: int,
        *,
        backend: str = "auto",
        cache_dir: Path | str | None = None,
    ) -> None:
        self._impl: _NativeState | _PythonState | None = None
        self._closed = False
        for name, value in (("n_embd", n_embd), ("n_layer", n_layer)):
            if not _is_int(value) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self._n_embd = int(n_embd)
        self._n_layer = int(n_layer)
        self._clip_ids: set[int] = set()
        if backend in ("auto", "native"):
            try:
                self._impl = _NativeState(self._n_embd, self._n_layer, cache_dir)
            except NativeBridgeError as e:
                if backend == "native":
                    raise
                logger.warning("native injection hook unavailable (%s); using the Python hook", e)
        if self._impl is None:
            global _python_backend_warned
            if not _python_backend_warned:
                logger.warning(
                    "using the Python injection hook: ~1-3 us per graph node, i.e. a few ms per "
                    "token (the native C hook costs < 0.5 ms per token)"
                )
                _python_backend_warned = True
            self._impl = _PythonState(self._n_embd, self._n_layer)
        # keep the function pointer and user data referenced for the context's lifetime
        self._cb_eval = self._impl.cb_eval
        self._user_data = self._impl.user_data

    # -- properties -----------------------------------------------------------------------------

    @property
    def backend(self) -> str:
        """``"native"`` or ``"python"``."""
        return self._live().name

    @property
    def n_embd(self) -> int:
        return self._n_embd

    @property
    def n_layer(self) -> int:
        return self._n_layer

    @property
    def clips(self) -> frozenset[int]:
        """Clip numbers that have been given vectors."""
        return frozenset(self._clip_ids)

    @property
    def cb_eval(self) -> Any:
        """Function pointer for ``llama_context_params.cb_eval`` (prototype of
        ``ggml_backend_sched_eval_callback``; ``ctypes.cast`` it to llama_cpp's type)."""
        return self._cb_eval

    @property
    def user_data(self) -> ctypes.c_void_p:
        """Value for ``llama_context_params.cb_eval_user_data``."""
        return self._user_data

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def counters(self) -> HookCounters:
        """Activity counters (calls, injected rows...) for tests and diagnostics."""
        return self._live().counters()

    # -- configuration --------------------------------------------------------------------------

    def set_clip_vectors(self, clip: int, vectors: ClipVectors) -> None:
        """Stores (a copy of) the vectors of one clip, replacing any previous ones for it.

        Args:
            clip: clip number, ``0 <= clip < 65536``.
            vectors: ``{layer: array (n_embd,)}`` or ``(layer_ids, array (n_inject, n_embd))``;
                any real dtype (converted to float32), finite values, distinct layers in
                ``0 .. n_layer - 1``. Layers not given get no injection for this clip.
        """
        impl = self._live()
        clip = self._check_clip_number(clip)
        impl.set_clip(clip, self._validate_vectors(vectors))
        self._clip_ids.add(clip)

    def use_single_clip(self, clip: int) -> None:
        """Every row of every following decode gets ``clip``'s vectors (drops any row map)."""
        impl = self._live()
        impl.use_clip(self._check_known_clip(self._check_clip_number(clip)))

    def set_row_clips(self, rows: Sequence[int] | np.ndarray) -> None:
        """Row -> clip map for the whole ``llama_batch`` of the next ``llama_decode``.

        ``rows[i]`` is the clip of batch row ``i`` (-1: no injection). Set it before each decode
        of a mixed batch. Needs in-order ubatches: create the context with ``kv_unified = True``
        or ``n_seq_max = 1`` (see :func:`native_bridge.enable_multi_clip_batches`).
        """
        impl = self._live()
        arr = np.asarray(rows)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError(f"rows must be a non-empty 1-D sequence of ints, got shape {arr.shape}")
        if not (np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.bool_):
            raise ValueError(f"rows must hold ints (clip numbers or -1), got dtype {arr.dtype}")
        if arr.size >= 2**31:
            raise ValueError("rows is too long for a llama_batch")
        bad = sorted({int(c) for c in arr if c != -1 and int(c) not in self._clip_ids})
        if bad:
            raise ValueError(
                f"rows reference clips {bad[:5]} that have no vectors; call set_clip_vectors first "
                f"(known clips: {sorted(self._clip_ids)}, or -1 for no injection)"
            )
        impl.set_row_clips(np.ascontiguousarray(arr, dtype=np.int32))

    def clear(self) -> None:
        """No injection until :meth:`use_single_clip` or :meth:`set_row_clips` (vectors are kept)."""
        self._live().clear()

    def reset_counters(self) -> None:
        self._live().reset_counters()

    # -- lifetime -------------------------------------------------------------------------------

    def close(self) -> None:
        """Frees the hook state. Only after ``llama_free`` of the context using it. Idempotent."""
        if self._impl is not None and not self._closed:
            self._impl.close()
        self._closed = True

    def __enter__(self) -> InjectionHook:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: module globals may already be gone
            pass

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"clips={sorted(self._clip_ids)}"
        backend = self._impl.name if self._impl is not None else "?"
        return f"InjectionHook(n_embd={self._n_embd}, n_layer={self._n_layer}, {backend}, {state})"

    # -- validation -----------------------------------------------------------------------------

    def _live(self) -> _NativeState | _PythonState:
        if self._closed or self._impl is None:
            raise ValueError("this InjectionHook is closed")
        return self._impl

    @staticmethod
    def _check_clip_number(clip: Any) -> int:
        if not _is_int(clip) or not 0 <= clip < muhook_api.MUHOOK_MAX_CLIPS:
            raise ValueError(f"clip must be an int in [0, {muhook_api.MUHOOK_MAX_CLIPS}), got {clip!r}")
        return int(clip)

    def _check_known_clip(self, clip: int) -> int:
        if clip not in self._clip_ids:
            raise ValueError(
                f"clip {clip} has no vectors; call set_clip_vectors first "
                f"(known clips: {sorted(self._clip_ids)})"
            )
        return clip

    def _validate_vectors(self, vectors: ClipVectors) -> dict[int, np.ndarray]:
        if isinstance(vectors, Mapping):
            layers = list(vectors.keys())
            arrays = [np.asarray(v) for v in vectors.values()]
            for layer, a in zip(layers, arrays):
                if a.shape != (self._n_embd,):
                    raise ValueError(
                        f"vector of layer {layer!r} has shape {a.shape}, expected ({self._n_embd},)"
                    )
        elif isinstance(vectors, tuple) and len(vectors) == 2:
            layers = list(np.asarray(vectors[0]).reshape(-1)) if np.ndim(vectors[0]) else None
            if layers is None:
                raise ValueError("layer_ids must be a 1-D sequence of ints")
            mat = np.asarray(vectors[1])
            if mat.shape != (len(layers), self._n_embd):
                raise ValueError(
                    f"array has shape {mat.shape}, expected ({len(layers)}, {self._n_embd}) "
                    "= (len(layer_ids), n_embd)"
                )
            arrays = list(mat)
        else:
            raise ValueError(
                "vectors must be a dict {layer: array (n_embd,)} or a tuple "
                "(layer_ids, array (n_inject, n_embd))"
            )
        out: dict[int, np.ndarray] = {}
        for layer, a in zip(layers, arrays):
            if not _is_int(layer) or not 0 <= layer < self._n_layer:
                raise ValueError(f"layer ids must be ints in [0, {self._n_layer}), got {layer!r}")
            if int(layer) in out:
                raise ValueError(f"layer {int(layer)} is given twice")
            if a.dtype == np.bool_ or not (
                np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)
            ):
                raise ValueError(f"vector of layer {int(layer)} must be real numbers, got {a.dtype}")
            with np.errstate(all="ignore"):  # overflow to inf is reported below
                vec = np.ascontiguousarray(a, dtype=np.float32)
            if not np.isfinite(vec).all():
                raise ValueError(
                    f"vector of layer {int(layer)} has non-finite values (NaN/inf, or too large for float32)"
                )
            out[int(layer)] = vec
        return out


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))
