"""``torch.save`` of multi-GB state dicts without holding them in memory: seeded random tensors written in place.

A real-width asset set is several GB of random weights; building it in memory first would need that much
RAM. :func:`save_streamed` writes the same bytes as a plain ``torch.save`` (``tests/test_assets.py`` checks)
while holding one chunk of one tensor at a time.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import mmap
import struct
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path

import torch

__all__ = ["RandomTensor", "TensorSource", "save_streamed", "seed_for"]


@dataclasses.dataclass(frozen=True)
class RandomTensor:
    """A tensor of seeded random values ``mean + std * N(0, 1)``, generated when it is written.

    Attributes:
        key: Seeds the values (with the build seed); equal keys give equal values in every file.
        shape: Tensor shape.
        dtype: Stored dtype.
        std: Standard deviation.
        mean: Offset (1.0 for norm weights).
        exact16: Round to bf16 and flush ``|w| < 2**-14`` to zero, so the value is exact in bf16 AND fp16.
    """

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    std: float
    mean: float = 0.0
    exact16: bool = False


TensorSource = RandomTensor | torch.Tensor

_CHUNK = 1 << 22  # elements per generator call; fixed, because the values depend on it


def seed_for(seed: int, key: str) -> int:
    """A 63-bit generator seed for one tensor, independent of the order tensors are generated in."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{key}".encode()).digest()[:8], "little") >> 1


def _fill(target: torch.Tensor, spec: RandomTensor, seed: int) -> None:
    """Write ``spec``'s values into ``target`` (contiguous, possibly memory-mapped) chunk by chunk."""
    g = torch.Generator().manual_seed(seed_for(seed, spec.key))
    flat = target.view(-1)
    for start in range(0, flat.numel(), _CHUNK):
        x = torch.randn(min(_CHUNK, flat.numel() - start), generator=g).mul_(spec.std).add_(spec.mean)
        if spec.exact16:
            x = x.bfloat16()
            # fp16 has 11 significant bits down to 2**-14, bf16 has 8: every bf16 value above that is exact
            # in fp16; below it fp16 turns subnormal and may round, so those become 0.
            x[x.abs() < 2.0**-14] = 0
        flat[start : start + x.numel()].copy_(x)


def save_streamed(
    path: Path,
    tensors: Mapping[str, TensorSource],
    seed: int,
    *,
    envelope: Mapping[str, object] | None = None,
) -> None:
    """``torch.save`` ``tensors`` (or ``{"model": tensors, **envelope}``) without holding them in memory.

    ``torch.serialization.skip_data`` writes the file with every storage's bytes left as a hole; the file
    is then memory-mapped (``MAP_SHARED``, so writes reach it) and filled tensor by tensor. That leaves the
    zip CRCs and torch's ``.data/serialization_id`` (derived from the CRCs) stale; :func:`_fix_zip_checksums`
    recomputes them, after which the bytes equal a plain ``torch.save`` (``tests/test_assets.py`` checks).
    """
    # torch.empty reserves address space without touching it, so the skeleton costs no resident memory.
    skeleton = {
        name: src if isinstance(src, torch.Tensor) else torch.empty(src.shape, dtype=src.dtype)
        for name, src in tensors.items()
    }
    obj = skeleton if envelope is None else {"model": skeleton, **envelope}
    with torch.serialization.skip_data():
        torch.save(obj, path)
    del obj, skeleton
    with (
        torch.serialization.set_default_mmap_options(mmap.MAP_SHARED),
        torch.serialization.safe_globals([argparse.Namespace]),
    ):
        loaded = torch.load(path, mmap=True, weights_only=True)
    mapped = loaded if envelope is None else loaded["model"]
    with torch.no_grad():
        for name, src in tensors.items():
            if isinstance(src, torch.Tensor):
                mapped[name].copy_(src)
            else:
                _fill(mapped[name], src, seed)
    del loaded, mapped  # unmaps; the page cache already holds the writes
    _fix_zip_checksums(path)


_ZIP_CENTRAL = b"PK\x01\x02"
_ZIP_DESCRIPTOR = b"PK\x07\x08"
_SERIALIZATION_ID = "/.data/serialization_id"
_U64 = (1 << 64) - 1


def _fix_zip_checksums(path: Path) -> None:
    """Recompute the CRC-32 of every record of a torch zip and torch's ``serialization_id``.

    Torch's writer puts each CRC in a data descriptor after the record (the local header holds 0) and in the
    central directory. ``serialization_id`` is 40 digits: a hash of the record names (unchanged by filling),
    then the fold ``h = h ^ (crc + 0x9e3779b9 + (h << 6) + (h >> 2))`` (c10::hash_combine, 64-bit) over the
    CRCs of all records written before it.
    """
    with zipfile.ZipFile(path) as zf:
        records = zf.infolist()
    with open(path, "r+b") as f:
        central = _central_directory_offset(f)
        combined = 0
        for info in records:
            f.seek(info.header_offset + 26)
            name_len, extra_len = struct.unpack("<HH", f.read(4))
            data_at = info.header_offset + 30 + name_len + extra_len
            if info.filename.endswith(_SERIALIZATION_ID):
                f.seek(data_at)
                old = f.read(info.file_size)
                new = old[:20] + b"%020d" % combined
                if len(new) != len(old):
                    raise RuntimeError(f"{path}: unexpected serialization_id {old!r}")
                f.seek(data_at)
                f.write(new)
            crc = _crc32_of_region(f, data_at, info.file_size)
            combined = combined ^ ((crc + 0x9E3779B9 + ((combined << 6) & _U64) + (combined >> 2)) & _U64)
            f.seek(data_at + info.file_size)
            if f.read(4) != _ZIP_DESCRIPTOR:
                raise RuntimeError(f"{path}: record {info.filename} has no data descriptor")
            f.write(struct.pack("<I", crc))
            f.seek(central)
            header = f.read(46)
            if header[:4] != _ZIP_CENTRAL:
                raise RuntimeError(f"{path}: central directory out of step at {info.filename}")
            f.seek(central + 16)
            f.write(struct.pack("<I", crc))
            central += 46 + sum(struct.unpack("<HHH", header[28:34]))


def _central_directory_offset(f: io.BufferedRandom) -> int:
    """Offset of a zip's central directory, read from its (zip64) end record. Torch writes no comment."""
    f.seek(-22, io.SEEK_END)
    end = f.read(22)
    if end[:4] != b"PK\x05\x06":
        raise RuntimeError("zip end-of-central-directory record not found")
    offset = struct.unpack("<I", end[16:20])[0]
    if offset != 0xFFFFFFFF:
        return offset
    f.seek(-22 - 20, io.SEEK_END)
    locator = f.read(20)
    if locator[:4] != b"PK\x06\x07":
        raise RuntimeError("zip64 end-of-central-directory locator not found")
    f.seek(struct.unpack("<Q", locator[8:16])[0])
    end64 = f.read(56)
    if end64[:4] != b"PK\x06\x06":
        raise RuntimeError("zip64 end-of-central-directory record not found")
    return struct.unpack("<Q", end64[48:56])[0]


def _crc32_of_region(f: io.BufferedRandom, start: int, size: int) -> int:
    """CRC-32 of ``size`` bytes of ``f`` from ``start``, read in 16 MiB blocks."""
    f.seek(start)
    crc = 0
    while size:
        block = f.read(min(size, 1 << 24))
        crc = zlib.crc32(block, crc)
        size -= len(block)
    return crc
