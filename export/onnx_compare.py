"""How far an exported graph (any precision, or a TensorRT engine) is from its reference.

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
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from export.graphs import GRAPHS
from export.onnx_export import read_metadata
from mullama_sdk.errors import ExportError
from mullama_sdk.manifest import INJECTION, MUSIC_QUERY, N_FRAMES, STATE_MEANS, WAVEFORM

__all__ = [
    "ErrorReport",
    "OutputError",
    "adapter_reference",
    "compare_adapter",
    "compare_encoder",
    "compare_onnx",
    "cpu_session",
    "encoder_reference",
    "error_report",
    "run_graph",
    "run_session",
]


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
        refs.append({STATE_MEANS: means[0].numpy(), N_FRAMES: np.asarray(n_frames, dtype=np.int64)})
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
        refs.append({INJECTION: d.float().numpy(), MUSIC_QUERY: a[0].float().numpy()})
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
    sess = cpu_session(onnx_path, threads)
    outs = [run_session(sess, {WAVEFORM: _waveform_feed(w)}) for w in waveforms]
    return error_report("encoder", Path(onnx_path).name, "torch", refs, outs)


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
    sess = cpu_session(onnx_path, threads)
    outs = [run_session(sess, {STATE_MEANS: _means_feed(h)}) for h in state_means_list]
    return error_report("adapter", Path(onnx_path).name, "torch", refs, outs)


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
    return error_report(graph or Path(onnx_path).stem, Path(onnx_path).name, Path(reference_path).name, refs, outs)


def run_graph(path: str | os.PathLike[str], feeds: Iterable[Mapping[str, np.ndarray]], *,
              threads: int | None = None) -> list[dict[str, np.ndarray]]:
    """Every output of an ONNX graph for each feed, on ONNX Runtime's CPU provider with the runtime's settings."""
    sess = cpu_session(path, threads)
    return [run_session(sess, {k: np.ascontiguousarray(v) for k, v in feed.items()}) for feed in feeds]


def cpu_session(path: str | os.PathLike[str], threads: int | None):
    """An ONNX Runtime session on the CPU provider with the runtime's settings (the comparisons' reference)."""
    import onnxruntime as ort

    from mullama_sdk.encoder_ort import session_options

    return ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])


def run_session(sess, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every output of one run, by name."""
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


def error_report(graph: str, candidate: str, reference: str, refs: list[dict], outs: list[dict]) -> ErrorReport:
    """The :class:`ErrorReport` of ``outs`` against ``refs`` (one dict of outputs per case); TensorRT engines
    are judged with it too (:func:`export.verify.compare_trt`)."""
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
