"""Compiles ``muhook.c`` at first use into a per-user cache and loads it with an ABI self-check.

Cache layout::

    <cache root>/native/<llama_cpp version>-<key>/libmuhook.so
                                                  build.json   (key, sha256 of the .so, versions, command)
                                                  .lock        (flock: one compiler per cache entry)

``<cache root>`` is ``$MULLAMA_CACHE``, else ``$XDG_CACHE_HOME/mullama``, else ``~/.cache/mullama``.
``<key>`` hashes everything the binary depends on: muhook.c, the ggml headers shipped by
llama-cpp-python (``site-packages/include``), the compiler (path + ``--version``), the flags, the
llama_cpp lib folder (it is the rpath) and the Python ABI tag. A cached entry is reused only if its
``build.json`` matches and the .so's sha256 is the recorded one; otherwise it is rebuilt. The compiler
writes to a unique temporary name that is then renamed (atomic), under an advisory file lock, so
concurrent processes are safe. Any failure raises
:class:`~native_bridge.errors.NativeBridgeError` with the reason; callers then fall back to the
Python hook.

The sha256 and atomic-write helpers here are native_bridge's own on purpose: native_bridge is floor 1
and imports nothing from ``mullama_sdk`` (whose ``files`` module has the SDK's equivalents).
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from . import muhook_api
from .errors import NativeBridgeError
from .ggml_mirror import TENSOR_OFFSETS, GGMLTensor, llama_cpp_lib_dir

logger = logging.getLogger(__name__)

SOURCE_PATH = Path(__file__).with_name("muhook.c")
LIB_NAME = "libmuhook.dylib" if sys.platform == "darwin" else "libmuhook.so"
CACHE_ENV = "MULLAMA_CACHE"
CFLAGS = ("-std=c11", "-O2", "-shared", "-fPIC", "-fvisibility=hidden")
HEADERS = ("ggml.h", "ggml-backend.h")
COMPILE_TIMEOUT_S = 120

#: What the Python side expects from the library (module-level so tests can simulate a mismatch).
EXPECTED_ABI_VERSION = muhook_api.MUHOOK_ABI_VERSION
EXPECTED_TENSOR_SIZE = ctypes.sizeof(GGMLTensor)
EXPECTED_TENSOR_OFFSETS = TENSOR_OFFSETS
EXPECTED_COUNTERS_SIZE = ctypes.sizeof(muhook_api.MuhookCounters)


@dataclasses.dataclass(frozen=True)
class NativeBuild:
    """One cache entry of the compiled hook.

    Attributes:
        path: the shared library.
        compiled: True if this call ran the compiler, False if the cached copy was reused.
        key: hash of everything the binary depends on (also the cache folder's suffix).
        llama_cpp_version: ``llama_cpp.__version__`` the library was built against.
        command: the compiler command line.
    """

    path: Path
    compiled: bool
    key: str
    llama_cpp_version: str
    command: tuple[str, ...]


def cache_root() -> Path:
    """``$MULLAMA_CACHE``, else ``$XDG_CACHE_HOME/mullama``, else ``~/.cache/mullama``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "mullama"


def find_compiler() -> list[str]:
    """The C compiler command: ``$CC`` (may hold arguments), else ``cc``, ``gcc``, ``clang``."""
    if os.environ.get("CC"):
        cmd = shlex.split(os.environ["CC"])
        if cmd and shutil.which(cmd[0]):
            return cmd
        raise NativeBridgeError(f"$CC={os.environ['CC']!r} is not an executable compiler")
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return [found]
    raise NativeBridgeError("no C compiler found ($CC, cc, gcc, clang); install one, e.g. gcc")


def _llama_cpp_version() -> str:
    try:
        import llama_cpp
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise NativeBridgeError(f"llama-cpp-python cannot be imported: {e}") from e
    return str(llama_cpp.__version__)


def _compiler_id(cc: list[str]) -> str:
    try:
        out = subprocess.run(
            [*cc, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NativeBridgeError(f"C compiler {cc} does not run: {e}") from e
    first = out.strip().splitlines()[0] if out.strip() else "unknown"
    return f"{os.path.realpath(shutil.which(cc[0]) or cc[0])} {' '.join(cc[1:])} {first}"


def _sha256(chunks: Iterable[bytes]) -> hashlib._Hash:
    """The sha256 of the concatenated ``chunks``: the one hashing spot of native_bridge.

    native_bridge keeps its own (floor 1: no upward import of ``mullama_sdk.files``).
    """
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h


def _sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (the ``sha256`` recorded in ``build.json``)."""
    with open(path, "rb") as f:
        return _sha256(iter(lambda: f.read(1 << 20), b"")).hexdigest()


@contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; on success it is renamed onto ``path`` (atomic).

    On an exception the temporary file is removed and ``path`` is left as it was, so a reader
    never sees a half-written library or ``build.json``. native_bridge keeps its own (floor 1: no
    upward import of ``mullama_sdk.files``).
    """
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp-")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@dataclasses.dataclass(frozen=True)
class _Plan:
    key: str
    folder: Path
    command: tuple[str, ...]
    version: str


def _plan(cache_dir: Path | None) -> _Plan:
    lib_dir = llama_cpp_lib_dir()
    include_dir = lib_dir.parent.parent / "include"  # site-packages/include
    missing = [h for h in HEADERS if not (include_dir / h).is_file()]
    if missing:
        raise NativeBridgeError(
            f"llama-cpp-python's C headers {missing} are not in {include_dir} "
            "(the wheel normally installs them there)"
        )
    if not SOURCE_PATH.is_file():
        raise NativeBridgeError(f"hook source {SOURCE_PATH} is missing")
    version = _llama_cpp_version()
    cc = find_compiler()
    link = [f"-L{lib_dir}", "-lggml-base", f"-Wl,-rpath,{lib_dir}"]
    command = (*cc, *CFLAGS, f"-I{include_dir}", str(SOURCE_PATH), "-o", "{out}", *link)

    parts = (
        SOURCE_PATH.read_bytes(),
        *((include_dir / name).read_bytes() for name in HEADERS),
        _compiler_id(cc).encode(),
        " ".join(command).encode(),
        version.encode(),
        str(sysconfig.get_config_var("SOABI") or sys.implementation.cache_tag).encode(),
        sys.platform.encode(),
    )
    key = _sha256(_sha256([part]).digest() for part in parts).hexdigest()[:16]
    root = cache_dir if cache_dir is not None else cache_root()
    return _Plan(key, Path(root) / "native" / f"{version}-{key}", command, version)


def _cached_entry_ok(plan: _Plan) -> bool:
    lib, meta = plan.folder / LIB_NAME, plan.folder / "build.json"
    if not lib.is_file() or not meta.is_file():
        return False
    try:
        info = json.loads(meta.read_text())
        ok = (
            info.get("key") == plan.key
            and info.get("llama_cpp_version") == plan.version
            and info.get("abi_version") == EXPECTED_ABI_VERSION
            and info.get("sha256") == _sha256_file(lib)
        )
    except (OSError, ValueError):
        ok = False
    if not ok:
        logger.warning("cached native hook %s is stale or corrupted; rebuilding it", lib)
    return ok


class _FileLock:
    """Advisory exclusive lock on ``path`` (fcntl where available, else a no-op)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd: int | None = None

    def __enter__(self) -> _FileLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: atomic rename alone
            return self
        self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _compile(plan: _Plan) -> None:
    try:
        with _atomic_path(plan.folder / LIB_NAME) as tmp:  # the compiler writes the temporary name
            cmd = [str(tmp) if arg == "{out}" else arg for arg in plan.command]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S, check=False)
            if proc.returncode != 0:
                raise NativeBridgeError(
                    f"compiling the native hook failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                    f"{proc.stderr.strip()[-2000:]}"
                )
            sha = _sha256_file(tmp)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NativeBridgeError(f"compiling the native hook failed: {e}") from e
    meta = {
        "key": plan.key,
        "sha256": sha,
        "llama_cpp_version": plan.version,
        "abi_version": EXPECTED_ABI_VERSION,
        "command": list(plan.command),
    }
    with _atomic_path(plan.folder / "build.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=1) + "\n")


def build_library(*, cache_dir: Path | str | None = None, force: bool = False) -> NativeBuild:
    """Returns the cached hook library, compiling it first if absent, stale or corrupted.

    Args:
        cache_dir: cache root (default: :func:`cache_root`).
        force: recompile even if the cached copy is valid.

    Raises:
        NativeBridgeError: no compiler, no headers, or the compilation failed.
    """
    plan = _plan(Path(cache_dir) if cache_dir is not None else None)
    try:
        plan.folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise NativeBridgeError(f"cannot create the cache folder {plan.folder}: {e}") from e
    compiled = False
    with _FileLock(plan.folder / ".lock"):
        if force or not _cached_entry_ok(plan):
            logger.info("compiling the native hook into %s", plan.folder)
            _compile(plan)
            compiled = True
    return NativeBuild(plan.folder / LIB_NAME, compiled, plan.key, plan.version, plan.command)


def check_abi(lib: ctypes.CDLL, *, built_for: str | None = None) -> None:
    """Raises NativeBridgeError unless ``lib`` matches the Python mirror and llama_cpp."""
    problems = []
    abi = lib.muhook_abi_version()
    if abi != EXPECTED_ABI_VERSION:
        problems.append(f"muhook ABI version {abi} != {EXPECTED_ABI_VERSION} expected by Python")
    size = lib.muhook_sizeof_tensor()
    if size != EXPECTED_TENSOR_SIZE:
        problems.append(
            f"sizeof(struct ggml_tensor) is {size} in C but {EXPECTED_TENSOR_SIZE} in the Python "
            "mirror (native_bridge/ggml_mirror.py is out of date with ggml.h)"
        )
    offs = (ctypes.c_size_t * 6)()
    lib.muhook_tensor_offsets(offs, 6)
    if tuple(offs) != tuple(EXPECTED_TENSOR_OFFSETS):
        problems.append(
            f"ggml_tensor field offsets {tuple(offs)} in C != {tuple(EXPECTED_TENSOR_OFFSETS)} "
            "in the Python mirror"
        )
    if lib.muhook_sizeof_counters() != EXPECTED_COUNTERS_SIZE:
        problems.append("sizeof(struct muhook_counters) differs between C and Python")
    if built_for is not None:
        current = _llama_cpp_version()
        if current != built_for:
            problems.append(f"built for llama-cpp-python {built_for}, running {current}")
    if problems:
        raise NativeBridgeError("native hook ABI check failed: " + "; ".join(problems))


_loaded: dict[Path, ctypes.CDLL] = {}
_loaded_by_dir: dict[tuple[str, str | None], ctypes.CDLL] = {}
_load_lock = threading.Lock()


def load_library(*, cache_dir: Path | str | None = None) -> ctypes.CDLL:
    """Builds (if needed), loads and ABI-checks libmuhook; cached per process and library path.

    llama_cpp is imported first so that the ``libggml-base`` this library links to is the very
    copy llama-cpp-python uses (same soname, already loaded).

    Raises:
        NativeBridgeError: the library cannot be built, loaded or fails the ABI check.
    """
    memo_key = (str(cache_dir if cache_dir is not None else cache_root()), os.environ.get("CC"))
    with _load_lock:
        if memo_key in _loaded_by_dir:  # skip re-hashing and `cc --version` on every hook
            return _loaded_by_dir[memo_key]
        build = build_library(cache_dir=cache_dir)
        lib = _loaded.get(build.path)
        if lib is not None:
            _loaded_by_dir[memo_key] = lib
            return lib
        try:
            lib = ctypes.CDLL(str(build.path))
        except OSError as e:
            if build.compiled:
                raise NativeBridgeError(f"cannot load the native hook {build.path}: {e}") from e
            logger.warning("cannot load cached native hook %s (%s); rebuilding", build.path, e)
            build = build_library(cache_dir=cache_dir, force=True)
            try:
                lib = ctypes.CDLL(str(build.path))
            except OSError as e2:
                raise NativeBridgeError(f"cannot load the native hook {build.path}: {e2}") from e2
        muhook_api.bind(lib)
        check_abi(lib, built_for=build.llama_cpp_version)
        _loaded[build.path] = lib
        _loaded_by_dir[memo_key] = lib
        return lib
