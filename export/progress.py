"""Progress of a long export: one line per step with its duration; while a step runs, a live bar on a
terminal (bytes written into the export folder against the step's estimate, and the time) or, in a log,
a "still running" line every :data:`HEARTBEAT_SECONDS`.

The same watcher samples the free space of the export folder, so that a step that fails on a full disk
is recognised even when the writer only reports a truncated file (see :func:`export.safety.is_disk_full`).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

from export.safety import disk_full_error, free_bytes, human_bytes, is_disk_full, tree_bytes
from mullama_sdk.errors import DiskFullError

log = logging.getLogger(__name__)

#: Without a terminal, a running step says so this often (seconds).
HEARTBEAT_SECONDS = 30.0
_TICK = 0.25


def seconds_text(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    m, s = divmod(int(round(s)), 60)
    return f"{m} min {s:02d} s" if m < 60 else f"{m // 60} h {m % 60:02d} min"


class Reporter:
    """Where the export's progress goes: ``say`` gets whole lines; ``live`` (a terminal stream, or None)
    shows the running step's bar, cleared before every line."""

    def __init__(self, say: Callable[[str], None] | None = None, *, live: TextIO | None = None) -> None:
        self._say = say or (lambda msg: log.info("%s", msg))
        self.live = live
        self._lock = threading.Lock()
        self._shown = False

    @classmethod
    def terminal(cls, quiet: bool = False) -> Reporter:
        """The CLI's reporter: lines on stdout, a live bar when stdout is a terminal."""
        import sys

        if quiet:
            return cls(lambda _msg: None)
        tty = sys.stdout.isatty()
        return cls(lambda msg: print(msg, flush=True), live=sys.stdout if tty else None)

    def __call__(self, msg: str) -> None:
        with self._lock:
            self._clear()
            self._say(msg)

    def status(self, text: str) -> None:
        if self.live is None:
            return
        width = shutil.get_terminal_size((100, 20)).columns - 1
        with self._lock, contextlib.suppress(OSError, ValueError):
            self.live.write("\r" + text[:width] + "\x1b[K")
            self.live.flush()
            self._shown = True

    def clear(self) -> None:
        """Remove the live bar (if shown)."""
        with self._lock:
            self._clear()

    def _clear(self) -> None:
        if self._shown and self.live is not None:
            with contextlib.suppress(OSError, ValueError):
                self.live.write("\r\x1b[K")
                self.live.flush()
            self._shown = False

    @contextlib.contextmanager
    def step(self, name: str, *, folder: Path | None = None, expect_bytes: int | None = None,
             writes: Path | None = None) -> Iterator[StepHandle]:
        """Announce ``name``, watch it while it runs, then report its duration.

        Args:
            folder: The export folder: its growth is the bar, its disk's free space is sampled.
            expect_bytes: What the step adds to ``folder`` (an estimate), for the bar.
            writes: The file the step writes, named when it fails on a full disk (the yielded handle's
                ``writes`` may be changed as the step goes on).
        """
        self(name)
        handle = StepHandle(writes)
        watch = _Watch(self, folder, expect_bytes)
        try:
            yield handle
        except DiskFullError:
            raise
        except Exception as e:
            if (handle.writes is not None and folder is not None
                    and is_disk_full(e, folder, lowest_free=watch.lowest_free)):
                raise disk_full_error(handle.writes, folder, cause=e) from e
            raise
        finally:
            watch.stop()
        self(f"  done in {seconds_text(watch.elapsed)}")


class StepHandle:
    """What :meth:`Reporter.step` yields: the file being written (for a disk-full error)."""

    def __init__(self, writes: Path | None) -> None:
        self.writes = writes


class _Watch:
    def __init__(self, reporter: Reporter, folder: Path | None, expect_bytes: int | None) -> None:
        self.reporter, self.folder, self.expect = reporter, folder, expect_bytes
        self.t0 = time.monotonic()
        self.elapsed = 0.0
        self.lowest_free: int | None = None
        self.base = tree_bytes(folder) if folder is not None else 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mullama-export-progress", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.elapsed = time.monotonic() - self.t0
        self.reporter.clear()

    def _sample_free(self) -> None:
        if self.folder is None:
            return
        free = free_bytes(self.folder)
        if free is not None:
            self.lowest_free = free if self.lowest_free is None else min(self.lowest_free, free)

    def _run(self) -> None:
        last_beat = self.t0
        tick = 0
        while not self._stop.wait(_TICK):
            self._sample_free()
            tick += 1
            now = time.monotonic()
            live = self.reporter.live is not None
            if not (live and tick % 2 == 0) and not (not live and now - last_beat >= HEARTBEAT_SECONDS):
                continue
            written = max(0, tree_bytes(self.folder) - self.base) if self.folder is not None else 0
            elapsed = seconds_text(now - self.t0)
            if live:
                self.reporter.status(self._bar(written, elapsed))
            else:
                last_beat = now
                self.reporter(f"  ... still running after {elapsed}"
                              + (f", {human_bytes(written)} written" if written else ""))

    def _bar(self, written: int, elapsed: str) -> str:
        if not self.expect:
            return f"  {elapsed}" + (f"  {human_bytes(written)} written" if written else "")
        frac = min(written / self.expect, 0.99)
        n = 24
        fill = int(frac * n)
        return (f"  [{'#' * fill}{'.' * (n - fill)}] {frac * 100:3.0f}%  {human_bytes(written)} of about "
                f"{human_bytes(self.expect)}  {elapsed}")
