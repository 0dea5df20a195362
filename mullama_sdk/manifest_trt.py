"""The manifest's optional ``trt`` section: TensorRT engines written by ``mullama-export trt``.

Kept apart from :mod:`mullama_sdk.manifest` because only GPU machines build or load engines; the section's
profile and compatibility fields are what :mod:`mullama_sdk.encoder_trt` checks before loading one.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from mullama_sdk.errors import BundleError
from mullama_sdk.manifest_fields import need_field

#: Precisions of TensorRT engines (``mullama-export trt``); int8 would need Q/DQ nodes in the graph.
TRT_PRECISIONS = ("fp32", "fp16")


@dataclasses.dataclass(frozen=True)
class WaveformProfile:
    """A TensorRT optimization profile of the encoder input ``waveform (1, n_samples)``, in samples.

    The engine accepts ``min <= n_samples <= max`` and is tuned for ``opt``.
    """

    min: int
    opt: int
    max: int

    def contains(self, n_samples: int) -> bool:
        return self.min <= n_samples <= self.max

    def seconds(self, sample_rate: int) -> str:
        return f"{self.min / sample_rate:g}..{self.max / sample_rate:g} s (opt {self.opt / sample_rate:g} s)"


@dataclasses.dataclass(frozen=True)
class TrtEngines:
    """One pair of TensorRT engines (encoder + adapter) from the manifest's optional ``trt`` section.

    Serialized engines only run with the TensorRT release and the GPU architecture they were built
    for, so both are recorded (see :func:`mullama_sdk.encoder_trt.engine_incompatibility`).

    Attributes:
        precision: ``fp32`` or ``fp16``.
        encoder, adapter: Engine file names (listed under ``files``).
        tensorrt_version: ``tensorrt.__version__`` of the build (e.g. ``"10.13.0.35"``).
        gpu_name: Name of the GPU the engines were built on.
        compute_capability: Its compute capability, ``"major.minor"`` (e.g. ``"8.6"``).
        profile: The encoder's waveform-length profile.
        build_seconds: Wall time of the build.
        built: UTC time stamp of the build.
        workspace_gb: Builder workspace limit, ``None`` = TensorRT's default (the GPU's memory).
    """

    precision: str
    encoder: str
    adapter: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    profile: WaveformProfile
    build_seconds: float
    built: str = ""
    workspace_gb: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The manifest form (inverse of the parser)."""
        return {
            "encoder": self.encoder, "adapter": self.adapter, "tensorrt_version": self.tensorrt_version,
            "gpu": {"name": self.gpu_name, "compute_capability": self.compute_capability},
            "profile": {"waveform": dataclasses.asdict(self.profile)},
            "build_seconds": self.build_seconds, "built": self.built, "workspace_gb": self.workspace_gb,
        }



_COMPUTE_CAPABILITY = re.compile(r"^[0-9]+\.[0-9]+$")


def parse_trt_section(section: Any, files: Mapping[str, Any], *, where: str,
                      samples: tuple[int, int] | None = None) -> dict[str, TrtEngines]:
    """Check the optional ``trt`` section: ``{precision: {encoder, adapter, tensorrt_version, gpu, profile, ...}}``.

    Args:
        section: ``raw["trt"]`` (``{}`` when the bundle has no engines).
        where: The manifest file, for messages.
        files: The manifest's file table; every engine must be listed there.
        samples: ``(min, max)`` waveform lengths the encoder graph accepts; the profile must lie inside.

    Raises:
        BundleError: naming the first problem.
    """
    if not isinstance(section, dict):
        raise BundleError(f"{where}: field 'trt' has type {type(section).__name__}, expected an object")
    out = {}
    for precision, entry in section.items():
        at = f"{where} trt[{precision!r}]"
        if precision not in TRT_PRECISIONS:
            raise BundleError(f"{where}: trt precision {precision!r} is unknown (valid: {', '.join(TRT_PRECISIONS)})")
        if not isinstance(entry, dict):
            raise BundleError(f"{at} must be an object")
        names = {}
        for graph in ("encoder", "adapter"):
            name = need_field(entry, graph, str, at)
            if name not in files:
                raise BundleError(f"{at}: {graph} engine {name!r} is not listed under 'files'")
            names[graph] = name
        version = need_field(entry, "tensorrt_version", str, at)
        if not re.match(r"^[0-9]+\.[0-9]+", version):
            raise BundleError(f"{at}: tensorrt_version {version!r} is not a version like '10.13.0.35'")
        gpu = need_field(entry, "gpu", dict, at)
        cc = need_field(gpu, "compute_capability", str, f"{at} gpu")
        if not _COMPUTE_CAPABILITY.match(cc):
            raise BundleError(f"{at}: gpu compute_capability {cc!r} is not 'major.minor' (e.g. '8.6')")
        prof_raw = need_field(need_field(entry, "profile", dict, at), "waveform", dict, f"{at} profile")
        profile = WaveformProfile(*(int(need_field(prof_raw, k, int, f"{at} profile.waveform"))
                                    for k in ("min", "opt", "max")))
        if not 0 < profile.min <= profile.opt <= profile.max:
            raise BundleError(f"{at}: profile {dataclasses.asdict(profile)} must have 0 < min <= opt <= max")
        if samples is not None and not (samples[0] <= profile.min and profile.max <= samples[1]):
            raise BundleError(f"{at}: profile {dataclasses.asdict(profile)} lies outside the encoder's "
                              f"{samples[0]}..{samples[1]} samples")
        build_seconds = float(need_field(entry, "build_seconds", (int, float), at))
        workspace = entry.get("workspace_gb")
        if workspace is not None and (not isinstance(workspace, (int, float)) or isinstance(workspace, bool)
                                      or workspace <= 0):
            raise BundleError(f"{at}: workspace_gb must be a positive number or null, got {workspace!r}")
        out[precision] = TrtEngines(
            precision=precision, encoder=names["encoder"], adapter=names["adapter"], tensorrt_version=version,
            gpu_name=str(need_field(gpu, "name", str, f"{at} gpu")), compute_capability=cc, profile=profile,
            build_seconds=build_seconds, built=str(entry.get("built", "")),
            workspace_gb=None if workspace is None else float(workspace),
        )
    return out
