"""What this CPU's int8 kernels do, so that an int8 graph is only used where it computes what it should.

ONNX Runtime's dynamically quantized MatMuls multiply uint8 activations by int8 weights (U8S8). On x86 the
kernel depends on the CPU (see ``docs/int8.md``):

* AVX-512 VNNI or AVX-VNNI: ``vpdpbusd`` sums four u8 x s8 products straight into int32: exact.
* AVX2 alone (Intel before Ice Lake, AMD Zen 2/3, many laptops): ``vpmaddubsw`` adds each adjacent pair of
  u8 x s8 products into a *saturating* int16, so ``|u0*w0 + u1*w1| > 32767`` is clipped. With 8-bit
  weights that happens (255 * 127 * 2 = 64770); adapter cosine to fp32 0.907 instead of 0.9998
  (issue #14's report), 0.703 on the demo model's adapter (docs/int8.md).

Graphs quantized with weights limited to [-64, 64] (:data:`INT8_SCHEME`, 255 * 64 * 2 = 32640) cannot
saturate, so they give the same numbers on every kernel; graphs of older bundles (:data:`LEGACY_INT8_SCHEME`)
are only right on the exact kernels, and the runtime avoids them elsewhere.
"""

from __future__ import annotations

import dataclasses
import functools
import platform
from pathlib import Path

__all__ = [
    "INT8_SCHEME",
    "INT8_SCHEMES",
    "INT8_WEIGHT_LIMIT",
    "LEGACY_INT8_SCHEME",
    "Int8Kernel",
    "cpu_flags",
    "int8_kernel",
]

#: The int8 scheme written by this version: uint8 activations (quantized per call), int8 weights symmetric
#: per output channel within [-INT8_WEIGHT_LIMIT, INT8_WEIGHT_LIMIT] (ONNX Runtime's ``reduce_range``).
INT8_SCHEME = "u8s8-w7"
#: The scheme of bundles that record none: full-range int8 weights, which AVX2-only kernels saturate.
LEGACY_INT8_SCHEME = "u8s8-w8"
#: Every scheme a manifest may name, with whether it is exact on a saturating (AVX2-only) kernel.
INT8_SCHEMES: dict[str, bool] = {INT8_SCHEME: True, LEGACY_INT8_SCHEME: False}
#: Largest |weight| of :data:`INT8_SCHEME`: 255 * 64 * 2 = 32640 fits the int16 pair sum (<= 32767).
INT8_WEIGHT_LIMIT = 64

_X86 = ("x86_64", "amd64", "i386", "i686", "x86")


@dataclasses.dataclass(frozen=True)
class Int8Kernel:
    """The U8S8 kernel ONNX Runtime's CPU provider will run here.

    Attributes:
        name: ``avx512-vnni``, ``avx-vnni``, ``avx2`` (saturating pairs), ``x86`` (flags unknown: assumed
            saturating) or ``non-x86`` (ARM and others: dot-product kernels that accumulate in int32).
        exact: Whether u8 x s8 products are accumulated without saturation whatever the weights.
    """

    name: str
    exact: bool

    def describe(self) -> str:
        if self.exact:
            return f"{self.name} (int8 products accumulate exactly in int32)"
        return f"{self.name} (u8 x s8 pairs are summed into saturating int16)"


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags the kernel reports (Linux ``/proc/cpuinfo``); empty where unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 / ARM spelling
            return frozenset(value.split())
    return frozenset()


def int8_kernel(flags: frozenset[str] | None = None, machine: str | None = None) -> Int8Kernel:
    """Which U8S8 kernel ONNX Runtime will use on this CPU (or on one with ``flags`` and ``machine``)."""
    machine = (machine if machine is not None else platform.machine()).lower()
    if machine not in _X86:
        return Int8Kernel("non-x86", True)
    flags = cpu_flags() if flags is None else flags
    if "avx512_vnni" in flags:
        return Int8Kernel("avx512-vnni", True)
    if "avx_vnni" in flags:
        return Int8Kernel("avx-vnni", True)
    if "avx2" in flags:
        return Int8Kernel("avx2", False)
    return Int8Kernel("x86", False)
