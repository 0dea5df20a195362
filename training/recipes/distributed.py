"""Several processes under ``torchrun``: joining the process group, waiting for each other, and which
device each process uses.

A single process (no ``WORLD_SIZE``) needs none of the group functions: they are then no-ops.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mullama_sdk.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    """This process's place among the ``torchrun`` processes; ``owns_group`` when it created the group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> DistInfo:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); a no-op for one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    owns = False
    if not dist.is_initialized():
        use_nccl = torch.cuda.is_available() and device != "cpu"
        dist.init_process_group("nccl" if use_nccl else "gloo")
        owns = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns)


def barrier(info: DistInfo) -> None:
    """Wait for every process (rank 0 writes files the others then read)."""
    if info.world_size > 1:
        dist.barrier()


def resolve_device(name: str, *, local_rank: int = 0, setting: str = "device") -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` -> a device; bare ``cuda`` is this process's GPU (``local_rank``).

    ``setting`` names where the value came from (``train.device``, ``--device``) in the error messages.

    Raises:
        ConfigError: an unknown device name, or CUDA asked for where there is none.
    """
    want = name
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        want = f"cuda:{local_rank}"
    try:
        dev = torch.device(want)
    except RuntimeError as e:
        raise ConfigError(f"{setting}={want!r}; valid: auto, cpu, cuda, cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{setting}={want!r} but CUDA is not available; use cpu")
    return dev
