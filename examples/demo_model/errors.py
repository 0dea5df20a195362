"""The one error the demo data set raises on purpose, for the demo scripts' command lines.

It is demo-only (the SDK never renders music), so it lives here rather than in :mod:`mullama_sdk.errors`,
but it is a :class:`~mullama_sdk.errors.MullamaError`, so the one command-line convention prints it as a
line, not a traceback. It stays a :class:`RuntimeError` as well, for callers that catch that.
"""

from __future__ import annotations

from mullama_sdk.errors import MullamaError


class DemoDataError(MullamaError, RuntimeError):
    """The dataset cannot be built here (missing fluidsynth or soundfont, a score that fails, ...)."""
