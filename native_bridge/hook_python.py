"""Tier 2, Python backend of :class:`~native_bridge.InjectionHook`: the same logic as muhook.c in Python.

A ctypes callback (~1-3 us per graph node: a few ms per token on big graphs), used when no C
compiler is available. :class:`_PythonState` owns the hook state of one llama_context and has the
same methods as :class:`native_bridge.hook_native._NativeState`.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging

import numpy as np

from .ggml_mirror import (
    GGML_TYPE_F32,
    GGMLTensor,
    ggml_backend_sched_eval_callback,
    load_ggml_base,
)
from .hook_counters import HookCounters

logger = logging.getLogger(__name__)

ATTN_OUT_PREFIX = b"attn_out-"


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
