"""Tier 1: a 1:1 ctypes mirror of the parts of ggml.h / ggml-backend.h the hook needs.

llama-cpp-python binds ``llama.h`` but not ``struct ggml_tensor`` nor the ggml-backend helpers, so
they are mirrored here. The C declaration (ggml 0.25.3, vendored by llama-cpp-python 0.3.36) is
pasted above each binding. ``sizeof(GGMLTensor)`` and the field offsets are checked against the C
compiler at load time by :mod:`native_bridge.build` (``muhook_sizeof_tensor``,
``muhook_tensor_offsets``); re-check them when the pinned llama-cpp-python version changes.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import sys
from ctypes import c_bool, c_char, c_int, c_int32, c_int64, c_size_t, c_void_p
from pathlib import Path

from .errors import NativeBridgeError

# #define GGML_MAX_DIMS           4
# #define GGML_MAX_SRC            10
# #define GGML_MAX_OP_PARAMS      64
# #define GGML_MAX_NAME           64
GGML_MAX_DIMS = 4
GGML_MAX_SRC = 10
GGML_MAX_OP_PARAMS = 64
GGML_MAX_NAME = 64

# enum ggml_type { GGML_TYPE_F32 = 0, GGML_TYPE_F16 = 1, ... GGML_TYPE_Q8_0 = 8, ... };
GGML_TYPE_F32 = 0
GGML_TYPE_F16 = 1
GGML_TYPE_Q8_0 = 8


# struct ggml_tensor {
#     enum ggml_type type;
#     struct ggml_backend_buffer * buffer;
#     int64_t ne[GGML_MAX_DIMS]; // number of elements
#     size_t  nb[GGML_MAX_DIMS]; // stride in bytes
#     enum ggml_op op;
#     int32_t op_params[GGML_MAX_OP_PARAMS / sizeof(int32_t)];
#     int32_t flags;
#     struct ggml_tensor * src[GGML_MAX_SRC];
#     struct ggml_tensor * view_src;
#     size_t               view_offs;
#     void * data;
#     char name[GGML_MAX_NAME];
#     void * extra; // extra things e.g. for ggml-cuda.cu
#     char padding[8];
# };
class GGMLTensor(ctypes.Structure):
    """Mirror of ``struct ggml_tensor`` (336 bytes on 64-bit platforms)."""

    _fields_ = [
        ("type", c_int),
        ("buffer", c_void_p),
        ("ne", c_int64 * GGML_MAX_DIMS),
        ("nb", c_size_t * GGML_MAX_DIMS),
        ("op", c_int),
        ("op_params", c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", c_int32),
        ("src", c_void_p * GGML_MAX_SRC),
        ("view_src", c_void_p),
        ("view_offs", c_size_t),
        ("data", c_void_p),
        ("name", c_char * GGML_MAX_NAME),
        ("extra", c_void_p),
        ("padding", c_char * 8),
    ]


ggml_tensor_p = ctypes.POINTER(GGMLTensor)

#: Offsets in the order returned by ``muhook_tensor_offsets``: type, buffer, ne, nb, data, name.
TENSOR_OFFSETS = tuple(getattr(GGMLTensor, f).offset for f in ("type", "buffer", "ne", "nb", "data", "name"))

# typedef bool (*ggml_backend_sched_eval_callback)(struct ggml_tensor * t, bool ask, void * user_data);
# Same prototype as ``llama_cpp.ggml_backend_sched_eval_callback`` (tensor passed as void *).
ggml_backend_sched_eval_callback = ctypes.CFUNCTYPE(c_bool, c_void_p, c_bool, c_void_p)


def llama_cpp_lib_dir() -> Path:
    """Folder holding llama-cpp-python's shared libraries (``site-packages/llama_cpp/lib``)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise NativeBridgeError("llama-cpp-python is not installed (pip install llama-cpp-python==0.3.36)")
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


def ggml_base_library_path() -> Path:
    """Path of ``libggml-base`` inside llama-cpp-python's lib folder."""
    lib_dir = llama_cpp_lib_dir()
    names = {"darwin": ["libggml-base.dylib", "libggml-base.so"], "win32": ["ggml-base.dll"]}
    for name in names.get(sys.platform, ["libggml-base.so"]):
        if (lib_dir / name).exists():
            return lib_dir / name
    raise NativeBridgeError(f"libggml-base not found in {lib_dir}")


@functools.lru_cache(maxsize=1)
def load_ggml_base() -> ctypes.CDLL:
    """Loads llama-cpp-python's ``libggml-base`` (the copy llama_cpp itself uses) and binds it."""
    try:
        lib = ctypes.CDLL(str(ggml_base_library_path()))
    except OSError as e:
        raise NativeBridgeError(f"cannot load libggml-base: {e}") from e

    # GGML_API bool ggml_backend_buffer_is_host(ggml_backend_buffer_t buffer);
    lib.ggml_backend_buffer_is_host.argtypes = [c_void_p]
    lib.ggml_backend_buffer_is_host.restype = c_bool

    # GGML_API void ggml_backend_tensor_get(const struct ggml_tensor * tensor, void * data,
    #                                       size_t offset, size_t size);
    lib.ggml_backend_tensor_get.argtypes = [c_void_p, c_void_p, c_size_t, c_size_t]
    lib.ggml_backend_tensor_get.restype = None

    # GGML_API void ggml_backend_tensor_set(struct ggml_tensor * tensor, const void * data,
    #                                       size_t offset, size_t size);
    lib.ggml_backend_tensor_set.argtypes = [c_void_p, c_void_p, c_size_t, c_size_t]
    lib.ggml_backend_tensor_set.restype = None

    # GGML_API const char * ggml_get_name(const struct ggml_tensor * tensor);
    lib.ggml_get_name.argtypes = [c_void_p]
    lib.ggml_get_name.restype = ctypes.c_char_p
    return lib
