"""Export the encoder and adapter graphs (float32) from the torch reference to ONNX.

Exporter: torch's dynamo exporter (``torch.onnx.export(..., dynamo=True)``: ``torch.export`` then
onnxscript), at its native opset 18. It is torch 2.13's default and maintained path; the TorchScript
exporter is deprecated since torch 2.9 and prints a warning on every call. Both gave the same numbers on
these graphs; dynamo also states the dynamic waveform length as a checked range (400 samples, one MERT
frame, .. 30 s), so a shape specialisation inside HubertModel would fail the export instead of silently freezing a length.

Every file is written to a temporary folder next to the target, checked (``onnx.checker`` and the graph
spec: names, dtypes, shapes, opset), then renamed into place, so a crash never leaves half a model.
Weights go to ONNX external data (``<name>.onnx.data``) when they exceed 1.5 GB (the real adapter
is ~3.8 GB in float32; protobuf cannot hold more than 2 GB).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from export.graphs import (
    ADAPTER_GRAPH,
    ENCODER_GRAPH,
    AdapterGraph,
    EncoderGraph,
    GraphSpec,
    adapter_dims,
    encoder_dims,
)
from mullama_sdk.constants import SAMPLE_RATE_HZ
from mullama_sdk.errors import ExportError

__all__ = [
    "EXTERNAL_DATA_THRESHOLD_BYTES",
    "check_graph",
    "export_adapter",
    "export_encoder",
    "export_graph",
    "graph_metadata",
    "read_metadata",
    "save_onnx",
]

log = logging.getLogger(__name__)

#: Above this many bytes of weights a graph is saved with ONNX external data.
EXTERNAL_DATA_THRESHOLD_BYTES = 1_500_000_000

#: ``metadata_props`` keys written into every exported file.
META_GRAPH = "mullama.graph"
META_PRECISION = "mullama.precision"
META_DIMS = "mullama.dims"


def export_encoder(
    model: nn.Module,
    out_path: str | os.PathLike[str],
    *,
    example_seconds: float = 1.0,
    external_data: bool | None = None,
) -> Path:
    """Export MERT + time-mean as the ``encoder`` graph (float32, see :data:`~export.graphs.ENCODER_GRAPH`).

    Args:
        model: A :class:`~training.reference.model.MullamaModel` or a bare :class:`~training.reference.mert.MertEncoder`.
        out_path: Target ``.onnx`` file (overwritten).
        example_seconds: Length of the example waveform used for tracing (any length in the spec's range).
        external_data: Force (True) or forbid (False) external data; default: by size.

    Returns:
        ``out_path``.

    Raises:
        ExportError: the written graph does not match the spec.
    """
    mert = getattr(model, "mert", model)
    spec = ENCODER_GRAPH
    rng = spec.dynamic["n_samples"]
    n = round(example_seconds * SAMPLE_RATE_HZ)
    if not rng.min <= n <= rng.max:
        raise ValueError(f"example_seconds must be within {rng.min / SAMPLE_RATE_HZ:g}..{rng.max / SAMPLE_RATE_HZ:g} s "
                         f"({rng.min}..{rng.max} samples)")
    t = torch.arange(n, dtype=torch.float32) / SAMPLE_RATE_HZ
    example = (0.1 * torch.sin(2 * torch.pi * 440.0 * t))[None]
    return export_graph(EncoderGraph(mert), spec, (example,), out_path, encoder_dims(mert),
                        external_data=external_data)


def export_adapter(
    model: nn.Module,
    out_path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
) -> Path:
    """Export the music adapter + folded injection as the ``adapter`` graph (float32).

    See :data:`~export.graphs.ADAPTER_GRAPH` and :func:`~export.graphs.fold_injection`.

    Args:
        model: A :class:`~training.reference.model.MullamaModel` with ``query_len == 1``.
        out_path: Target ``.onnx`` file (overwritten).
        external_data: Force (True) or forbid (False) external data; default: by size.

    Returns:
        ``out_path``.

    Raises:
        ConfigError: ``query_len != 1`` (the injection cannot be folded into constant vectors).
        ExportError: the written graph does not match the spec.
    """
    graph = AdapterGraph.from_model(model)
    dims = adapter_dims(model)
    example = torch.randn(dims["n_states"], dims["mert_dim"], generator=torch.Generator().manual_seed(0))
    return export_graph(graph, ADAPTER_GRAPH, (example,), out_path, dims, external_data=external_data)


def export_graph(
    module: nn.Module,
    spec: GraphSpec,
    example_args: tuple[torch.Tensor, ...],
    out_path: str | os.PathLike[str],
    dims: Mapping[str, int],
    *,
    external_data: bool | None = None,
) -> Path:
    """Export ``module`` as ``spec`` with torch's dynamo exporter, check it and write it atomically.

    Args:
        module: Wrapper whose forward takes the spec's inputs and returns its outputs, in order.
        spec: The graph spec (names, dynamic dims and their ranges, opset).
        example_args: Example inputs for tracing.
        out_path: Target ``.onnx`` file.
        dims: Sizes of the spec's fixed named dims (checked against the written graph).
        external_data: Force/forbid external data; default: weights > :data:`EXTERNAL_DATA_THRESHOLD_BYTES`.
    """
    out_path = Path(out_path)
    dynamic_shapes = {
        t.name: {i: torch.export.Dim(d, min=spec.dynamic[d].min, max=spec.dynamic[d].max)
                 for i, d in enumerate(t.shape) if isinstance(d, str) and d in spec.dynamic} or None
        for t in spec.inputs
    }
    if external_data is None:
        external_data = _module_bytes(module) > EXTERNAL_DATA_THRESHOLD_BYTES
    # Per submodule: a freshly built wrapper is in training mode while the model it wraps is not.
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # torch's own exporter trips over a deprecation inside torch (pytree's LeafSpec); not ours to act on.
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec.*")
            program = torch.onnx.export(
                module,
                example_args,
                None,
                dynamo=True,
                input_names=spec.input_names,
                output_names=spec.output_names,
                dynamic_shapes=dynamic_shapes,
                opset_version=spec.opset,
                optimize=True,
                verbose=False,
            )
    finally:
        for m, training in modes:
            m.training = training
    if program is None:  # only when f is given; keeps type checkers honest
        raise ExportError(f"torch.onnx.export returned no program for graph {spec.name!r}")
    strip_debug_metadata(program.model)
    program.model.metadata_props.update(graph_metadata(spec, dims, "fp32"))
    with _staging(out_path) as staged:
        program.save(staged, external_data=external_data)
        _verify_file(staged, spec, dims)
    log.info("exported %s graph to %s", spec.name, out_path)
    return out_path


def strip_debug_metadata(model) -> None:
    """Drop the exporter's per-node and per-value debug records (``pkg.*`` metadata: Python stack traces
    with absolute source paths, FX node dumps, rewrite-rule names).

    They are for debugging the exporter, not for running the graph; they would ship this machine's file
    paths inside every bundle and make the same export differ byte for byte between two checkouts.
    """
    import onnx_ir as ir

    def strip(props) -> None:
        for key in [k for k in props if k.startswith("pkg.")]:
            del props[key]

    graphs = [model.graph, *model.functions.values()]
    for graph in graphs:
        for node in ir.traversal.RecursiveGraphIterator(graph):
            strip(node.metadata_props)
            for value in node.outputs:
                strip(value.metadata_props)
        for value in (*graph.inputs, *graph.initializers.values()):
            strip(value.metadata_props)


def graph_metadata(spec: GraphSpec, dims: Mapping[str, int], precision: str) -> dict[str, str]:
    """``metadata_props`` of an exported file: graph name, precision and the fixed dims."""
    return {META_GRAPH: spec.name, META_PRECISION: precision, META_DIMS: json.dumps(dict(dims), sort_keys=True)}


def save_onnx(
    model: onnx.ModelProto,
    out_path: str | os.PathLike[str],
    *,
    spec: GraphSpec | None = None,
    dims: Mapping[str, int] | None = None,
    external_data: bool | None = None,
) -> Path:
    """Save a ModelProto atomically (temp folder + rename), with the checker and optional spec check.

    When saved with external data, ``model``'s initializers are rewritten in place to point at the
    written ``.data`` file (that is how ``onnx.save_model`` works; it avoids a copy of the weights).

    Args:
        model: Model with its weights loaded (not pointing at external files).
        out_path: Target ``.onnx`` file.
        spec: When given (with ``dims``), the written file is checked against it.
        dims: Fixed dims of ``spec``.
        external_data: Force/forbid external data; default: weights > :data:`EXTERNAL_DATA_THRESHOLD_BYTES`.
    """
    out_path = Path(out_path)
    if external_data is None:
        external_data = _proto_bytes(model) > EXTERNAL_DATA_THRESHOLD_BYTES
    with _staging(out_path) as staged:
        onnx.save_model(
            model,
            str(staged),
            save_as_external_data=external_data,
            all_tensors_to_one_file=True,
            location=staged.name + ".data",
            size_threshold=1024,
        )
        _verify_file(staged, spec, dims)
    return out_path


def check_graph(path: str | os.PathLike[str], spec: GraphSpec, dims: Mapping[str, int]) -> None:
    """Read a written graph back and compare its interface with ``spec``.

    Checks input/output names and order, element types, every axis (fixed dims equal ``dims``; dynamic
    dims are symbolic and carry the spec's name) and the default-domain opset.

    Raises:
        ExportError: naming each mismatch.
    """
    m = onnx.load(str(path), load_external_data=False)
    problems = []
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset != spec.opset:
        problems.append(f"opset {opset}, spec says {spec.opset}")
    expected = spec.resolve(dims)
    init_names = {i.name for i in m.graph.initializer}
    got_inputs = [v for v in m.graph.input if v.name not in init_names]
    for kind, want, got in (("input", spec.inputs, got_inputs), ("output", spec.outputs, list(m.graph.output))):
        if [v.name for v in got] != [t.name for t in want]:
            problems.append(f"{kind}s {[v.name for v in got]}, spec says {[t.name for t in want]}")
            continue
        for t, v in zip(want, got):
            tt = v.type.tensor_type
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)).name
            if dtype != t.dtype:
                problems.append(f"{kind} {t.name}: dtype {dtype}, spec says {t.dtype}")
            shape = tuple(d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else "?")
                          for d in tt.shape.dim) if tt.HasField("shape") else None
            if shape != expected[t.name]:
                problems.append(f"{kind} {t.name}: shape {shape}, spec says {expected[t.name]}")
    if problems:
        raise ExportError(f"{path} does not match the {spec.name!r} graph spec: " + "; ".join(problems))


# ------------------------------------------------------------------------------------------ helpers
def _verify_file(path: Path, spec: GraphSpec | None, dims: Mapping[str, int] | None) -> None:
    # By path, so that models over 2 GB (external data) are checked too.
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:
        raise ExportError(f"onnx.checker rejects {path.name}: {e}") from e
    if spec is not None:
        check_graph(path, spec, dims or {})


@contextlib.contextmanager
def _staging(out_path: Path) -> Iterator[Path]:
    """Yield a path in a fresh folder next to ``out_path``; on success move everything written there.

    The external data file is named after the model file (``<name>.onnx.data``), so staging under the
    final file name keeps the model's reference to it valid after the move.
    """
    from export.safety import writing

    out_path.parent.mkdir(parents=True, exist_ok=True)
    with writing(out_path):
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", dir=out_path.parent))
    try:
        # A full disk shows as ENOSPC or, from protobuf, as a truncated file: both are recognised here,
        # before the staged files are removed (see export.safety.is_disk_full).
        with writing(out_path):
            staged = tmp / out_path.name
            yield staged
            written = sorted(p for p in tmp.iterdir() if p != staged)
            stale = out_path.with_name(out_path.name + ".data")
            if stale.exists() and not any(p.name == stale.name for p in written):
                stale.unlink()
            for p in written:  # data first: the model file appears last, complete
                os.replace(p, out_path.parent / p.name)
            os.replace(staged, out_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _module_bytes(module: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _proto_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            total += int(next((e.value for e in init.external_data if e.key == "length"), 0))
        elif init.raw_data:
            total += len(init.raw_data)
        else:
            n = int(np.prod(init.dims)) if init.dims else 1
            total += n * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
    return total


def read_metadata(path: str | os.PathLike[str]) -> tuple[str | None, dict[str, Any]]:
    """(graph name, fixed dims) stored in a file's metadata by this module."""
    m = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in m.metadata_props}
    return props.get(META_GRAPH), json.loads(props.get(META_DIMS, "{}"))
