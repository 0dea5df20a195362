"""What is exported to ONNX: one declarative spec per graph, and the torch modules that are traced.

Two graphs carry the audio side of MU-LLaMA (docs/model.md section 1) to ONNX Runtime / TensorRT:

* ``encoder`` - one window of 24 kHz audio through MERT (the reference :class:`~training.reference.mert.MertEncoder`,
  i.e. transformers' ``HubertModel``), reduced to the per-state time-means and the frame count. The
  runtime frame-weights the means of several windows itself.
* ``adapter`` - those state means through the music adapter to the music query ``a``, plus the
  per-layer injection vectors ``d_l = M_l a + c_l``. ``M_l = Wo'_l diag(tanh g_l) Wv_l`` and
  ``c_l = M_l p_l`` are folded offline (float64, stored float32), so one matrix product gives every
  ``d_l`` the LLM runner adds after attention.

A :class:`GraphSpec` is the contract between exporter, verifier and runtime: names, dtypes, shapes
(with named, possibly dynamic dimensions), opset and the float32 tolerance.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mullama_sdk.constants import MAX_WINDOW_SECONDS, MIN_WINDOW_SAMPLES, SAMPLE_RATE_HZ
from mullama_sdk.errors import ConfigError
from mullama_sdk.manifest import INJECTION, MUSIC_QUERY, N_FRAMES, STATE_MEANS, WAVEFORM

__all__ = [
    "ADAPTER_GRAPH",
    "ENCODER_GRAPH",
    "GRAPHS",
    "AdapterGraph",
    "DimRange",
    "EncoderGraph",
    "FoldedInjection",
    "GraphSpec",
    "TensorSpec",
    "adapter_dims",
    "encoder_dims",
    "fold_injection",
]

#: ONNX opset of every exported graph: the native opset of torch's dynamo exporter (no version
#: conversion pass) and >= 17 for LayerNormalization; ONNX Runtime and TensorRT 10 both run it.
OPSET = 18


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One graph input or output.

    Attributes:
        name: ONNX value name.
        dtype: numpy dtype name (``"float32"``, ``"int64"``).
        shape: One entry per axis: an int, or a dimension name resolved from the model's dims
            (see :meth:`GraphSpec.resolve`). ``()`` is a scalar.
    """

    name: str
    dtype: str
    shape: tuple[int | str, ...]


@dataclasses.dataclass(frozen=True)
class DimRange:
    """Sizes a dynamic dimension must support: TensorRT's min / opt / max profile, in elements."""

    min: int
    opt: int
    max: int


@dataclasses.dataclass(frozen=True)
class GraphSpec:
    """Declarative description of one exported graph.

    Attributes:
        name: Graph name; also the default file stem (``encoder.onnx``).
        inputs: Graph inputs, in order.
        outputs: Graph outputs, in order.
        dynamic: Dynamic dimensions by name and the sizes they must support. Every other named
            dimension is fixed per model (e.g. ``n_states``) and is concrete in the ONNX file.
        opset: ONNX opset (default domain).
        tolerance: Largest allowed relative error ``max|onnx - torch| / max|torch|`` of every float
            output of the float32 graph.
    """

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dynamic: Mapping[str, DimRange]
    opset: int = OPSET
    tolerance: float = 1e-4

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """``{value name: {axis: dim name}}`` of every dynamic axis, inputs and outputs (torch.onnx's form)."""
        axes: dict[str, dict[int, str]] = {}
        for t in (*self.inputs, *self.outputs):
            named = {i: d for i, d in enumerate(t.shape) if isinstance(d, str) and d in self.dynamic}
            if named:
                axes[t.name] = named
        return axes

    def resolve(self, dims: Mapping[str, int]) -> dict[str, tuple[int | str, ...]]:
        """Shapes of every input and output with the fixed named dims replaced by ``dims``.

        Dynamic dims stay names (that is how they appear in the ONNX file).

        Raises:
            ConfigError: a fixed dimension name missing from ``dims``.
        """
        out = {}
        for t in (*self.inputs, *self.outputs):
            shape = []
            for d in t.shape:
                if isinstance(d, str) and d not in self.dynamic:
                    if d not in dims:
                        raise ConfigError(f"graph {self.name!r}: no size given for dimension {d!r} of {t.name}")
                    d = int(dims[d])
                shape.append(d)
            out[t.name] = tuple(shape)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for the bundle manifest."""
        return {
            "name": self.name,
            "opset": self.opset,
            "tolerance": self.tolerance,
            "inputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in self.inputs],
            "outputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in self.outputs],
            "dynamic": {k: dataclasses.asdict(v) for k, v in self.dynamic.items()},
        }


_SECOND = SAMPLE_RATE_HZ

ENCODER_GRAPH = GraphSpec(
    name="encoder",
    # The names are the runtime's (mullama_sdk.manifest), declared once; the specs add dtypes and shapes.
    inputs=(TensorSpec(WAVEFORM, "float32", (1, "n_samples")),),
    outputs=(
        TensorSpec(STATE_MEANS, "float32", ("n_states", "mert_dim")),
        TensorSpec(N_FRAMES, "int64", ()),
    ),
    # The runtime's windows (mullama_sdk.audio.window_bounds) are 400 samples (one MERT frame) .. 30 s
    # long; after the first, long audio is mostly full 30 s windows, hence opt = max.
    dynamic={
        "n_samples": DimRange(
            min=MIN_WINDOW_SAMPLES,
            opt=round(MAX_WINDOW_SECONDS * _SECOND),
            max=round(MAX_WINDOW_SECONDS * _SECOND),
        )
    },
)

ADAPTER_GRAPH = GraphSpec(
    name="adapter",
    inputs=(TensorSpec(STATE_MEANS, "float32", ("n_states", "mert_dim")),),
    outputs=(
        TensorSpec(INJECTION, "float32", ("n_inject", "n_embd")),
        TensorSpec(MUSIC_QUERY, "float32", ("n_embd",)),
    ),
    dynamic={},
)

GRAPHS: dict[str, GraphSpec] = {g.name: g for g in (ENCODER_GRAPH, ADAPTER_GRAPH)}


def encoder_dims(mert: Any) -> dict[str, int]:
    """Fixed dims of the encoder graph for a ``MullamaModel`` or a bare ``MertEncoder``."""
    mert = getattr(mert, "mert", mert)
    return {"n_states": mert.n_states, "mert_dim": mert.dim}


def adapter_dims(model: Any) -> dict[str, int]:
    """Fixed dims of the adapter graph for a ``MullamaModel``."""
    a = model.config.adapter
    return {"n_states": a.n_states, "mert_dim": a.mert_dim, "n_embd": model.config.llama.dim,
            "n_inject": model.config.injection.n_layers}


# ------------------------------------------------------------------------------------------- encoder
class EncoderGraph(nn.Module):
    """``waveform (1, n_samples)`` -> ``state_means (n_states, mert_dim)``, ``n_frames`` (int64 scalar).

    A thin wrapper: the math is the reference :class:`~training.reference.mert.MertEncoder` (HubertModel).
    """

    def __init__(self, mert: nn.Module) -> None:
        super().__init__()
        self.mert = mert

    def forward(self, waveform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        means, n_frames = self.mert(waveform)
        # n_frames is a symbolic int while exporting; as a tensor it becomes Shape -> Gather in ONNX.
        return means[0], torch.scalar_tensor(n_frames, dtype=torch.int64)


# ------------------------------------------------------------------------------------------- adapter
@dataclasses.dataclass(frozen=True)
class FoldedInjection:
    """The constant part of the injection, folded for ``d = a @ weight + bias`` (all layers at once).

    Attributes:
        layers: LLaMA layer index of each injected layer, in order.
        weight: ``(n_embd, n_inject * n_embd)`` float32; columns ``i*n_embd:(i+1)*n_embd`` are ``M_l^T``
            of the i-th injected layer (the ``x @ W`` layout of an ONNX MatMul, whose per-channel int8
            quantization then scales every output element on its own).
        bias: ``(n_inject * n_embd,)`` float32; ``c_l = M_l p_l`` of every injected layer, concatenated.
    """

    layers: tuple[int, ...]
    weight: torch.Tensor
    bias: torch.Tensor

    @property
    def n_embd(self) -> int:
        return self.weight.shape[0]

    @property
    def n_inject(self) -> int:
        return len(self.layers)

    def matrix(self, i: int) -> torch.Tensor:
        """``M_l`` of the i-th injected layer, ``(n_embd, n_embd)``."""
        d = self.n_embd
        return self.weight[:, i * d : (i + 1) * d].T

    def offset(self, i: int) -> torch.Tensor:
        """``c_l`` of the i-th injected layer, ``(n_embd,)``."""
        d = self.n_embd
        return self.bias[i * d : (i + 1) * d]


def _check_query_len(model: Any) -> None:
    q = model.config.injection.query_len
    if q != 1:
        raise ConfigError(
            f"the adapter graph folds the injection into constant vectors, which needs query_len == 1; "
            f"this model has query_len {q}: with several adapter tokens each text position attends over "
            f"them with its own softmax, so the injection depends on the token and cannot be folded"
        )


@torch.no_grad()
def fold_injection(model: Any) -> FoldedInjection:
    """Fold ``M_l = Wo'_l diag(tanh g_l expanded per head) Wv_l`` and ``c_l = M_l p_l`` in float64.

    ``Wo'`` is ``wo`` with its LoRA merged (no bias); ``Wv`` is the base value weight (no LoRA, no
    bias), its kv heads repeated for grouped-query attention as the reference does.

    Args:
        model: A :class:`~training.reference.model.MullamaModel`.

    Raises:
        ConfigError: query_len != 1.
    """
    _check_query_len(model)
    p = model.config.llama
    layers = tuple(model.inject_layers)
    d, hd, n_heads, kv = p.dim, p.head_dim, p.n_heads, p.kv_heads
    prefix = model.prefix_query.weight.detach().double()  # (n_inject * query_len, dim), query_len == 1
    weight = torch.empty(d, len(layers) * d, dtype=torch.float32)
    bias = torch.empty(len(layers) * d, dtype=torch.float32)
    for i, l in enumerate(layers):
        attn = model.llama.layers[l].attention
        wv = attn.wv.weight.detach().double()  # (kv * hd, dim)
        if n_heads != kv:
            wv = wv.view(kv, 1, hd, d).expand(kv, n_heads // kv, hd, d).reshape(n_heads * hd, d)
        gate = torch.tanh(attn.gate.detach().double().reshape(n_heads)).repeat_interleave(hd)
        wo = attn.wo.weight.detach().double()
        if model.config.deltas.lora_rank:
            wo = wo + attn.lora_wo_l2.weight.detach().double() @ attn.lora_wo_l1.weight.detach().double()
        m = wo @ (gate[:, None] * wv)
        weight[:, i * d : (i + 1) * d] = m.T.float()
        bias[i * d : (i + 1) * d] = (m @ prefix[i]).float()
        del wv, wo, m
    return FoldedInjection(layers=layers, weight=weight, bias=bias)


class AdapterGraph(nn.Module):
    """``state_means (n_states, mert_dim)`` -> ``injection (n_inject, n_embd)``, ``music_query (n_embd,)``.

    Runs the reference :class:`~training.reference.adapter.MusicAdapter`'s own submodules, then ``a @ W + b``
    with the folded injection.
    """

    def __init__(self, adapter: nn.Module, folded: FoldedInjection) -> None:
        super().__init__()
        self.adapter = adapter
        self.n_inject, self.n_embd = folded.n_inject, folded.n_embd
        self.register_buffer("injection_weight", folded.weight)
        self.register_buffer("injection_bias", folded.bias)

    @classmethod
    def from_model(cls, model: Any) -> AdapterGraph:
        """Build from a :class:`~training.reference.model.MullamaModel` (folds the injection).

        Raises:
            ConfigError: query_len != 1.
        """
        return cls(model.adapter, fold_injection(model))

    def forward(self, state_means: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ad = self.adapter
        # MusicAdapter.forward's steps, on a (1, 1, width) row rather than (1, width): torch exports a
        # 2-D Linear as Gemm, which ONNX Runtime's dynamic int8 quantizer skips; a 3-D one is MatMul.
        z = ad.proj(ad.unit_vector(state_means[None])[:, None, :])
        for block in ad.blocks:
            z = block(z)
        injection = torch.matmul(z, self.injection_weight) + self.injection_bias
        return injection.reshape(self.n_inject, self.n_embd), z.reshape(self.n_embd)
