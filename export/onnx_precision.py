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

How far each variant is from its source: :mod:`export.onnx_compare`.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from export.graphs import GRAPHS
from export.onnx_export import META_PRECISION, read_metadata, save_onnx
from mullama_sdk.cpu import INT8_SCHEME, LEGACY_INT8_SCHEME
from mullama_sdk.errors import ExportError

#: ONNX metadata key naming the int8 scheme of a quantized graph (absent in graphs made before it).
META_INT8_SCHEME = "mullama.int8_scheme"

__all__ = [
    "FP16_OP_BLOCK_LIST",
    "INT8_OP_TYPES",
    "convert_fp16",
    "int8_weight_limit",
    "quantize_int8",
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
