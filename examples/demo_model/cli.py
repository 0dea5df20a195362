"""What the demo scripts share as command-line programs: typed errors become one line, not a traceback.

The demo scripts follow :mod:`mullama_sdk.commandline`'s convention (an error raised on purpose, a
:class:`~mullama_sdk.errors.MullamaError` - :class:`~examples.demo_model.errors.DemoDataError` is one - is
one line and exit status :data:`~mullama_sdk.commandline.EXIT_ERROR`; anything else is a bug and keeps its
traceback). Two differences, because they are run as ``python -m examples.demo_model.<script>`` rather than
as a program of the SDK: the line is ``error: <message>`` without a program name, and an existing output
folder (:class:`FileExistsError`, which the data set's build raises) counts as such an error too.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from mullama_sdk.commandline import EXIT_ERROR
from mullama_sdk.errors import MullamaError


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """``main(argv)``; an error we raise on purpose (a bad bundle, config or checkpoint, a missing renderer,
    an existing output) is printed as ``error: ...`` with exit status 2. Anything else is a bug and keeps
    its traceback."""
    try:
        return main(argv)
    except (MullamaError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
