"""Tier 1: ctypes bindings of ``libmuhook`` (native_bridge/muhook.c), one per exported symbol.

The C declaration is pasted above each binding. :func:`bind` is applied to a freshly loaded
``ctypes.CDLL`` by :mod:`native_bridge.build`; nothing here loads or compiles anything.
"""

from __future__ import annotations

import ctypes
from ctypes import POINTER, c_bool, c_int, c_int32, c_size_t, c_uint64, c_void_p

#: Must equal ``MUHOOK_ABI_VERSION`` in muhook.c (checked at load).
MUHOOK_ABI_VERSION = 1

# enum { MUHOOK_OK = 0, MUHOOK_EINVAL = -1, MUHOOK_ENOMEM = -2 };
MUHOOK_OK = 0
MUHOOK_EINVAL = -1
MUHOOK_ENOMEM = -2
MUHOOK_MAX_CLIPS = 1 << 16


# struct muhook_counters {
#     uint64_t ask_calls, ask_accepted, eval_calls, injected_rows,
#              unmapped_rows, skipped_nodes, device_rows, ubatches;
# };
class MuhookCounters(ctypes.Structure):
    _fields_ = [
        ("ask_calls", c_uint64),
        ("ask_accepted", c_uint64),
        ("eval_calls", c_uint64),
        ("injected_rows", c_uint64),
        ("unmapped_rows", c_uint64),
        ("skipped_nodes", c_uint64),
        ("device_rows", c_uint64),
        ("ubatches", c_uint64),
    ]


muhook_state_p = c_void_p
float_p = POINTER(ctypes.c_float)


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Sets argtypes/restype of every libmuhook function on ``lib`` and returns it."""
    # int muhook_abi_version(void);
    lib.muhook_abi_version.argtypes = []
    lib.muhook_abi_version.restype = c_int

    # size_t muhook_sizeof_tensor(void);
    lib.muhook_sizeof_tensor.argtypes = []
    lib.muhook_sizeof_tensor.restype = c_size_t

    # size_t muhook_sizeof_counters(void);
    lib.muhook_sizeof_counters.argtypes = []
    lib.muhook_sizeof_counters.restype = c_size_t

    # int muhook_tensor_offsets(size_t *out, int n);
    lib.muhook_tensor_offsets.argtypes = [POINTER(c_size_t), c_int]
    lib.muhook_tensor_offsets.restype = c_int

    # struct muhook_state *muhook_new(int n_embd, int n_layer);
    lib.muhook_new.argtypes = [c_int, c_int]
    lib.muhook_new.restype = muhook_state_p

    # void muhook_free(struct muhook_state *s);
    lib.muhook_free.argtypes = [muhook_state_p]
    lib.muhook_free.restype = None

    # int muhook_set_n_clips(struct muhook_state *s, int n_clips);
    lib.muhook_set_n_clips.argtypes = [muhook_state_p, c_int]
    lib.muhook_set_n_clips.restype = c_int

    # int muhook_n_clips(const struct muhook_state *s);
    lib.muhook_n_clips.argtypes = [muhook_state_p]
    lib.muhook_n_clips.restype = c_int

    # int muhook_set_vector(struct muhook_state *s, int clip, int layer, const float *d);
    lib.muhook_set_vector.argtypes = [muhook_state_p, c_int, c_int, float_p]
    lib.muhook_set_vector.restype = c_int

    # int muhook_clear_clip(struct muhook_state *s, int clip);
    lib.muhook_clear_clip.argtypes = [muhook_state_p, c_int]
    lib.muhook_clear_clip.restype = c_int

    # void muhook_clear(struct muhook_state *s);
    lib.muhook_clear.argtypes = [muhook_state_p]
    lib.muhook_clear.restype = None

    # int muhook_use_clip(struct muhook_state *s, int clip);
    lib.muhook_use_clip.argtypes = [muhook_state_p, c_int]
    lib.muhook_use_clip.restype = c_int

    # int muhook_set_row_clips(struct muhook_state *s, const int32_t *row_clip, int n_rows);
    lib.muhook_set_row_clips.argtypes = [muhook_state_p, POINTER(c_int32), c_int]
    lib.muhook_set_row_clips.restype = c_int

    # void muhook_get_counters(const struct muhook_state *s, struct muhook_counters *out);
    lib.muhook_get_counters.argtypes = [muhook_state_p, POINTER(MuhookCounters)]
    lib.muhook_get_counters.restype = None

    # void muhook_reset_counters(struct muhook_state *s);
    lib.muhook_reset_counters.argtypes = [muhook_state_p]
    lib.muhook_reset_counters.restype = None

    # bool muhook_cb(struct ggml_tensor *t, bool ask, void *user_data);
    lib.muhook_cb.argtypes = [c_void_p, c_bool, c_void_p]
    lib.muhook_cb.restype = c_bool
    return lib
