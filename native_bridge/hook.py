"""Tiers 2 and 3: the injection hook that adds d_l to ``attn_out-<l>`` through llama.cpp's cb_eval.

Two interchangeable backends own the hook state of one llama_context:

* ``_NativeState`` - a ``muhook_state`` from libmuhook (C callback, ~10 ns per graph node);
* ``_PythonState`` - the same logic as a ctypes callback (~1-3 us per graph node: a few ms per
  token on big graphs), used when no C compiler is available.

:class:`InjectionHook` (tier 3) validates inputs and picks the backend.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mullama_sdk.errors import BackendUnavailableError

from . import muhook_api
from .ggml_mirror import (
    GGML_TYPE_F32,
    GGMLTensor,
    ggml_backend_sched_eval_callback,
    load_ggml_base,
)

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "native", "python")
ATTN_OUT_PREFIX = b"attn_out-"

#: ``{layer: vector}`` or ``(layer_ids, array of shape (len(layer_ids), n_embd))``.
ClipVectors = Mapping[int, Any] | tuple[Sequence[int], Any]

_python_backend_warned = False


@dataclasses.dataclass(frozen=True)
class HookCounters:
    """Activity of one hook since creation or :meth:`InjectionHook.reset_counters`.

    Attributes:
        ask_calls: ``ask == true`` calls (one per graph node and decode).
        ask_accepted: ask calls answered true (hooked ``attn_out-<l>`` nodes).
        eval_calls: ``ask == false`` calls.
        injected_rows: rows (tokens x layers) that received a vector.
        unmapped_rows: rows past the end of the row map (not injected; the map was too short).
        skipped_nodes: accepted nodes whose type/shape did not fit (not injected).
        device_rows: injected rows that went through ``ggml_backend_tensor_get/set`` (GPU).
        ubatches: graph runs that reached a hooked layer.
    """

    ask_calls: int = 0
    ask_accepted: int = 0
    eval_calls: int = 0
    injected_rows: int = 0
    unmapped_rows: int = 0
    skipped_nodes: int = 0
    device_rows: int = 0
    ubatches: int = 0


# --------------------------------------------------------------------------------------------
# Tier 2: one owner class per backend, same methods
# --------------------------------------------------------------------------------------------


class _NativeState:
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


class _PythonState:
    """Pure-Python twin of muhook.c (same state machine, numpy for the adds)."""

    name = "python"

    def __init__(self, n_embd: int, n_layer: int) -> None:
        self._n_embd = n_embd
        self._n_layer = n_layer
        self._clips: dict[int, dict[int, np.ndarray]] = {}
        self._active: int = -1
        self._rows: np.ndarray | None = None
        self._wanted: dict[bytes, int] = {}  # hooked node name -> layer
        self._tables: dict[int, np.ndarray] = {}  # row mode: layer -> (n_clips + 1, n_embd)
        self._reset_rows()
        self._counts = dict.fromkeys(f.name for f in dataclasses.fields(HookCounters))
        self.reset_counters()
        self._ggml = None  # libggml-base, loaded on the first device buffer only
        self._closed = False
        self._error_logged = False
        self.cb_eval = ggml_backend_sched_eval_callback(self._callback)
        self.user_data = ctypes.c_void_p(None)

    def _reset_rows(self) -> None:
        self._row_base = 0
        self._ubatch_rows = 0
        self._last_layer = -1

    def _refresh(self) -> None:
        """Recomputes which names to hook and, in row mode, the per-layer lookup tables."""
        self._tables = {}
        if self._rows is not None:
            n = max(self._clips, default=-1) + 1
            layers = {layer for vecs in self._clips.values() for layer in vecs}
            for layer in layers:
                table = np.zeros((n + 1, self._n_embd), np.float32)  # last row: clip -1 = none
                has = np.zeros(n + 1, bool)
                for clip, vecs in self._clips.items():
                    if layer in vecs:
                        table[clip] = vecs[layer]
                        has[clip] = True
                self._tables[layer] = (table, has)
        else:
            layers = set(self._clips.get(self._active, {})) if self._active >= 0 else set()
        self._wanted = {ATTN_OUT_PREFIX + str(layer).encode(): layer for layer in layers}

    def set_clip(self, clip: int, vectors: dict[int, np.ndarray]) -> None:
        self._clips[clip] = {layer: vec.copy() for layer, vec in vectors.items()}
        self._refresh()

    def use_clip(self, clip: int) -> None:
        self.clear()
        self._active = clip
        self._refresh()

    def set_row_clips(self, rows: np.ndarray) -> None:
        self.clear()
        self._rows = rows.copy()
        self._refresh()

    def clear(self) -> None:
        self._active = -1
        self._rows = None
        self._reset_rows()
        self._refresh()

    def counters(self) -> HookCounters:
        return HookCounters(**self._counts)

    def reset_counters(self) -> None:
        for k in self._counts:
            self._counts[k] = 0

    def close(self) -> None:
        # The callback object stays alive (and inert) so that a context still holding it cannot
        # call freed memory.
        self._closed = True
        self._clips = {}
        self.clear()

    # -- the callback ---------------------------------------------------------------------------

    def _callback(self, t: int, ask: bool, _user_data: int) -> bool:
        counts = self._counts
        if ask:
            counts["ask_calls"] += 1
            if ctypes.string_at(t + _NAME_OFFSET) not in self._wanted:
                return False
            tensor = GGMLTensor.from_address(t)
            want = tensor.type == GGML_TYPE_F32 and tensor.ne[0] == self._n_embd
            counts["ask_accepted"] += want
            return want
        counts["eval_calls"] += 1
        try:
            self._inject(t)
        except Exception:  # an exception here would make ctypes return false = abort the graph
            if not self._error_logged:
                logger.exception("Python injection hook failed; this node was not injected")
                self._error_logged = True
        return True

    def _inject(self, t: int) -> None:
        counts = self._counts
        layer = self._wanted.get(ctypes.string_at(t + _NAME_OFFSET))
        tensor = GGMLTensor.from_address(t)
        n_embd = self._n_embd
        ne, nb = tuple(tensor.ne), tuple(tensor.nb)
        if (
            layer is None
            or tensor.type != GGML_TYPE_F32
            or ne[0] != n_embd
            or nb[0] != 4
            or not (tensor.data or tensor.buffer)
        ):
            counts["skipped_nodes"] += 1
            return
        n_rows = ne[1] * ne[2] * ne[3]
        if layer <= self._last_layer:  # first hooked layer of a new graph run = next ubatch
            self._row_base += self._ubatch_rows
            counts["ubatches"] += 1
        elif self._last_layer < 0:
            counts["ubatches"] += 1
        self._last_layer = layer
        self._ubatch_rows = n_rows

        if self._rows is None:
            delta = self._clips[self._active][layer]  # broadcast over every row
            injected = n_rows
        else:
            table, has = self._tables[layer]
            idx = np.arange(self._row_base, self._row_base + n_rows)
            mapped = idx < len(self._rows)
            clip_ids = np.full(n_rows, len(table) - 1, np.int64)
            clip_ids[mapped] = self._rows[idx[mapped]]
            clip_ids[clip_ids < 0] = len(table) - 1
            counts["unmapped_rows"] += int(n_rows - mapped.sum())
            rows_with = has[clip_ids]
            injected = int(rows_with.sum())
            if not injected:
                return
            delta = table[clip_ids]  # zero rows add exactly 0.0
        strides = (nb[3], nb[2], nb[1], 4)
        shape = (ne[3], ne[2], ne[1], n_embd)
        if tensor.buffer and not self._ggml_base().ggml_backend_buffer_is_host(tensor.buffer):
            # Device buffer: row by row through ggml-backend. Written, NOT tested (no GPU here).
            self._device_add(t, shape, strides, delta)
            counts["device_rows"] += injected
        else:
            span = sum((n - 1) * s for n, s in zip(shape[:3], strides[:3])) + 4 * n_embd
            buf = (ctypes.c_char * span).from_address(tensor.data)
            view = np.ndarray(shape, np.float32, buffer=buf, strides=strides)
            view += delta if delta.ndim == 1 else delta.reshape(shape)
        counts["injected_rows"] += injected

    def _device_add(self, t: int, shape: tuple, strides: tuple, delta: np.ndarray) -> None:
        lib = self._ggml_base()
        n_embd = self._n_embd
        deltas = np.broadcast_to(delta.reshape(-1, n_embd), (shape[0] * shape[1] * shape[2], n_embd))
        row = np.empty(n_embd, np.float32)
        r = 0
        for i3 in range(shape[0]):
            for i2 in range(shape[1]):
                for i1 in range(shape[2]):
                    offs = i1 * strides[2] + i2 * strides[1] + i3 * strides[0]
                    lib.ggml_backend_tensor_get(t, row.ctypes.data, offs, 4 * n_embd)
                    row += deltas[r]
                    lib.ggml_backend_tensor_set(t, row.ctypes.data, offs, 4 * n_embd)
                    r += 1

    def _ggml_base(self):
        if self._ggml is None:
            self._ggml = load_ggml_base()
        return self._ggml


_NAME_OFFSET = GGMLTensor.name.offset


# --------------------------------------------------------------------------------------------
# Tier 3: the public class
# --------------------------------------------------------------------------------------------


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
        BackendUnavailableError: ``backend="native"`` and the C hook cannot be built or loaded.
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
            except BackendUnavailableError as e:
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
