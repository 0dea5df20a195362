"""mullama-sdk: run MU-LLaMA (MERT audio encoder + adapter + LLaMA) with ONNX Runtime and llama.cpp.

Importing the package is cheap: it loads no backend (and never torch). The entry class is imported
on first use, so ``from mullama_sdk import Captioner`` pulls in ONNX Runtime and llama.cpp only then.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    AudioError,
    BackendUnavailableError,
    BundleError,
    CheckpointError,
    ClosedError,
    ConfigError,
    ContextLengthError,
    MullamaError,
    OptionError,
)

__version__ = "0.1.0"

__all__ = [
    "AudioError",
    "BackendUnavailableError",
    "BundleError",
    "Caption",
    "Captioner",
    "GenerationOptions",
    "MusicVectors",
    "Segment",
    "Timings",
    "CheckpointError",
    "ClosedError",
    "ConfigError",
    "ContextLengthError",
    "MullamaError",
    "OptionError",
    "__version__",
]

if TYPE_CHECKING:
    # What the lazy names below really are, for type checkers and IDEs (at run time they load on first use;
    # without these lines `from mullama_sdk import Captioner` is typed Any and py.typed would promise nothing).
    from .captioner import Captioner
    from .options import GenerationOptions
    from .results import Caption, MusicVectors, Segment, Timings

# Public names served lazily (PEP 562): name -> module that defines it, so that importing the
# package (e.g. for its errors) does not load ONNX Runtime or llama.cpp.
_LAZY = {
    "Captioner": "mullama_sdk.captioner",
    "GenerationOptions": "mullama_sdk.options",
    "Caption": "mullama_sdk.results",
    "MusicVectors": "mullama_sdk.results",
    "Timings": "mullama_sdk.results",
    "Segment": "mullama_sdk.results",
}


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'mullama_sdk' has no attribute {name!r}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:  # a dependency is missing: that error is the useful one
            raise
        raise AttributeError(
            f"mullama_sdk.{name} is not available: {module_name} does not exist yet"
        ) from exc
    value = getattr(module, name)
    globals()[name] = value
    return value
