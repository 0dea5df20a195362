"""The music encoder on TensorRT: serialized engines (``mullama-export trt``) run with the TensorRT runtime.

:class:`TensorRTMusicEncoder` implements :class:`~mullama_sdk.encoding.MusicEncoder` (``window_means``,
``adapt``, ``close``), as :class:`~mullama_sdk.encoder_ort.OnnxMusicEncoder` does on ONNX Runtime.

Nothing here is imported before it is needed: ``tensorrt`` and cuda-python load on first use, so the
module imports (and its probes report why not) on machines without them.

Device memory: CUDA runtime calls go through cuda-python's ``cuda.bindings.runtime`` module (the
``from cuda import cudart`` spelling of cuda-python < 12.6 is accepted too): ``cudaMalloc`` /
``cudaFree`` for the engine's input and output buffers, one ``cudaStream_t`` per engine,
``cudaMemcpyAsync`` + ``cudaStreamSynchronize`` around ``execute_async_v3``. Host arrays are ordinary
(pageable) numpy arrays: the copies are a few MB per 30 s window, small next to MERT's compute.
Every CUDA return code is checked. Three tiers, as for llama.cpp: :class:`_Cuda` mirrors the few CUDA
calls, :class:`TrtGraph` owns one engine + execution context + its buffers + its stream and frees them
in ``close()``, :class:`TensorRTMusicEncoder` is what the Captioner uses.

Windows outside the engine's optimization profile (shorter than its min, longer than its max) are not
padded or cut: padding would change MERT's time-mean, so such a window runs on ONNX Runtime (the
``fallback`` given at construction, created on first need) and a debug line says so.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mullama_sdk.errors import BackendUnavailableError, BundleError, ClosedError
from mullama_sdk.manifest import (
    ADAPTER_INPUTS,
    ADAPTER_OUTPUTS,
    ENCODER_INPUTS,
    ENCODER_OUTPUTS,
)
from mullama_sdk.manifest_trt import TrtEngines, WaveformProfile

log = logging.getLogger(__name__)

INSTALL_HINT = ("pip install 'mullama-sdk[cuda]' (tensorrt, cuda-python, onnxruntime-gpu; cuda-python's major "
                "version must match the CUDA major version of the NVIDIA driver, e.g. 'cuda-python>=12.6,<13' for CUDA 12)")


@dataclasses.dataclass(frozen=True)
class GpuInfo:
    """The CUDA device engines are built for / run on."""

    index: int
    name: str
    compute_capability: str  # "major.minor", e.g. "8.6"
    total_memory_bytes: int


# ------------------------------------------------------------------------------------------ probes
def import_tensorrt() -> Any:
    """``import tensorrt``, or :class:`BackendUnavailableError` saying why not."""
    try:
        import tensorrt
    except (ImportError, OSError) as e:  # OSError: the wheel is there but libnvinfer is not loadable
        raise BackendUnavailableError(f"TensorRT is not available: `import tensorrt` failed ({e}); {INSTALL_HINT}") from e
    return tensorrt


def tensorrt_version() -> str:
    """The installed TensorRT's version (``tensorrt.__version__``); raises BackendUnavailableError."""
    return str(import_tensorrt().__version__)


def import_cudart() -> Any:
    """cuda-python's CUDA runtime module, or :class:`BackendUnavailableError` saying why not."""
    try:
        from cuda.bindings import runtime
    except ImportError as e:
        try:
            from cuda import cudart as runtime  # cuda-python < 12.6
        except ImportError:
            raise BackendUnavailableError(
                f"cuda-python is not available: `from cuda.bindings import runtime` failed ({e}); {INSTALL_HINT}"
            ) from e
    return runtime


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


def _error_text(rt: Any, err: Any) -> str:
    name = getattr(err, "name", str(err))
    try:
        desc = rt.cudaGetErrorString(err)[1].decode()
    except Exception:  # noqa: BLE001 - only decoration of an error message
        desc = ""
    return f"{name} ({desc})" if desc else name


def cuda_device(index: int = 0) -> GpuInfo:
    """Name and compute capability of CUDA device ``index``; BackendUnavailableError names the failed check."""
    rt = import_cudart()
    ok = rt.cudaError_t.cudaSuccess
    err, count = rt.cudaGetDeviceCount()
    if err != ok:
        _, driver = rt.cudaDriverGetVersion()
        _, runtime = rt.cudaRuntimeGetVersion()
        why = ("no NVIDIA driver is installed (cudaDriverGetVersion() = 0)" if not driver else
               f"the NVIDIA driver supports CUDA {_cuda_version(driver)}, cuda-python's runtime is CUDA "
               f"{_cuda_version(runtime)}")
        raise BackendUnavailableError(f"no usable CUDA device: cudaGetDeviceCount() failed with "
                                      f"{_error_text(rt, err)}; {why}")
    if count <= index:
        raise BackendUnavailableError(f"no usable CUDA device: cudaGetDeviceCount() = {count}, device {index} asked for")
    err, props = rt.cudaGetDeviceProperties(index)
    if err != ok:
        raise BackendUnavailableError(f"cudaGetDeviceProperties({index}) failed with {_error_text(rt, err)}")
    name = props.name.decode(errors="replace").rstrip("\0") if isinstance(props.name, bytes) else str(props.name)
    return GpuInfo(index, name, f"{props.major}.{props.minor}", int(props.totalGlobalMem))


def _major_minor(version: str) -> tuple[int, ...]:
    parts = []
    for p in version.split(".")[:2]:
        digits = "".join(c for c in p if c.isdigit())
        parts.append(int(digits) if digits else -1)
    return tuple(parts)


def engine_incompatibility(entry: TrtEngines, *, tensorrt_version: str, gpu: GpuInfo) -> str | None:
    """Why the engines of ``entry`` cannot run here, or ``None``.

    A serialized engine is specific to the TensorRT release (major.minor is checked here; TensorRT
    itself refuses other patch releases when deserializing, which the loader reports) and to the GPU
    architecture (compute capability) it was built on.
    """
    files = f"{entry.encoder} / {entry.adapter}"
    if _major_minor(entry.tensorrt_version) != _major_minor(tensorrt_version):
        return (f"{files} were built with TensorRT {entry.tensorrt_version}, this machine has TensorRT "
                f"{tensorrt_version} (major.minor must match); rebuild them here with `mullama-export trt`")
    if entry.compute_capability != gpu.compute_capability:
        return (f"{files} were built for compute capability {entry.compute_capability} ({entry.gpu_name}), "
                f"this GPU ({gpu.name}) has {gpu.compute_capability}; rebuild them here with `mullama-export trt`")
    return None


# ---------------------------------------------------------------------------------- TensorRT logger
_LOGGER: Any = None
_LOGGER_LOCK = threading.Lock()


def trt_logger(trt: Any) -> Any:
    """The process's one TensorRT logger: routes TensorRT's messages to :mod:`logging` and keeps the
    latest errors (``recent_errors()``) for the exceptions raised here."""
    global _LOGGER
    with _LOGGER_LOCK:
        if _LOGGER is None:
            sev = trt.ILogger.Severity
            levels = {sev.INTERNAL_ERROR: logging.ERROR, sev.ERROR: logging.ERROR, sev.WARNING: logging.WARNING,
                      sev.INFO: logging.DEBUG, sev.VERBOSE: logging.DEBUG}
            trt_log = logging.getLogger("tensorrt")

            class _Logger(trt.ILogger):
                def __init__(self) -> None:
                    trt.ILogger.__init__(self)
                    self.errors: collections.deque[str] = collections.deque(maxlen=8)

                def log(self, severity: Any, msg: str) -> None:
                    level = levels.get(severity, logging.DEBUG)
                    if level >= logging.ERROR:
                        self.errors.append(msg)
                    trt_log.log(level, "%s", msg)

                def recent_errors(self) -> str:
                    text = " | ".join(self.errors) or "no error message from TensorRT"
                    self.errors.clear()
                    return text

            _LOGGER = _Logger()
        return _LOGGER


# ------------------------------------------------------------------------------------- CUDA runtime
class _Cuda:
    """The CUDA runtime calls the engines need, each return code checked (cuda-python returns tuples)."""

    def __init__(self) -> None:
        self.rt = import_cudart()
        self._ok = self.rt.cudaError_t.cudaSuccess

    def _check(self, result: Any, what: str) -> Any:
        err = result[0] if isinstance(result, tuple) else result
        if err != self._ok:
            raise RuntimeError(f"CUDA {what} failed: {_error_text(self.rt, err)}")
        if isinstance(result, tuple) and len(result) > 1:
            return result[1] if len(result) == 2 else result[1:]
        return None

    def malloc(self, nbytes: int) -> int:
        return int(self._check(self.rt.cudaMalloc(max(int(nbytes), 1)), f"cudaMalloc({nbytes})"))

    def free(self, ptr: int) -> None:
        self._check(self.rt.cudaFree(ptr), "cudaFree")

    def stream_create(self) -> Any:
        return self._check(self.rt.cudaStreamCreate(), "cudaStreamCreate")

    def stream_destroy(self, stream: Any) -> None:
        self._check(self.rt.cudaStreamDestroy(stream), "cudaStreamDestroy")

    def to_device(self, dst: int, src: np.ndarray, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check(self.rt.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes, kind, stream), "cudaMemcpyAsync H2D")

    def to_host(self, dst: np.ndarray, src: int, stream: Any) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._check(self.rt.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes, kind, stream), "cudaMemcpyAsync D2H")

    def synchronize(self, stream: Any) -> None:
        self._check(self.rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")


@dataclasses.dataclass
class _DeviceBuffer:
    ptr: int
    nbytes: int


# --------------------------------------------------------------------------------------- one engine
class TrtGraph:
    """One deserialized engine, its execution context, device buffers and CUDA stream.

    Not thread-safe (one execution context): callers serialise :meth:`run`. Buffers grow to the
    largest shape seen and are reused; ``close()`` frees everything (idempotent).
    """

    def __init__(self, path: Path, *, trt: Any = None, cuda: _Cuda | None = None) -> None:
        self.path = Path(path)
        self._trt = trt or import_tensorrt()
        self._cuda = cuda or _Cuda()
        self._logger = trt_logger(self._trt)
        self._buffers: dict[str, _DeviceBuffer] = {}
        self._stream: Any = None
        self._runtime = self._engine = self._context = None
        try:
            data = self.path.read_bytes()
        except OSError as e:
            raise BundleError(f"cannot read the TensorRT engine {self.path.name}: {e}") from e
        try:
            self._runtime = self._trt.Runtime(self._logger)
            self._engine = self._runtime.deserialize_cuda_engine(data)
            if self._engine is None:
                raise BackendUnavailableError(
                    f"TensorRT {self._trt.__version__} cannot load {self.path.name}: {self._logger.recent_errors()}")
            self._context = self._engine.create_execution_context()
            if self._context is None:
                raise BackendUnavailableError(
                    f"TensorRT cannot create an execution context for {self.path.name} (out of GPU memory?): "
                    f"{self._logger.recent_errors()}")
            self._stream = self._cuda.stream_create()
        except BaseException:
            self.close()
            raise
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        mode_in = self._trt.TensorIOMode.INPUT
        self.inputs = tuple(n for n in names if self._engine.get_tensor_mode(n) == mode_in)
        self.outputs = tuple(n for n in names if self._engine.get_tensor_mode(n) != mode_in)
        self._dtype = {n: np.dtype(self._trt.nptype(self._engine.get_tensor_dtype(n))) for n in names}
        # Shape tensors (e.g. a frame count computed only from shapes) may live in host memory.
        host = self._trt.TensorLocation.HOST
        self._on_host = {n: self._engine.get_tensor_location(n) == host for n in names}

    def check_interface(self, inputs: Sequence[str], outputs: Sequence[str]) -> None:
        if set(self.inputs) != set(inputs) or set(self.outputs) != set(outputs):
            raise BundleError(f"{self.path.name} has inputs {self.inputs} and outputs {self.outputs}; "
                              f"expected {tuple(inputs)} -> {tuple(outputs)}")

    def profile_shapes(self, name: str) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(min, opt, max) shapes of input ``name`` in optimization profile 0."""
        lo, opt, hi = self._engine.get_tensor_profile_shape(name, 0)
        return tuple(lo), tuple(opt), tuple(hi)

    def _device(self, name: str, nbytes: int) -> int:
        buf = self._buffers.get(name)
        if buf is None or buf.nbytes < nbytes:
            if buf is not None:
                del self._buffers[name]
                self._cuda.free(buf.ptr)
            buf = _DeviceBuffer(self._cuda.malloc(nbytes), max(nbytes, 1))
            self._buffers[name] = buf
        return buf.ptr

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the engine once: host arrays in, host arrays out (synchronous)."""
        if self._context is None:
            raise ClosedError(f"{self.path.name}: this TensorRT engine is closed")
        ctx = self._context
        keep = []  # host arrays must stay alive until the stream is synchronised
        for name in self.inputs:
            arr = np.ascontiguousarray(feeds[name], dtype=self._dtype[name])
            if not ctx.set_input_shape(name, arr.shape):
                raise ValueError(f"{self.path.name}: input {name!r} of shape {arr.shape} is outside the engine's "
                                 f"profile {self.profile_shapes(name)}")
            keep.append(arr)
            if self._on_host[name]:
                ptr = arr.ctypes.data
            else:
                ptr = self._device(name, arr.nbytes)
                self._cuda.to_device(ptr, arr, self._stream)
            if not ctx.set_tensor_address(name, ptr):
                raise RuntimeError(f"{self.path.name}: set_tensor_address({name!r}) failed")
        results: dict[str, np.ndarray] = {}
        for name in self.outputs:
            shape = tuple(ctx.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise RuntimeError(f"{self.path.name}: output {name!r} has unresolved shape {shape}")
            out = np.empty(shape, dtype=self._dtype[name])
            results[name] = out
            ptr = out.ctypes.data if self._on_host[name] else self._device(name, out.nbytes)
            if not ctx.set_tensor_address(name, ptr):
                raise RuntimeError(f"{self.path.name}: set_tensor_address({name!r}) failed")
        if not ctx.execute_async_v3(int(self._stream)):
            self._cuda.synchronize(self._stream)
            raise RuntimeError(f"{self.path.name}: execute_async_v3 failed: {self._logger.recent_errors()}")
        for name, out in results.items():
            if not self._on_host[name]:
                self._cuda.to_host(out, self._buffers[name].ptr, self._stream)
        self._cuda.synchronize(self._stream)
        del keep
        return results

    def close(self) -> None:
        # The context before the engine before the runtime, then the memory it used.
        self._context = None
        self._engine = None
        self._runtime = None
        buffers, self._buffers = self._buffers, {}
        for buf in buffers.values():
            self._cuda.free(buf.ptr)
        if self._stream is not None:
            stream, self._stream = self._stream, None
            self._cuda.stream_destroy(stream)


# --------------------------------------------------------------------------------- the encoder pair
class TensorRTMusicEncoder:
    """Encoder + adapter engines, a :class:`~mullama_sdk.encoding.MusicEncoder`; thread-safe (one lock per engine).

    Args:
        encoder_path, adapter_path: Serialized engines written by ``mullama-export trt``.
        profile: The waveform profile the manifest records; must equal the engine's own.
        fallback: Creates the ONNX Runtime encoder used for windows outside the profile (on first
            need). Without it such a window raises ValueError.
    """

    backend = "tensorrt"

    def __init__(self, encoder_path: Path, adapter_path: Path, *, profile: WaveformProfile | None = None,
                 fallback: Callable[[], Any] | None = None) -> None:
        trt = import_tensorrt()
        cuda = _Cuda()
        self._encoder: TrtGraph | None = None
        self._adapter: TrtGraph | None = None
        self._fallback: Any = None
        self._fallback_factory = fallback
        self._enc_lock, self._ad_lock, self._fb_lock = threading.Lock(), threading.Lock(), threading.Lock()
        try:
            self._encoder = TrtGraph(Path(encoder_path), trt=trt, cuda=cuda)
            self._encoder.check_interface(ENCODER_INPUTS, ENCODER_OUTPUTS)
            self._adapter = TrtGraph(Path(adapter_path), trt=trt, cuda=cuda)
            self._adapter.check_interface(ADAPTER_INPUTS, ADAPTER_OUTPUTS)
            lo, opt, hi = self._encoder.profile_shapes("waveform")
            self.profile = WaveformProfile(int(lo[-1]), int(opt[-1]), int(hi[-1]))
            if profile is not None and profile != self.profile:
                raise BundleError(f"{Path(encoder_path).name} accepts {self.profile} samples, the manifest says "
                                  f"{profile}: the engine was replaced or the manifest edited")
        except BaseException:
            self.close()
            raise

    def _fallback_encoder(self) -> Any:
        with self._fb_lock:
            if self._fallback is None:
                if self._fallback_factory is None:
                    return None
                self._fallback = self._fallback_factory()
            return self._fallback

    def window_means(self, window: np.ndarray) -> tuple[np.ndarray, int]:
        """Per-state time-means ``(n_states, mert_dim)`` float64 of one window and its frame count."""
        w = np.ascontiguousarray(window, np.float32).reshape(-1)
        if not self.profile.contains(len(w)):
            fb = self._fallback_encoder()
            if fb is None:
                raise ValueError(f"a window of {len(w)} samples is outside the TensorRT profile "
                                 f"{self.profile.min}..{self.profile.max}")
            log.debug("window of %d samples is outside the TensorRT profile %d..%d: ONNX Runtime encodes it",
                      len(w), self.profile.min, self.profile.max)
            return fb.window_means(w)
        graph = self._open(self._encoder)
        with self._enc_lock:
            out = graph.run({"waveform": w[None]})
        return out["state_means"].astype(np.float64), int(np.asarray(out["n_frames"]).reshape(-1)[0])

    def adapt(self, state_means: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(injection (n_inject, n_embd), music_query (n_embd,))`` float32 for frame-weighted means."""
        graph = self._open(self._adapter)
        with self._ad_lock:
            out = graph.run({"state_means": np.asarray(state_means, np.float32)})
        return (np.ascontiguousarray(out["injection"], np.float32),
                np.ascontiguousarray(out["music_query"], np.float32))

    @staticmethod
    def _open(graph: TrtGraph | None) -> TrtGraph:
        if graph is None:
            raise ClosedError("this TensorRTMusicEncoder is closed")
        return graph

    def close(self) -> None:
        """Free the engines, contexts, device buffers and streams, and the fallback's sessions (idempotent)."""
        with self._enc_lock:
            enc, self._encoder = self._encoder, None
            if enc is not None:
                enc.close()
        with self._ad_lock:
            ad, self._adapter = self._adapter, None
            if ad is not None:
                ad.close()
        with self._fb_lock:
            fb, self._fallback = self._fallback, None
            if fb is not None:
                fb.close()
