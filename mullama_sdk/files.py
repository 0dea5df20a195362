"""Files written whole or not at all, and their sha256: the one implementation the whole tree uses.

A reader (another process, the runtime loading a bundle, a user's shell) must never see half a file:
everything is written under a temporary name in the destination's folder (same file system, so the
final :func:`os.replace` is atomic) and renamed at the very end; on any error the temporary file is
removed and the destination keeps its previous content.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

#: Read size of :func:`sha256_file` (4 MiB: large enough for GGUFs, small enough to bound memory).
HASH_CHUNK = 1 << 22


def sha256_file(path: str | os.PathLike[str], *, chunk: int = HASH_CHUNK) -> str:
    """Hex sha256 of a file, read in chunks (bundles hold multi-GB GGUFs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    For writers that want a file name rather than a file object (``onnx.save``, ``plt.savefig``,
    ``soundfile.write``...). ``suffix`` keeps an extension some writers look at (``".png"``). On an
    exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    # A fresh unique name, not a file: the writer creates it with the usual permissions (0644 under the
    # common umask; mkstemp would make it 0600 and a bundle unreadable to other users).
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (flushed to disk before the rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))
