"""Every conversion checked against its source, with stated tolerances: the ``verify`` command's engine.

Rows compare one stage with the one before it:
* ``encoder/<precision>`` and ``adapter/<precision>``: ONNX Runtime vs the torch reference;
* ``llm/<quant>``: llama.cpp logits of the MU-LLaMA prompt, with the music injected by our hook
  (vectors from the torch reference, so only llama.cpp is under test), vs the torch reference.

f32 rows run llama.cpp with exact arithmetic (no flash attention, F32 KV cache); quantized rows are
reported (max error, top-1 agreement) with a loose bound that only catches broken files.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mullama_sdk.audio import load_audio, window_bounds
from mullama_sdk.bundle import Manifest, safe_member
from mullama_sdk.constants import MIN_WINDOW_SECONDS, SAMPLE_RATE_HZ
from mullama_sdk.prompt import CAPTION_QUESTIONS

#: (max relative error, min cosine) per graph and precision; relative = max|x - y| / max|y|.
ONNX_TOLERANCES: dict[tuple[str, str], tuple[float | None, float | None]] = {
    ("encoder", "fp32"): (1e-4, None),
    ("adapter", "fp32"): (1e-4, None),
    ("encoder", "fp16"): (5e-2, 0.999),
    ("adapter", "fp16"): (5e-2, 0.999),
    ("encoder", "int8"): (None, 0.99),
    ("adapter", "int8"): (None, 0.99),
}
#: Max |Δ logits| per GGUF type. f32 is the exactness claim; the others only catch broken files.
LLM_TOLERANCES = {"f32": 1e-3, "f16": 5e-2, "q8_0": 1.0, "q4_k_m": 4.0}

#: Longest window used for checks (the graphs accept 30 s; 10 s keeps verify quick).
_CHECK_WINDOW_SECONDS = 10.0


@dataclasses.dataclass(frozen=True)
class Check:
    """One row of the verification table."""

    name: str
    max_abs: float
    max_rel: float
    min_cosine: float | None
    tolerance: str
    passed: bool
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def synthetic_clips(seed: int = 0) -> list[np.ndarray]:
    """Deterministic music-like test signals (harmonic tones, a beat, noise) of 0.5 s, 2 s and 6 s."""
    rng = np.random.default_rng(seed)
    clips = []
    for seconds, f0 in ((MIN_WINDOW_SECONDS, 220.0), (2.0, 330.0), (6.0, 196.0)):
        t = np.arange(int(seconds * SAMPLE_RATE_HZ)) / SAMPLE_RATE_HZ
        tone = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6))
        beat = np.exp(-30 * (t % 0.5)) * rng.standard_normal(len(t))
        clips.append((0.2 * tone + 0.1 * beat + 0.01 * rng.standard_normal(len(t))).astype(np.float32))
    return clips


def check_windows(audio_files: Sequence[Path] = ()) -> list[np.ndarray]:
    """Encoder inputs for the checks: the synthetic clips plus up to 10 s windows of the given files."""
    windows = synthetic_clips()
    for f in audio_files:
        wave = load_audio(f)
        for a, b in window_bounds(len(wave), max_window_samples=int(_CHECK_WINDOW_SECONDS * SAMPLE_RATE_HZ),
                                  min_window_samples=int(MIN_WINDOW_SECONDS * SAMPLE_RATE_HZ))[:3]:
            windows.append(wave[a:b])
    return windows


def _onnx_row(graph: str, precision: str, report) -> Check:
    max_rel_tol, min_cos = ONNX_TOLERANCES[(graph, precision)]
    # The row's verdict rests on the graph's main output (the means / the injection vectors).
    main = report["state_means" if graph == "encoder" else "injection"]
    rel = max(o.max_rel for o in report.outputs)
    cos = main.min_cosine
    ok = True
    parts = []
    if max_rel_tol is not None:
        ok &= rel <= max_rel_tol
        parts.append(f"rel <= {max_rel_tol:g}")
    if min_cos is not None:
        ok &= cos is not None and cos >= min_cos
        parts.append(f"cos >= {min_cos:g}")
    if graph == "encoder":
        frames = report["n_frames"]
        ok &= frames.max_abs == 0
        parts.append("frames equal")
    return Check(f"{graph}/{precision}", max(o.max_abs for o in report.outputs), rel, cos, ", ".join(parts),
                 bool(ok), f"{report.n_cases} inputs")


def onnx_checks(model, bundle_dir: Path, manifest: Manifest, windows: Sequence[np.ndarray],
                precisions: Iterable[str] | None = None, threads: int | None = None) -> list[Check]:
    """Each ONNX graph of the bundle (every precision present) against the torch reference."""
    import torch

    from export.onnx_precision import compare_adapter, compare_encoder

    precisions = list(precisions or manifest.encoder)
    with torch.no_grad():
        means = []
        for w in windows:
            m, _ = model.mert(torch.from_numpy(np.ascontiguousarray(w, np.float32))[None])
            means.append(m[0].numpy())
    rows = []
    for p in precisions:
        rows.append(_onnx_row("encoder", p, compare_encoder(
            model, safe_member(bundle_dir, manifest.encoder[p]), windows, threads=threads)))
        rows.append(_onnx_row("adapter", p, compare_adapter(
            model, safe_member(bundle_dir, manifest.adapter[p]), means, threads=threads)))
    return rows


def llm_checks(model, bundle_dir: Path, manifest: Manifest, windows: Sequence[np.ndarray],
               quants: Iterable[str] | None = None, threads: int | None = None) -> list[Check]:
    """Each GGUF of the bundle, hooked, against the torch reference's logits over whole prompts.

    Needs the full reference model (:func:`training.loading.build_model`).
    """
    import torch

    from mullama_sdk.llm import LlamaContext, LlamaModel
    from native_bridge import InjectionHook

    cases = []
    with torch.no_grad():
        for i, w in enumerate(windows[:2]):
            means, _ = model.state_means(w)
            a = model.music_query(means)
            prompt = model.tokenizer.encode_prompt(CAPTION_QUESTIONS[i % len(CAPTION_QUESTIONS)])
            cases.append((prompt, model.injection_vectors(a).float().numpy(), model.logits(prompt, a).numpy()))
        # Without music too: the GGUF alone (LoRA merge, biases, norms, tokenizer) against the reference.
        prompt = model.tokenizer.encode_prompt("What is the tempo?")
        cases.append((prompt, None, model.logits(prompt, None).numpy()))
    rows = []
    layers = list(manifest.inject_layers)
    for quant in quants or manifest.llm:
        exact = quant == "f32"
        llm = LlamaModel(safe_member(bundle_dir, manifest.llm[quant]))
        hook = InjectionHook(manifest.dims.n_embd, manifest.dims.n_layer)
        ctx = LlamaContext(llm, hook, n_ctx=max(len(c[0]) for c in cases) + 8, n_threads=threads, exact=exact)
        try:
            worst, agree, total = 0.0, 0, 0
            scale = 0.0
            for prompt, d, ref in cases:
                if d is None:
                    hook.clear()
                else:
                    hook.set_clip_vectors(0, (layers, d))
                    hook.use_single_clip(0)
                ctx.clear()
                got = np.stack(ctx.decode(prompt, range(len(prompt)), [0] * len(prompt), [True] * len(prompt)))
                worst = max(worst, float(np.abs(got - ref).max()))
                scale = max(scale, float(np.abs(ref).max()))
                agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
                total += len(prompt)
        finally:
            ctx.close()
            llm.close()
            hook.close()
        tol = LLM_TOLERANCES[quant]
        rows.append(Check(f"llm/{quant}", worst, worst / scale if scale else 0.0, None,
                          f"max|Δlogit| <= {tol:g}" + (" (exact settings)" if exact else ""),
                          worst <= tol, f"top-1 agreement {agree}/{total} over {len(cases)} prompts"))
    return rows


def format_table(checks: Sequence[Check]) -> str:
    head = f"{'check':<16} {'max abs':>10} {'max rel':>10} {'min cos':>9}  {'tolerance':<34} result  note"
    lines = [head, "-" * len(head)]
    for c in checks:
        cos = "-" if c.min_cosine is None else f"{c.min_cosine:.5f}"
        lines.append(f"{c.name:<16} {c.max_abs:>10.3g} {c.max_rel:>10.3g} {cos:>9}  {c.tolerance:<34} "
                     f"{'PASS' if c.passed else 'FAIL':<6}  {c.note}")
    return "\n".join(lines)
