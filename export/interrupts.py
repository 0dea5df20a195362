"""Interruptions of an export: SIGTERM and SIGHUP unwind like Ctrl-C, and nothing is left behind.

* :func:`termination_handlers` makes SIGTERM and SIGHUP behave like Ctrl-C (an exception unwinds the export
  and its cleanup runs); should the main thread be stuck in native code, a watcher thread runs the
  registered emergency cleanups (:func:`on_emergency`) and exits after a grace period.
* :func:`deferred_signals` holds a signal back over a few statements that must not be separated (creating a
  folder and registering its cleanup).
* :func:`die_with_parent` makes a child process die with its parent (``PR_SET_PDEATHSIG``).

The folders and files these cleanups remove are described in :mod:`export.safety`. Nothing here imports
torch: the CLI installs the handlers before its heavy imports.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator


class Interrupted(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM / SIGHUP: unwinds like Ctrl-C (cleanup runs, no bundle)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


#: Seconds the main thread gets to unwind after a signal before the watcher cleans up and exits.
EMERGENCY_GRACE_SECONDS = 5.0

_emergency: dict[int, Callable[[], None]] = {}
_emergency_lock = threading.Lock()
_state: dict = {"depth": 0, "defer": 0, "pending": None, "raised": False}


def _interrupt(signum: int) -> KeyboardInterrupt:
    return KeyboardInterrupt() if signum == signal.SIGINT else Interrupted(signum)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """A signal taken over by :func:`termination_handlers` that arrives inside the block is raised when
    the block ends: around creating a folder and registering its cleanup, or moving the bundle into place,
    so that an interruption cannot fall between the two."""
    _state["defer"] += 1
    try:
        yield
    finally:
        _state["defer"] -= 1
        pending = _state["pending"]
        if not _state["defer"] and pending is not None:
            _state["pending"] = None
            raise _interrupt(pending)


_keys = iter(range(1, 1 << 62))


def register_emergency(cleanup: Callable[[], None]) -> int:
    """Register ``cleanup`` (kill a child, remove a folder) for the watcher's emergency exit; returns a key
    for :func:`unregister_emergency`."""
    with _emergency_lock:
        key = next(_keys)
        _emergency[key] = cleanup
    return key


def unregister_emergency(key: int) -> None:
    with _emergency_lock:
        _emergency.pop(key, None)


@contextlib.contextmanager
def on_emergency(cleanup: Callable[[], None]) -> Iterator[None]:
    """:func:`register_emergency` for the duration of a block."""
    key = register_emergency(cleanup)
    try:
        yield
    finally:
        unregister_emergency(key)


def run_emergency_cleanups() -> None:
    with _emergency_lock:
        cleanups = list(_emergency.values())
    for fn in cleanups:
        with contextlib.suppress(BaseException):
            fn()


def _exit_code(signum: int) -> int:
    return 128 + signum


@contextlib.contextmanager
def termination_handlers(*, include_sigint: bool = False) -> Iterator[None]:
    """SIGTERM and SIGHUP raise :class:`Interrupted` in the main thread, as SIGINT raises KeyboardInterrupt.

    Only signals whose handler is the default are taken over (``nohup`` keeps SIGHUP ignored, an
    application's own handlers stay). A watcher thread notices each signal at once (``set_wakeup_fd``)
    even while the main thread is inside native code; if the main thread has not finished within
    :data:`EMERGENCY_GRACE_SECONDS`, the watcher runs the :func:`on_emergency` cleanups and exits the
    process with ``128 + signal``. With ``include_sigint`` (the CLI) Ctrl-C gets the same deadline.
    Re-entrant; a no-op outside the main thread.
    """
    if threading.current_thread() is not threading.main_thread() or _state["depth"]:
        yield  # another thread's business, or an outer call already handles them
        return
    taken: dict[int, object] = {}
    _state.update(pending=None, raised=False)

    def handler(signum, _frame):
        if _state["raised"]:
            return  # one unwinding at a time; the watcher takes care of a stuck one
        _state["raised"] = True
        if _state["defer"]:
            _state["pending"] = signum
            return
        raise _interrupt(signum)

    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None and signal.getsignal(sig) == signal.SIG_DFL:
            taken[sig] = signal.signal(sig, handler)
    if include_sigint and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        taken[signal.SIGINT] = signal.signal(signal.SIGINT, handler)
    watched = set(taken) | ({signal.SIGINT} if include_sigint else set())
    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        old_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    except (ValueError, OSError):
        old_fd = None
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            try:
                data = os.read(r, 64)
            except OSError:
                return
            if not data or stop.is_set():
                return
            hit = [s for s in data if s in watched]
            if not hit:
                continue
            if stop.wait(EMERGENCY_GRACE_SECONDS):
                return
            signum = hit[0]
            run_emergency_cleanups()
            with contextlib.suppress(Exception):
                os.write(2, f"mullama-export: interrupted ({signal.Signals(signum).name}); stopped after "
                         f"{EMERGENCY_GRACE_SECONDS:g} s of cleanup; partial files removed\n".encode())
            os._exit(_exit_code(signum))

    watcher = threading.Thread(target=watch, name="mullama-export-signals", daemon=True)
    if old_fd is not None:
        watcher.start()
    _state["depth"] = 1
    try:
        yield
    finally:
        _state.update(depth=0, pending=None)
        stop.set()
        if old_fd is not None:
            with contextlib.suppress(ValueError, OSError):
                signal.set_wakeup_fd(old_fd)
            with contextlib.suppress(OSError):
                os.write(w, b"\0")
            watcher.join(timeout=2)
        for sig, old in taken.items():
            signal.signal(sig, old)
        for fd in (r, w):
            with contextlib.suppress(OSError):
                os.close(fd)


def exit_code_for(exc: KeyboardInterrupt) -> int:
    """130 for Ctrl-C, 128 + signal for :class:`Interrupted`."""
    return _exit_code(getattr(exc, "signum", signal.SIGINT))


_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int | None) -> None:
    """In a child process: get SIGKILL when the parent dies (Linux); exit now if it already has."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)
