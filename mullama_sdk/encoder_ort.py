"""Audio -> music vectors with ONNX Runtime: the encoder graph per window, then the adapter graph.

Graph interfaces (fixed by the export, see :mod:`mullama_sdk.manifest`):
encoder ``waveform (1, n) f32 -> state_means (n_states, mert_dim) f32, n_frames i64``;
adapter ``state_means (n_states, mert_dim) -> injection (n_inject, n_embd), music_query (n_embd,)``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from mullama_sdk.errors import BackendUnavailableError, BundleError
from mullama_sdk.manifest import ADAPTER_INPUTS, ADAPTER_OUTPUTS, ENCODER_INPUTS, ENCODER_OUTPUTS

log = logging.getLogger(__name__)

_CPU = "CPUExecutionProvider"
_CUDA = "CUDAExecutionProvider"


def _import_ort():
    try:
        import onnxruntime
    except ImportError as e:
        raise BackendUnavailableError(
            "ONNX Runtime is not installed: pip install 'mullama-sdk[cpu]' (or '[cuda]' for NVIDIA GPUs)"
        ) from e
    return onnxruntime


def choose_providers(device: str) -> list[str]:
    """ONNX Runtime providers for ``device`` ("auto", "cpu", "cuda"); CUDA falls back with a logged reason."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cpu":
        return [_CPU]
    available = _import_ort().get_available_providers()
    if _CUDA in available:
        return [_CUDA, _CPU]
    if device == "cuda":
        raise BackendUnavailableError(
            f"device='cuda' asked for, but this ONNX Runtime offers only {available}; "
            "install onnxruntime-gpu (pip install 'mullama-sdk[cuda]') on a machine with an NVIDIA GPU"
        )
    return [_CPU]


def session_options(n_threads: int | None, *, prepack: bool = True, arena: bool = True):
    """ONNX Runtime session options as the SDK sets them.

    ``prepack=False`` (``session.disable_prepacking``) keeps ORT from storing a re-laid-out copy of the
    int8 MatMul weights beside the originals; ``arena=False`` (``enable_cpu_mem_arena``) returns activation
    memory after each run instead of keeping the largest run's. Both save memory and cost speed: see
    bench/RESULTS.md, memory section.
    """
    ort = _import_ort()
    opts = ort.SessionOptions()
    if n_threads:
        opts.intra_op_num_threads = n_threads
    opts.inter_op_num_threads = 1
    opts.enable_cpu_mem_arena = arena
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    return opts


class OnnxMusicEncoder:
    """The :class:`~mullama_sdk.encoding.MusicEncoder` on ONNX Runtime: owns the two sessions; thread-safe
    (ORT sessions allow concurrent ``run``)."""

    def __init__(self, encoder_path: Path, adapter_path: Path, *, providers: list[str], n_threads: int | None,
                 low_memory: bool = False):
        ort = _import_ort()
        opts = session_options(n_threads, prepack=not low_memory, arena=not low_memory)
        self.providers = providers
        self._encoder = self._session(ort, encoder_path, opts, ENCODER_INPUTS, ENCODER_OUTPUTS)
        self._adapter = self._session(ort, adapter_path, opts, ADAPTER_INPUTS, ADAPTER_OUTPUTS)

    def _session(self, ort, path: Path, opts, inputs: tuple[str, ...], outputs: tuple[str, ...]):
        try:
            sess = ort.InferenceSession(str(path), sess_options=opts, providers=self.providers)
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types for bad graphs
            raise BundleError(f"ONNX Runtime cannot load {path.name}: {e}") from e
        got_in = tuple(i.name for i in sess.get_inputs())
        got_out = tuple(o.name for o in sess.get_outputs())
        if got_in != inputs or got_out != outputs:
            raise BundleError(
                f"{path.name} has inputs {got_in} and outputs {got_out}; expected {inputs} -> {outputs}"
            )
        return sess

    def window_means(self, window: np.ndarray) -> tuple[np.ndarray, int]:
        """Per-state time-means ``(n_states, mert_dim)`` of one window (mono f32 at 24 kHz) and its frames."""
        means, frames = self._encoder.run(None, {"waveform": np.ascontiguousarray(window, np.float32)[None]})
        return means.astype(np.float64), int(frames)

    def adapt(self, state_means: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(injection (n_inject, n_embd), music_query (n_embd,))`` float32 for frame-weighted means."""
        injection, query = self._adapter.run(None, {"state_means": np.asarray(state_means, np.float32)})
        return np.ascontiguousarray(injection, np.float32), np.asarray(query, np.float32)

    def close(self) -> None:
        self._encoder = self._adapter = None
