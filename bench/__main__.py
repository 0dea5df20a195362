"""``python -m bench [--quick] [NAME ...]``: run the benchmarks (all by default), then assemble RESULTS.md.

Each benchmark runs in its own process (they measure memory and timing; nothing should leak from one
into the next), prints its own table and writes its section into ``bench/results/``; at the end
:func:`bench.report.assemble` joins the sections into ``bench/RESULTS.md``. NAME is a module of this
folder without the ``bench_`` prefix. ``--quick`` is passed on to the benchmarks that have that flag
(shorter runs for trying things; the default run is the real one). Benchmark models are built once and
cached (see :mod:`bench.assets`); the first run builds them.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from bench.report import assemble, markdown_table, write_section

HERE = Path(__file__).parent

#: Run order and the order of the sections in RESULTS.md; benchmarks not listed run afterwards.
ORDER = ["hook_overhead", "bandwidth", "encoder", "scaling", "scaling_batch", "memory", "gguf_memory",
         "end_to_end", "trt", "run"]


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    names = [a for a in argv if a != "--quick"]
    available = sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))
    rank = {n: i for i, n in enumerate(ORDER)}
    available.sort(key=lambda n: (rank.get(n, len(rank)), n))
    chosen = names or available
    unknown = [n for n in chosen if n not in available]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; available: {', '.join(available)}", file=sys.stderr)
        return 2
    rows = []
    t_all = time.perf_counter()
    for name in chosen:
        script = HERE / f"bench_{name}.py"
        extra = ["--quick"] if quick and '"--quick"' in script.read_text() else []
        print(f"\n=== bench_{name} {' '.join(extra)}".rstrip(), flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, "-m", f"bench.bench_{name}", *extra], cwd=HERE.parent)
        dt = time.perf_counter() - t0
        rows.append([f"`bench_{name}`{' --quick' if extra else ''}", f"{dt / 60:.1f}",
                     "ok" if rc == 0 else f"**failed (exit {rc})**"])
        print(f"=== bench_{name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {dt / 60:.1f} min", flush=True)
    total = time.perf_counter() - t_all
    rows.append(["total", f"{total / 60:.1f}", ""])
    table = markdown_table(["benchmark", "wall min", "result"], rows)
    print("\n" + table)
    write_section("run", "Wall time of this run", table,
                  notes="Includes building the benchmark models the first time (cached afterwards in "
                        "`~/.cache/mullama/bench/`).")
    print(f"wrote {assemble(ORDER)}")
    return 1 if any("failed" in r[2] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
