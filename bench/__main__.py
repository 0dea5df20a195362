"""``python -m bench [NAME ...]``: run the benchmarks (all by default), one after the other.

Each benchmark runs in its own process (they measure memory and timing; nothing should leak from one
into the next) and prints its own table. NAME is a module of this folder without the ``bench_`` prefix.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def main(argv: list[str]) -> int:
    available = sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))
    chosen = argv or available
    unknown = [n for n in chosen if n not in available]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; available: {', '.join(available)}", file=sys.stderr)
        return 2
    failed = 0
    for name in chosen:
        print(f"\n=== bench_{name}", flush=True)
        rc = subprocess.call([sys.executable, "-m", f"bench.bench_{name}"], cwd=HERE.parent)
        failed += rc != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
