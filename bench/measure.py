"""What the benchmarks read about their own process: memory from ``/proc``, CPU contention, child results.

Every benchmark measures memory and time in fresh child processes (nothing leaks from one measurement into
the next) and reads the same Linux counters; they live here once so the numbers of different benchmarks
mean the same thing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

from bench import ROOT

__all__ = [
    "GB",
    "PeakSampler",
    "cpu_wait_share",
    "mapped_rss",
    "proc_status",
    "reset_peak",
    "run_json_child",
    "sched_times",
    "smaps_rollup",
    "snapshot",
]

GB = 1e9


# ------------------------------------------------------------------------------------- /proc helpers
def proc_status() -> dict[str, int]:
    """VmRSS, RssAnon, RssFile, VmHWM of this process in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def smaps_rollup() -> dict[str, int]:
    """Rss, Pss, USS (Private_Clean + Private_Dirty) of this process in bytes; {} without smaps_rollup."""
    try:
        text = Path("/proc/self/smaps_rollup").read_text()
    except OSError:
        return {}
    vals = {}
    for line in text.splitlines()[1:]:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            vals[key] = int(parts[0]) * 1024
    return {"Rss": vals.get("Rss", 0), "Pss": vals.get("Pss", 0),
            "USS": vals.get("Private_Clean", 0) + vals.get("Private_Dirty", 0)}


def snapshot() -> dict[str, int]:
    """:func:`proc_status` and :func:`smaps_rollup` in one dict."""
    return {**proc_status(), **smaps_rollup()}


class PeakSampler(threading.Thread):
    """Samples VmRSS / RssAnon / RssFile every ``period`` seconds until :meth:`stop`; keeps the maxima."""

    def __init__(self, period: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.period = period
        self.peak = proc_status()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            s = proc_status()
            self.peak = {k: max(v, self.peak.get(k, 0)) for k, v in s.items()}
            self._halt.wait(self.period)

    def stop(self) -> dict[str, int]:
        self._halt.set()
        self.join()
        s = proc_status()
        return {k: max(v, self.peak.get(k, 0)) for k, v in s.items()}


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def mapped_rss(paths: list[Path]) -> dict[str, list[int]]:
    """Per file of ``paths``: [resident bytes of its mappings in this process, file size]."""
    want = {str(Path(p).resolve()): Path(p).stat().st_size for p in paths if Path(p).exists()}
    rss = dict.fromkeys(want, 0)
    current = None
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split()
                if not head:
                    continue
                if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                    current = head[5] if len(head) >= 6 and head[5] in want else None
                elif current and head[0] == "Rss:":
                    rss[current] += int(head[1]) * 1024
    except OSError:
        pass
    return {p: [rss[p], want[p]] for p in want}


# ------------------------------------------------------------------------------------- CPU contention
def sched_times() -> dict[str, tuple[int, int]]:
    """Per thread of this process: (ns on a CPU, ns runnable but waiting for one) - /proc/<pid>/task/*/schedstat."""
    out = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            run, wait, _ = (task / "schedstat").read_text().split()
        except (OSError, ValueError):
            continue
        out[task.name] = (int(run), int(wait))
    return out


def cpu_wait_share(before: dict[str, tuple[int, int]]) -> float:
    """Share of the threads' runnable time spent waiting for a CPU since ``before``: ~0 on an idle machine;
    high when other processes hold the cores (threads that ended meanwhile are not counted)."""
    run = wait = 0
    for tid, (r, w) in sched_times().items():
        r0, w0 = before.get(tid, (0, 0))
        run, wait = run + r - r0, wait + w - w0
    return wait / (run + wait) if run + wait else 0.0


# ---------------------------------------------------------------------------------------- child runs
def run_json_child(cmd: list[str], what: str, *, timeout: float | None = None) -> dict:
    """Run ``cmd`` (a fresh interpreter) in the repository root and return the JSON object it printed last.

    A failed child ends the benchmark with ``<what> failed (<exit code>)`` and the tail of its stderr.
    """
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if res.returncode == 0:
        for line in reversed(res.stdout.splitlines()):
            if line.startswith("{"):
                return json.loads(line)
    sys.exit(f"{what} failed ({res.returncode}):\n{res.stderr[-3000:]}")
