"""What makes an export safe to run next to a user's files.

* :func:`check_out`: ``--out`` is refused up front when it would destroy anything but a previous bundle
  (a folder without ``mullama.json``, foreign files, ``.``/``..``/home/root, a folder holding an input).
* :func:`swap_into_place`: the finished folder replaces an old bundle atomically (``renameat2``
  ``RENAME_EXCHANGE`` on Linux, else old aside, new in, old removed), so a crash never leaves zero bundles.
* Disk space: :func:`free_bytes`, :func:`is_disk_full` and :func:`disk_full_error`: running out of space
  anywhere (a Python ``ENOSPC``, protobuf reading a truncated file, llama.cpp's quantizer) becomes one
  :class:`~mullama_sdk.errors.DiskFullError` naming the file being written.
* Partial folders: :func:`write_owner` marks a temporary folder with its owner (pid, process start time,
  boot id, host); :func:`sweep_partials` reports leftovers of earlier runs and removes those that are
  ours and that no live process owns.
* Signals (SIGTERM / SIGHUP unwinding like Ctrl-C, emergency cleanups, a child dying with its parent):
  :mod:`export.interrupts`.

Nothing here imports torch: the CLI runs these checks before its heavy imports.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from export.interrupts import deferred_signals
from mullama_sdk.errors import BundleError, DiskFullError, MullamaError
from mullama_sdk.manifest import MANIFEST_NAME

log = logging.getLogger(__name__)

#: File inside a temporary export folder naming its owner (never part of a finished bundle).
OWNER_FILE = ".mullama-export-owner.json"
#: Temporary export folders are named ``.<out name>.partial-<random>``.
PARTIAL_TAG = ".partial-"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


# ------------------------------------------------------------------------------------------ --out
def _describe_protected(path: Path) -> str | None:
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if path == Path(path.anchor):
        return "the root folder"
    if path in (home, Path("/root")):
        return "a home folder"
    if path in home.parents:
        return "a folder that holds your home folder"
    if path == cwd:
        return "the working directory"
    if path in cwd.parents:
        return "a parent of the working directory"
    return None


def check_out(out: Path, *, overwrite: bool, inputs: Iterable[Path] = ()) -> None:
    """Refuse an ``--out`` whose use would lose or clobber anything but a previous bundle.

    Raises:
        BundleError: one line naming the problem (nothing has been touched).
    """
    out = Path(out)
    if not str(out) or not out.name or out.name in (".", ".."):
        where = _describe_protected(out.resolve()) or "not a folder name"
        raise BundleError(f"refusing --out {str(out) or repr('')}: it is {where}; name the bundle folder itself "
                          f"(e.g. {out.resolve() / 'mullama.bundle'})")
    if out.is_symlink():
        raise BundleError(f"--out {out} is a symbolic link; name a real folder (the bundle would replace the link)")
    if out.exists() and not out.is_dir():
        raise BundleError(f"--out {out} is a file, not a bundle folder; choose another --out")
    resolved = out.resolve()
    protected = _describe_protected(resolved)
    if protected:
        raise BundleError(f"refusing --out {out}: it is {protected}; name the bundle folder itself")
    for inp in inputs if out.exists() else ():
        try:
            source = Path(inp).resolve()
        except (OSError, RuntimeError):
            continue
        if source == resolved or resolved in source.parents:
            raise BundleError(f"refusing --out {out}: it holds the input {inp}; choose a new folder for the bundle")
        if source in resolved.parents:
            raise BundleError(f"refusing --out {out}: it lies inside the input {inp}; choose a folder outside it")
    if out.exists():
        if not overwrite:
            raise BundleError(f"{out} already exists; choose another --out or pass --overwrite "
                              f"(which replaces only a previous bundle)")
        check_old_bundle(out)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise BundleError(f"cannot write the bundle: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BundleError(f"cannot write the bundle: folder {parent} is not writable")


def check_old_bundle(out: Path) -> None:
    """``out`` holds a previous bundle and nothing else (what ``--overwrite`` may replace)."""
    manifest = out / MANIFEST_NAME
    if not manifest.is_file():
        raise BundleError(f"refusing to overwrite {out}: it is not a bundle (no {MANIFEST_NAME}); --overwrite "
                          f"replaces only a previous bundle folder")
    try:
        files = json.loads(manifest.read_text(encoding="utf-8")).get("files")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, RecursionError) as e:
        raise BundleError(f"refusing to overwrite {out}: its {MANIFEST_NAME} cannot be read ({e}); "
                          f"remove the folder yourself if it is a broken bundle") from e
    if not isinstance(files, dict):
        raise BundleError(f"refusing to overwrite {out}: its {MANIFEST_NAME} lists no files")
    known = {*files, MANIFEST_NAME, OWNER_FILE}
    foreign = []
    for root, dirs, names in os.walk(out):
        rel = Path(root).relative_to(out)
        for name in names + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            member = (rel / name).as_posix()
            if member not in known:
                foreign.append(member)
    if foreign:
        shown = ", ".join(sorted(foreign)[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise BundleError(f"refusing to overwrite {out}: it holds {len(foreign)} file(s) that are not part of the "
                          f"old bundle ({shown}); move them away or choose another --out")


# ----------------------------------------------------------------------------------------- swapping
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False when unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def make_partial(out: Path, parent: Path) -> Path:
    """The temporary folder ``.<name>.partial-<random>`` beside ``out``, marked with its owner.

    Raises:
        BundleError: the folder cannot be made (:class:`DiskFullError` when the disk is full).
    """
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{PARTIAL_TAG}", dir=parent))
        write_owner(tmp, out)
        return tmp
    except OSError as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e, parent):
            raise disk_full_error(parent / f".{out.name}{PARTIAL_TAG}*", parent) from e
        raise BundleError(f"cannot write the bundle in {parent}: {e.strerror or e}") from e


def publish(tmp: Path, out: Path) -> None:
    """Make the finished folder ``tmp`` readable by others and swap it into place at ``out``.

    mkdtemp made the folder private (0700); a bundle is meant to be shared and read by others. The swap
    runs with signals deferred, and the owner mark is removed from the published bundle.
    """
    tmp.chmod(0o755)
    for f in tmp.iterdir():
        f.chmod(0o644)
    with deferred_signals():
        swap_into_place(tmp, out)
        (out / OWNER_FILE).unlink(missing_ok=True)


def swap_into_place(new: Path, out: Path) -> None:
    """Move the finished folder ``new`` to ``out``, replacing an old bundle there without a moment with none.

    The old bundle ends up in ``new``'s (temporary) name, is marked as ours and removed.
    """
    try:
        if not os.path.lexists(out):
            os.rename(new, out)
            return
        if _exchange(new, out):
            old = new
        else:
            old = new.with_name(new.name + "-old")
            os.rename(out, old)
            try:
                os.rename(new, out)
            except BaseException:
                os.rename(old, out)
                raise
    except OSError as e:
        if is_disk_full(e, out.parent):
            raise disk_full_error(out, out.parent) from e
        raise BundleError(f"cannot move the new bundle into place at {out}: {e.strerror or e}") from e
    with contextlib.suppress(OSError):
        write_owner(old, out)
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------ disk space
#: Below this many free bytes a failed write is taken for a full disk (also ``0.2 %`` of the disk).
FULL_BYTES = 16 << 20


def _existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int | None:
    """Bytes this process may still write on the file system of ``path`` (root may use reserved blocks)."""
    try:
        st = os.statvfs(_existing(path))
    except OSError:
        return None
    if st.f_blocks == 0:  # a pseudo file system (/proc): nothing to tell
        return None
    blocks = st.f_bfree if hasattr(os, "geteuid") and os.geteuid() == 0 else st.f_bavail
    return blocks * st.f_frsize


def _full_threshold(path: Path) -> int:
    try:
        st = os.statvfs(_existing(path))
        return max(FULL_BYTES, min(1 << 30, st.f_blocks * st.f_frsize // 500))
    except OSError:
        return FULL_BYTES


_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "[Errno 28]", "ENOSPC")


def is_disk_full(exc: BaseException | None, folder: Path, *, lowest_free: int | None = None) -> bool:
    """Did ``exc`` (or a failure without an exception, ``None``) come from a full disk?

    Yes when the error chain holds ``ENOSPC``/``EDQUOT`` (or says so in its text: errors re-raised by type
    and message from a child, C++ libraries), or when the disk of ``folder`` is (or, per ``lowest_free``,
    was during the failed step) practically full: writers such as protobuf, numpy ("12288 requested and
    3248 written") or llama.cpp's quantizer only report a truncated file, a short write or a return code.
    Our own errors count only when an OSError caused them (they say what went wrong otherwise).
    """
    seen = set()
    os_error = False
    e = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        os_error |= isinstance(e, OSError)
        if isinstance(e, DiskFullError):
            return True
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(t in str(e) for t in _FULL_TEXT):
            return True
        e = e.__cause__ or e.__context__
    if isinstance(exc, MullamaError) and not os_error:
        return False  # our own errors say what went wrong; only failed writes are put down to space
    free = free_bytes(folder)
    lows = [x for x in (free, lowest_free) if x is not None]
    return bool(lows) and min(lows) < _full_threshold(folder)


def disk_full_error(path: Path, folder: Path | None = None, *, cause: BaseException | None = None) -> DiskFullError:
    """The one-line error for a full disk while writing ``path``."""
    folder = Path(folder if folder is not None else Path(path).parent)
    free = free_bytes(folder)
    said = ""
    if cause is not None and not isinstance(cause, OSError):
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:160]
        said = f"; the writer reported: {first}"
    return DiskFullError(f"disk full: no space left on the device of {folder} while writing {Path(path).name}"
                         + (f" ({human_bytes(free)} free now)" if free is not None else "") + said)


@contextlib.contextmanager
def writing(path: Path, folder: Path | None = None) -> Iterator[None]:
    """Turn running out of space inside the block into :func:`disk_full_error` for ``path``."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:
        if is_disk_full(e, Path(folder if folder is not None else Path(path).parent)):
            raise disk_full_error(path, folder, cause=e) from e
        raise


# ----------------------------------------------------------------------------------- partial folders
def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> str:
    """The process's start time (clock ticks since boot, /proc/PID/stat field 22); "" when unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2:].split()[19]
    except (OSError, ValueError, IndexError):
        return ""


def write_owner(folder: Path, out: Path) -> None:
    """Mark ``folder`` as a temporary folder of this process (see :func:`owner_alive`)."""
    pid = os.getpid()
    info = {"pid": pid, "start": _start_time(pid), "boot": _boot_id(), "host": socket.gethostname(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "out": str(out)}
    (Path(folder) / OWNER_FILE).write_text(json.dumps(info))


def read_owner(folder: Path) -> dict | None:
    try:
        info = json.loads((Path(folder) / OWNER_FILE).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return info if isinstance(info, dict) and isinstance(info.get("pid"), int) else None


def owner_alive(info: dict) -> bool | None:
    """True/False: the owning process runs/is gone; None: it cannot be told (another host)."""
    if info.get("host") != socket.gethostname():
        return None
    if info.get("boot") and _boot_id() and info["boot"] != _boot_id():
        return False
    pid = info["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except (OSError, OverflowError):
        return False
    start = _start_time(pid)
    return not (start and info.get("start") and start != info["start"])  # a reused pid is another process


def tree_bytes(folder: Path) -> int:
    """Bytes of every file below ``folder`` (links not followed; files that vanish meanwhile count 0)."""
    total = 0
    for root, _dirs, names in os.walk(folder):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def sweep_partials(parent: Path, out_name: str, report: Callable[[str], None] | None = None) -> list[Path]:
    """Report temporary export folders left in ``parent`` by earlier runs; remove the ones that are ours
    (owner file) and whose owner process is gone. Returns the removed folders."""
    report = report or (lambda msg: log.warning("%s", msg))
    removed = []
    try:
        entries = sorted(Path(parent).iterdir())
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if not (name.startswith(".") and PARTIAL_TAG in name) or entry.is_symlink() or not entry.is_dir():
            continue
        info = read_owner(entry)
        if info is None:
            if name.startswith(f".{out_name}{PARTIAL_TAG}"):
                report(f"found {entry} ({human_bytes(tree_bytes(entry))}), left by an earlier export that "
                       f"recorded no owner; not removed: delete it if no export is writing there")
            continue
        alive = owner_alive(info)
        if alive is False:
            size = tree_bytes(entry)
            shutil.rmtree(entry, ignore_errors=True)
            if not entry.exists():
                removed.append(entry)
                report(f"removed {entry} ({human_bytes(size)}), left by an interrupted export "
                       f"(pid {info['pid']}, started {info.get('created', '?')})")
        elif alive is None:
            report(f"found {entry} ({human_bytes(tree_bytes(entry))}) of an export on host {info.get('host')} "
                   f"(pid {info['pid']}); not removed")
        elif info["pid"] != os.getpid():
            report(f"another export (pid {info['pid']}) is writing {entry} for {info.get('out', '?')}")
    return removed
