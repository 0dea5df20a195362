"""Benchmarks: each module prints a table of variants measured side by side in one process.

Run them from the repository root as ``python -m bench[.<module>]``; that puts the root on ``sys.path``, so
``mullama_sdk``, ``export``, ``training`` and ``testkit`` import from this checkout. :data:`ROOT` is where the
benchmarks start their child processes (``python -m bench.<module> --child ...``) for the same reason.
"""

from pathlib import Path

#: The repository root: the working folder of every benchmark child process.
ROOT = Path(__file__).resolve().parents[1]
