"""The one convention of the three command lines (``mullama``, ``mullama-export``, ``mullama-train``).

* ``main(argv=None) -> int`` is the console-script entry point of each program: :func:`dispatch` over a
  table of sub-commands.
* A sub-command is ``"module:function"``, imported only when chosen (``mullama --help`` must not import
  torch), and ``function(argv) -> int`` parses its own arguments with ``prog="<program> <command>"``.
* An error raised on purpose (:class:`~mullama_sdk.errors.MullamaError`) is one line on stderr,
  ``<program>: error: <message>``, exit status 2; Ctrl-C is exit status 130. Anything else is a bug and
  keeps its traceback.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Mapping
from importlib import import_module

from mullama_sdk.errors import MullamaError

#: Exit status of a run that failed for a reason we name (bad input, a failed check).
EXIT_ERROR = 2
#: Exit status after Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130


def say_error(prog: str, message: str) -> None:
    """``<prog>: error: <message>`` on stderr; a closed terminal (SIGHUP) cannot take it and is ignored."""
    with contextlib.suppress(OSError, ValueError):
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)


def run_command(prog: str, function: Callable[[list[str]], int], argv: list[str]) -> int:
    """``function(argv)`` with the convention's error handling."""
    try:
        return function(argv)
    except MullamaError as e:
        say_error(prog, str(e))
        return EXIT_ERROR
    except KeyboardInterrupt:
        say_error(prog, "interrupted")
        return EXIT_INTERRUPTED


def dispatch(prog: str, usage: str, commands: Mapping[str, str], argv: list[str] | None = None) -> int:
    """Run the sub-command named by ``argv[0]`` (``sys.argv[1:]`` by default) with the rest of ``argv``.

    Args:
        prog: Program name, used in messages.
        usage: Text printed for ``-h`` / ``--help`` and no arguments (the CLI module's docstring).
        commands: Sub-command -> ``"module:function"``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage.strip())
        return 0 if argv else EXIT_ERROR
    if argv[0] not in commands:
        print(usage.strip(), file=sys.stderr)
        say_error(prog, f"unknown command {argv[0]!r}; choose from {', '.join(commands)}")
        return EXIT_ERROR
    module, _, name = commands[argv[0]].partition(":")
    function = getattr(import_module(module), name or "main")
    return run_command(prog, function, argv[1:])
