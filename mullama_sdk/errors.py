"""The SDK's exception hierarchy: one base class, one subclass per kind of failure.

Every error names what was wrong and, where it can, what would have been valid, so that an
application can show the message to its user as is.
"""

from __future__ import annotations


class MullamaError(Exception):
    """Base class of every error raised on purpose by mullama-sdk (runtime, export, training)."""


class AudioError(MullamaError, ValueError):
    """Audio input that cannot be decoded or used (empty, corrupt, wrong dtype or rank, too short...)."""


class BundleError(MullamaError):
    """A bundle folder that is missing files, fails its checksums or disagrees with its manifest."""


class BackendUnavailableError(MullamaError):
    """A requested backend (ONNX Runtime provider, TensorRT, native hook) cannot run on this machine."""


class ContextLengthError(MullamaError, ValueError):
    """A prompt (plus the tokens asked for) that does not fit the model's context window."""


class ConfigError(MullamaError, ValueError):
    """A model configuration (params.json, MERT config.json, manifest dims) that is invalid or unsupported."""


class CheckpointError(MullamaError):
    """A checkpoint whose keys or shapes do not match the model it is loaded into."""


class DiskFullError(BundleError):
    """The disk ran out of space while a bundle (or one of its files) was being written."""


class ClosedError(MullamaError, RuntimeError):
    """A Captioner, llama.cpp model/context or TensorRT engine used after ``close()``: a programming error
    in the caller, reported instead of a native crash."""


class ExportError(MullamaError):
    """An export step whose result does not match its spec or its source (an ONNX graph, a GGUF, a bundle)."""


class OptionError(MullamaError, ValueError):
    """An argument outside its valid values (a generation option such as ``max_new_tokens`` or
    ``temperature``); the message names the values that would be valid."""
