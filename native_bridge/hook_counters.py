"""The activity counters both hook backends keep (calls, injected rows...), for tests and diagnostics.

A module of its own because the native backend (:mod:`native_bridge.hook_native`), the Python
backend (:mod:`native_bridge.hook_python`) and :class:`~native_bridge.InjectionHook` all use it.
"""

from __future__ import annotations

import dataclasses


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
