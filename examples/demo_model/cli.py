"""What the demo scripts share as command-line programs: typed errors become one line, not a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """``main(argv)``; an error we raise on purpose (a bad bundle, config or checkpoint, a missing renderer,
    an existing output) is printed as ``error: ...`` with exit status 2. Anything else is a bug and keeps
    its traceback."""
    from examples.demo_model.data import DemoDataError
    from mullama_sdk.errors import MullamaError

    try:
        return main(argv)
    except (MullamaError, DemoDataError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
