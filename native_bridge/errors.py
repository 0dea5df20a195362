"""The one error type of ``native_bridge``.

``native_bridge`` is floor 1 of the project: it imports nothing from ``mullama_sdk`` (floor 2), so
it cannot raise the SDK's error types. It raises :class:`NativeBridgeError` instead, and the SDK
translates it into ``mullama_sdk.errors.BackendUnavailableError`` at its boundary.
"""

from __future__ import annotations

__all__ = ["NativeBridgeError"]


class NativeBridgeError(RuntimeError):
    """The native hook cannot be built, loaded or fails its ABI check.

    Raised by :mod:`native_bridge.build` (no compiler, missing headers, failed compilation, ABI
    mismatch) and :mod:`native_bridge.ggml_mirror` (llama-cpp-python or libggml-base missing).
    :class:`~native_bridge.InjectionHook` with ``backend="auto"`` catches it and falls back to the
    Python hook; with ``backend="native"`` it propagates. The SDK translates it into
    ``mullama_sdk.errors.BackendUnavailableError`` at its boundary.
    """
