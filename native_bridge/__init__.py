"""The llama.cpp injection hook of MU-LLaMA: adds d_l to ``attn_out-<l>`` through ``cb_eval``.

Usage with the low-level llama_cpp API::

    import llama_cpp
    from native_bridge import InjectionHook, apply_to_context_params, set_exact_arithmetic

    hook = InjectionHook(n_embd, n_layer)              # C hook, compiled at first use
    hook.set_clip_vectors(0, (layer_ids, d))           # d: (len(layer_ids), n_embd)
    hook.use_single_clip(0)
    cparams = llama_cpp.llama_context_default_params()
    apply_to_context_params(cparams, hook)
    ctx = llama_cpp.llama_init_from_model(model, cparams)
    ...                                                # llama_decode as usual
    llama_cpp.llama_free(ctx); hook.close()            # hook lives at least as long as ctx

Files, by tier (each imports only its own or lower tiers; nothing here imports ``mullama_sdk``):

* tier 1: ``muhook.c`` (the callback), ``muhook_api.py`` and ``ggml_mirror.py`` (ctypes mirrors),
  ``build.py`` (compile + cache + ABI check), ``errors.py`` (:class:`NativeBridgeError`, which the
  SDK translates into its ``BackendUnavailableError``);
* tier 2: ``hook_native.py`` (C backend), ``hook_python.py`` (pure-Python fallback backend),
  ``hook_counters.py`` (:class:`HookCounters`, shared by both);
* tier 3: ``hook.py`` (:class:`InjectionHook`), ``context_params.py`` (installing it into
  ``llama_context_params``, exact arithmetic, multi-clip batches).
"""

from __future__ import annotations

from .build import NativeBuild, build_library, load_library
from .context_params import apply_to_context_params, enable_multi_clip_batches, set_exact_arithmetic
from .errors import NativeBridgeError
from .hook import InjectionHook
from .hook_counters import HookCounters

__all__ = [
    "HookCounters",
    "InjectionHook",
    "NativeBridgeError",
    "NativeBuild",
    "apply_to_context_params",
    "build_library",
    "enable_multi_clip_batches",
    "load_library",
    "set_exact_arithmetic",
]
