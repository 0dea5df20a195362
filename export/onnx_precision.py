"""Lower-precision variants of the exported graphs, and how far every variant is from its source.

* float16 (:func:`convert_fp16`): for GPUs (CUDA / TensorRT execution providers). Inputs and outputs
  stay float32, so the runtime feeds the same arrays to every variant. ONNX Runtime's own converter
  (``onnxruntime.transformers.float16``) is used: it ships with onnxruntime, no extra package.
* int8 (:func:`quantize_int8`): for CPUs. ONNX Runtime's dynamic quantization of the MatMuls whose
  weight is a constant (every Linear; not attention's Q.K / P.V products, not the convolutions):
  int8 weights, symmetric, one scale per output channel, limited to [-64, 64]; uint8 activations
  quantized per call (scheme :data:`mullama_sdk.cpu.INT8_SCHEME`). The 7-bit weights are what makes the
  file right on every x86 CPU: AVX2-only kernels sum u8 x s8 pairs into a saturating int16, which full
  8-bit weights overflow (adapter cosine 0.907 in issue #14's report) and [-64, 64] cannot (255 * 64 * 2 = 32640);
  with VNNI the sums are exact anyway, so both kernels compute the same numbers (``docs/int8.md`` has the
  measurements behind this choice against per-tensor and uint8 x uint8 weights).
  Per-channel matters for the folded injection matrix, whose output rows (one per ``d_l`` element,
  across 20 layers) differ in scale. Convolutions stay float32: ONNX Runtime's ConvInteger has no fast
  CPU kernel, and the convolutions are only ~10 % of MERT's time (torch profile, 5 s window).

Comparisons run ONNX Runtime on the CPU execution provider against the torch reference
(:func:`compare_encoder`, :func:`compare_adapter`) or against another ONNX file (:func:`compare_onnx`)
and return an :class:`ErrorReport`. Definitions, per output and per case (one waveform / one
state-means input), with ``x`` the candidate and ``y`` the reference, both in float64:

* ``max_abs`` = ``max |x - y|``, maximised over cases;
* ``max_rel`` = ``max |x - y| / max |y|`` (relative to the output's largest magnitude, so that
  near-zero elements do not blow it up), maximised over cases;
* cosine of each row along the last axis (each state mean, each ``d_l``, the music query), its mean
  and minimum over all rows of all cases; none for scalar outputs (``n_frames``, which must match exactly).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from export.graphs import GRAPHS, ExportError
from export.onnx_export import META_PRECISION, read_metadata, save_onnx
from mullama_sdk.cpu import INT8_SCHEME, LEGACY_INT8_SCHEME

#: ONNX metadata key naming the int8 scheme of a quantized graph (absent in graphs made before it).
META_INT8_SCHEME = "mullama.int8_scheme"

__all__ = [
    "FP16_OP_BLOCK_LIST",
    "INT8_OP_TYPES",
    "ErrorReport",
    "OutputError",
    "adapter_reference",
    "compare_adapter",
    "compare_encoder",
    "compare_onnx",
    "convert_fp16",
    "encoder_reference",
    "int8_weight_limit",
    "quantize_int8",
    "run_graph",
]

#: Op types quantized by :func:`quantize_int8` (constant-weight MatMuls only).
INT8_OP_TYPES: tuple[str, ...] = ("MatMul",)


def _default_fp16_block_list() -> list[str]:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST

    return list(DEFAULT_OP_BLOCK_LIST)


#: Op types kept in float32 by :func:`convert_fp16`, on top of ONNX Runtime's default list (ops with no
#: float16 kernels): the statistics. ``ReduceMean`` is MERT's time-mean over up to 2250 frames and the
#: adapter's RMS; ``Pow`` squares before it (in float16 one element above 256 would overflow the sum,
#: in float32 only an RMS above 256 does); ``ReduceL2`` is the norm of the layer mix. The reference
#: computes its norms in float32 too. LayerNormalization computes its statistics in float32 anyway.
FP16_OP_BLOCK_LIST: tuple[str, ...] = ("Pow", "ReduceMean", "ReduceL2")


# ------------------------------------------------------------------------------------------ variants
def convert_fp16(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    op_block_list: Sequence[str] = FP16_OP_BLOCK_LIST,
    external_data: bool | None = None,
) -> Path:
    """Write a float16 copy of an exported graph, keeping float32 inputs and outputs.

    Args:
        src: A float32 graph written by :mod:`export.onnx_export`.
        dst: Target ``.onnx`` file.
        op_block_list: Extra op types to keep in float32 (added to ONNX Runtime's default list).
        external_data: Force/forbid external data; default by size.

    Returns:
        ``dst``.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    block = _default_fp16_block_list() + list(op_block_list or ())
    # By path: shape inference then runs on the file and works beyond protobuf's 2 GB.
    # An absolute path: the converter stages its shape-inferred copy in the model's own folder.
    model = convert_float_to_float16(str(Path(src).resolve()), keep_io_types=True, op_block_list=block)
    # Two repairs of the converter's output that ONNX Runtime tolerates and onnx.checker (rightly) does
    # not: a constant shared by several float32-kept nodes gets one identical Cast per consumer (same
    # output name), and the casts of the graph inputs are appended after their consumers.
    _drop_duplicate_nodes(model.graph)
    OnnxModel(model).topological_sort()
    return _save_variant(model, src, dst, "fp16", external_data)


def quantize_int8(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    per_channel: bool = True,
    op_types: Sequence[str] = INT8_OP_TYPES,
    reduce_range: bool = True,
    external_data: bool | None = None,
) -> Path:
    """Write an int8 dynamically quantized copy of an exported graph (ONNX Runtime ``quantize_dynamic``).

    Args:
        src: A float32 graph written by :mod:`export.onnx_export`.
        dst: Target ``.onnx`` file.
        per_channel: One weight scale per output channel (default) instead of one per tensor.
        op_types: Op types to quantize; MatMul only by default (see the module docstring).
        reduce_range: Weights within [-64, 64] (default), which no CPU's int8 kernel can saturate. ``False``
            gives full-range weights (the legacy scheme, wrong on AVX2-only CPUs): for comparisons only.
        external_data: Force/forbid external data; default by size.

    Returns:
        ``dst``.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{dst.name}.q.", dir=dst.parent) as tmp:
        staged = Path(tmp) / dst.name
        # The quantizer logs a generic "consider pre-processing" advice on the ROOT logger at WARNING
        # (shape inference is what it means; our graphs come out of the exporter fully shaped).
        root = logging.getLogger()
        advice = _DropMessage("pre-processing before quantization")
        root.addFilter(advice)
        try:
            quantize_dynamic(
                str(src),
                str(staged),
                op_types_to_quantize=list(op_types),
                per_channel=per_channel,
                reduce_range=reduce_range,
                weight_type=QuantType.QInt8,
                use_external_data_format=True,  # whatever the size; save_onnx decides for the final file
            )
        finally:
            root.removeFilter(advice)
        model = onnx.load(str(staged))
    scheme = INT8_SCHEME if reduce_range else LEGACY_INT8_SCHEME
    model.metadata_props.add(key=META_INT8_SCHEME, value=scheme)
    return _save_variant(model, src, dst, "int8", external_data)


def int8_weight_limit(path: str | os.PathLike[str]) -> int:
    """The largest ``|w|`` of the integer weights of a quantized graph's ``MatMulInteger`` nodes.

    This is the property that decides whether a CPU kernel can saturate (see :mod:`mullama_sdk.cpu`):
    graphs of :data:`~mullama_sdk.cpu.INT8_SCHEME` stay within :data:`~mullama_sdk.cpu.INT8_WEIGHT_LIMIT`.
    Read from the file itself (external data included), whatever CPU runs this.

    Raises:
        ExportError: the graph has no ``MatMulInteger`` with a constant int8 weight.
    """
    from onnx import numpy_helper

    model = onnx.load(str(path))  # loads external data from beside the file
    inits = {t.name: t for t in model.graph.initializer}
    largest = None
    for node in model.graph.node:
        if node.op_type != "MatMulInteger" or node.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        if w.dtype != np.int8:
            raise ExportError(f"{Path(path).name}: MatMulInteger weight {node.input[1]} is {w.dtype}, not int8")
        top = int(np.abs(w.astype(np.int16)).max()) if w.size else 0
        largest = top if largest is None else max(largest, top)
    if largest is None:
        raise ExportError(f"{Path(path).name} has no MatMulInteger with a constant int8 weight")
    return largest


class _DropMessage(logging.Filter):
    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


def _drop_duplicate_nodes(graph: onnx.GraphProto) -> None:
    """Remove nodes identical to an earlier one; refuse two *different* producers of one value."""
    seen: dict[str, bytes] = {}
    keep = []
    for node in graph.node:
        key = node.SerializeToString(deterministic=True)
        clash = [o for o in node.output if o in seen]
        if clash:
            if all(seen[o] == key for o in clash):
                continue
            raise ExportError(f"float16 conversion produced two different nodes writing {clash}")
        seen.update(dict.fromkeys(node.output, key))
        keep.append(node)
    if len(keep) != len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)


def _save_variant(model: onnx.ModelProto, src: Any, dst: Any, precision: str, external_data: bool | None) -> Path:
    graph, dims = read_metadata(src)
    props = {p.key: p for p in model.metadata_props}
    if META_PRECISION in props:
        props[META_PRECISION].value = precision
    else:
        model.metadata_props.add(key=META_PRECISION, value=precision)
    spec = GRAPHS.get(graph) if graph else None
    return save_onnx(model, dst, spec=spec, dims=dims if spec else None, external_data=external_data)


# ---------------------------------------------------------------------------------------- comparison
@dataclasses.dataclass(frozen=True)
class OutputError:
    """Error of one output over all compared cases (definitions in the module docstring).

    Attributes:
        name: Output name.
        max_abs: Largest absolute difference.
        max_rel: Largest ``max|x - y| / max|y|`` of any case.
        mean_cosine: Mean row cosine; ``None`` for scalar outputs.
        min_cosine: Smallest row cosine; ``None`` for scalar outputs.
        exact: Integer output: must match exactly to pass.
    """

    name: str
    max_abs: float
    max_rel: float
    mean_cosine: float | None
    min_cosine: float | None
    exact: bool = False

    def passed(self, tol: float, min_cosine: float | None = None) -> bool:
        if self.exact:
            return self.max_abs == 0.0
        if not self.max_rel <= tol:  # NaN fails
            return False
        if min_cosine is not None and self.min_cosine is not None:
            return self.min_cosine >= min_cosine
        return True


@dataclasses.dataclass(frozen=True)
class ErrorReport:
    """How far an ONNX graph is from its reference, per output.

    Attributes:
        graph: Graph name (``encoder`` / ``adapter``).
        candidate: File name of the compared ONNX graph.
        reference: ``"torch"`` or the file name of the reference ONNX graph.
        n_cases: Number of inputs compared.
        outputs: One entry per output, in the graph's order.
    """

    graph: str
    candidate: str
    reference: str
    n_cases: int
    outputs: tuple[OutputError, ...]

    def __getitem__(self, name: str) -> OutputError:
        for o in self.outputs:
            if o.name == name:
                return o
        raise KeyError(f"no output {name!r} in the {self.graph} report; outputs: {[o.name for o in self.outputs]}")

    def passed(self, tol: float | None = None, *, min_cosine: float | None = None) -> bool:
        """Whether every float output is within ``tol`` relative error (and ``min_cosine`` if given).

        Integer outputs must match exactly. ``tol`` defaults to the graph spec's float32 tolerance.
        """
        if tol is None:
            if self.graph not in GRAPHS:
                raise ValueError(f"no spec tolerance for graph {self.graph!r}; pass tol explicitly")
            tol = GRAPHS[self.graph].tolerance
        return all(o.passed(tol, min_cosine) for o in self.outputs)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for the bundle manifest (floats rounded to 4 significant digits)."""
        def r(v: float | None) -> float | None:
            return None if v is None else float(f"{v:.4g}")

        return {
            "graph": self.graph,
            "candidate": self.candidate,
            "reference": self.reference,
            "n_cases": self.n_cases,
            "outputs": {
                o.name: {"max_abs": r(o.max_abs), "max_rel": r(o.max_rel), "mean_cosine": r(o.mean_cosine),
                         "min_cosine": r(o.min_cosine)}
                for o in self.outputs
            },
        }

    def summary(self) -> str:
        """One line per output, for logs and test messages."""
        lines = [f"{self.graph}: {self.candidate} vs {self.reference} ({self.n_cases} cases)"]
        for o in self.outputs:
            cos = "" if o.min_cosine is None else f" cos mean {o.mean_cosine:.6f} min {o.min_cosine:.6f}"
            lines.append(f"  {o.name}: max_abs {o.max_abs:.3g} max_rel {o.max_rel:.3g}{cos}")
        return "\n".join(lines)


def encoder_reference(model: Any, waveforms: Iterable[np.ndarray]) -> list[dict[str, np.ndarray]]:
    """The torch reference's encoder outputs (``state_means``, ``n_frames``) for each waveform: what
    :func:`compare_encoder` holds an encoder graph to. Computed once, it outlives the torch model.

    Args:
        model: :class:`~training.reference.model.MullamaModel` or :class:`~training.reference.mert.MertEncoder`.
        waveforms: Mono float32 24 kHz windows, ``(n,)`` or ``(1, n)``, each 400 samples .. 30 s.
    """
    import torch

    mert = getattr(model, "mert", model)
    refs = []
    for w in waveforms:
        with torch.no_grad():
            means, n_frames = mert(torch.from_numpy(_waveform_feed(w)))
        refs.append({"state_means": means[0].numpy(), "n_frames": np.asarray(n_frames, dtype=np.int64)})
    return refs


def adapter_reference(model: Any, state_means_list: Iterable[np.ndarray]) -> list[dict[str, np.ndarray]]:
    """The torch reference's adapter outputs for each state-means input: ``a = model.music_query(h)`` and
    ``model.injection_vectors(a)`` (unfolded).

    Args:
        model: :class:`~training.reference.model.MullamaModel`.
        state_means_list: ``(n_states, mert_dim)`` float32 arrays (frame-weighted over windows).
    """
    import torch

    refs = []
    for h in state_means_list:
        with torch.no_grad():
            a = model.music_query(torch.from_numpy(_means_feed(h)))
            d = model.injection_vectors(a)
        refs.append({"injection": d.float().numpy(), "music_query": a[0].float().numpy()})
    return refs


def _waveform_feed(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(w, dtype=np.float32).reshape(1, -1))


def _means_feed(h: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(h, dtype=np.float32))


def compare_encoder(
    model: Any, onnx_path: str | os.PathLike[str], waveforms: Iterable[np.ndarray], *, threads: int | None = None,
    reference: Sequence[dict[str, np.ndarray]] | None = None,
) -> ErrorReport:
    """Run the encoder graph on ONNX Runtime (CPU) and the torch reference on each waveform.

    Args:
        model: :class:`~training.reference.model.MullamaModel` or :class:`~training.reference.mert.MertEncoder`; may be None
            when ``reference`` is given.
        onnx_path: An encoder graph (any precision).
        waveforms: Mono float32 24 kHz windows, ``(n,)`` or ``(1, n)``, each 400 samples .. 30 s.
        threads: ONNX Runtime intra-op threads (default: its own choice).
        reference: :func:`encoder_reference` of these waveforms, computed earlier.
    """
    waveforms = list(waveforms)
    refs = list(reference) if reference is not None else encoder_reference(model, waveforms)
    sess = _session(onnx_path, threads)
    outs = [_run(sess, {"waveform": _waveform_feed(w)}) for w in waveforms]
    return _report("encoder", Path(onnx_path).name, "torch", refs, outs)


def compare_adapter(
    model: Any, onnx_path: str | os.PathLike[str], state_means_list: Iterable[np.ndarray], *,
    threads: int | None = None, reference: Sequence[dict[str, np.ndarray]] | None = None,
) -> ErrorReport:
    """Run the adapter graph on ONNX Runtime (CPU) and the torch reference on each state-means input.

    The reference is ``a = model.music_query(h)`` and ``model.injection_vectors(a)`` (unfolded).

    Args:
        model: :class:`~training.reference.model.MullamaModel`; may be None when ``reference`` is given.
        onnx_path: An adapter graph (any precision).
        state_means_list: ``(n_states, mert_dim)`` float32 arrays (frame-weighted over windows).
        threads: ONNX Runtime intra-op threads.
        reference: :func:`adapter_reference` of these inputs, computed earlier.
    """
    state_means_list = list(state_means_list)
    refs = list(reference) if reference is not None else adapter_reference(model, state_means_list)
    sess = _session(onnx_path, threads)
    outs = [_run(sess, {"state_means": _means_feed(h)}) for h in state_means_list]
    return _report("adapter", Path(onnx_path).name, "torch", refs, outs)


def compare_onnx(
    reference_path: str | os.PathLike[str],
    onnx_path: str | os.PathLike[str],
    feeds: Iterable[Mapping[str, np.ndarray]],
    *,
    threads: int | None = None,
    reference: Sequence[dict[str, np.ndarray]] | None = None,
) -> ErrorReport:
    """Compare two ONNX graphs with the same interface (e.g. int8 against float32) on the same feeds.

    ``reference``: :func:`run_graph` of ``reference_path`` on these feeds, computed earlier (its outputs are
    then not computed again).
    """
    feeds = list(feeds)
    refs = list(reference) if reference is not None else run_graph(reference_path, feeds, threads=threads)
    outs = run_graph(onnx_path, feeds, threads=threads)
    graph, _ = read_metadata(onnx_path)
    return _report(graph or Path(onnx_path).stem, Path(onnx_path).name, Path(reference_path).name, refs, outs)


def run_graph(path: str | os.PathLike[str], feeds: Iterable[Mapping[str, np.ndarray]], *,
              threads: int | None = None) -> list[dict[str, np.ndarray]]:
    """Every output of an ONNX graph for each feed, on ONNX Runtime's CPU provider with the runtime's settings."""
    sess = _session(path, threads)
    return [_run(sess, {k: np.ascontiguousarray(v) for k, v in feed.items()}) for feed in feeds]


# ------------------------------------------------------------------------------------------ helpers
def _session(path: str | os.PathLike[str], threads: int | None):
    import onnxruntime as ort

    from mullama_sdk.encoder_ort import session_options

    return ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])


def _run(sess, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, dict(feed))))


def _cosines(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    x2, y2 = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    nx, ny = np.linalg.norm(x2, axis=1), np.linalg.norm(y2, axis=1)
    dot = (x2 * y2).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = dot / (nx * ny)
    # Two zero rows agree perfectly; one zero row against a non-zero one does not at all.
    return np.where((nx == 0) & (ny == 0), 1.0, np.where((nx == 0) | (ny == 0), 0.0, cos))


def _report(graph: str, candidate: str, reference: str, refs: list[dict], outs: list[dict]) -> ErrorReport:
    if not refs:
        raise ValueError("nothing to compare: no inputs were given")
    names = list(refs[0])
    results = []
    for name in names:
        max_abs, max_rel, cos, exact = 0.0, 0.0, [], False
        for ref, out in zip(refs, outs):
            if name not in out:
                raise ExportError(f"{candidate} has no output {name!r} (outputs: {sorted(out)})")
            y, x = np.asarray(ref[name]), np.asarray(out[name])
            if x.shape != y.shape:
                raise ExportError(f"{candidate}: output {name!r} has shape {x.shape}, reference {y.shape}")
            exact = exact or np.issubdtype(y.dtype, np.integer)
            y, x = y.astype(np.float64), x.astype(np.float64)
            diff = float(np.abs(x - y).max()) if y.size else 0.0
            scale = float(np.abs(y).max()) if y.size else 0.0
            rel = diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)
            if not (np.isfinite(x).all()):
                diff = rel = math.inf
            max_abs, max_rel = max(max_abs, diff), max(max_rel, rel)
            if y.ndim >= 1 and not exact:
                cos.append(_cosines(x, y))
        c = np.concatenate(cos) if cos else None
        results.append(OutputError(
            name=name, max_abs=max_abs, max_rel=max_rel,
            mean_cosine=None if c is None else float(c.mean()),
            min_cosine=None if c is None else float(np.min(c)),
            exact=exact,
        ))
    return ErrorReport(graph=graph, candidate=candidate, reference=reference, n_cases=len(refs),
                       outputs=tuple(results))
