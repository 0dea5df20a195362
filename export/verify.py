"""Every conversion checked against its source, with stated tolerances: the ``verify`` command's engine.

Rows compare one stage with the one before it:
* ``encoder/<precision>`` and ``adapter/<precision>``: ONNX Runtime vs the torch reference;
* ``llm/<quant>``: llama.cpp logits of the MU-LLaMA prompt, with the music injected by our hook
  (vectors from the torch reference, so only llama.cpp is under test), vs the torch reference;
* ``trt-encoder/<precision>`` and ``trt-adapter/<precision>``: TensorRT engines vs ONNX Runtime fp32
  (CPU) on the same inputs (the adapter on the ORT encoder's means, so each engine is judged alone).
  Without tensorrt / a GPU / compatible engines these rows are ``SKIP`` with the reason.

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
from mullama_sdk.bundle_files import safe_member
from mullama_sdk.constants import MIN_WINDOW_SAMPLES, SAMPLE_RATE_HZ
from mullama_sdk.cpu import INT8_WEIGHT_LIMIT
from mullama_sdk.manifest import INJECTION, MUSIC_QUERY, N_FRAMES, STATE_MEANS, WAVEFORM, Manifest
from mullama_sdk.prompt import CAPTION_QUESTIONS

#: (max relative error, min cosine) per graph and precision; relative = max|x - y| / max|y|.
ONNX_TOLERANCES: dict[tuple[str, str], tuple[float | None, float | None]] = {
    ("encoder", "fp32"): (1e-4, None),
    ("adapter", "fp32"): (1e-4, None),
    ("encoder", "fp16"): (5e-2, 0.999),
    ("adapter", "fp16"): (5e-2, 0.999),
    # int8 files hold weights within [-64, 64] (mullama_sdk.cpu.INT8_SCHEME), so every CPU's kernel sums
    # exactly and computes the same numbers: these bounds hold on AVX2-only and VNNI machines alike, and each
    # int8 row also checks the weight range itself. Measured: adapter 0.99958 (tiny test model), 0.99932 (the
    # rebuilt demo model's export row); full-range weights on AVX2 gave 0.9818 (tiny) and 0.703 (demo adapter,
    # docs/int8.md). The encoder's state means lose more to 7-bit weights at MERT-330M width (0.99906, random
    # weights, bench_encoder), hence its looser bound: the adapter's row is the one that sees what reaches the LLM.
    ("encoder", "int8"): (None, 0.99),
    ("adapter", "int8"): (None, 0.999),
}
#: Max |Δ logits| per GGUF type. f32 is the exactness claim; the others only catch broken files.
LLM_TOLERANCES = {"f32": 1e-3, "f16": 5e-2, "q8_0": 1.0, "q4_k_m": 4.0}
#: Max relative error of TensorRT engines against ONNX Runtime fp32, per engine precision.
TRT_TOLERANCES = {"fp32": 1e-4, "fp16": 1e-2}

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
    #: Not run here (``note`` says why); a skipped row does not fail ``verify``.
    skipped: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: Lengths (24 kHz samples) and fundamentals of the synthetic check clips: 0.5 s, 2 s, 6 s, then the
#: shortest window the encoder takes (400 samples = one MERT frame) and a 50 ms one-shot (3 frames), so
#: every exported bundle is checked on short input too.
SYNTHETIC_CLIPS: tuple[tuple[int, float], ...] = (
    (SAMPLE_RATE_HZ // 2, 220.0), (2 * SAMPLE_RATE_HZ, 330.0), (6 * SAMPLE_RATE_HZ, 196.0),
    (MIN_WINDOW_SAMPLES, 440.0), (SAMPLE_RATE_HZ // 20, 110.0),
)


def synthetic_clips(seed: int = 0) -> list[np.ndarray]:
    """Deterministic music-like test signals (harmonic tones, a beat, noise): see :data:`SYNTHETIC_CLIPS`."""
    rng = np.random.default_rng(seed)
    clips = []
    for n, f0 in SYNTHETIC_CLIPS:
        t = np.arange(n) / SAMPLE_RATE_HZ
        tone = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6))
        beat = np.exp(-30 * (t % 0.5)) * rng.standard_normal(len(t))
        clips.append((0.2 * tone + 0.1 * beat + 0.01 * rng.standard_normal(len(t))).astype(np.float32))
    return clips


def check_windows(audio_files: Sequence[Path] = (), *, min_samples: int = MIN_WINDOW_SAMPLES) -> list[np.ndarray]:
    """Encoder inputs for the checks: the synthetic clips plus up to 10 s windows of the given files.

    ``min_samples``: the bundle's minimum window (``Manifest.min_window_samples``); shorter synthetic clips are
    left out (a bundle exported for >= 0.5 s is checked on what it accepts).
    """
    windows = [w for w in synthetic_clips() if len(w) >= min_samples]
    for f in audio_files:
        wave = load_audio(f)
        for a, b in window_bounds(len(wave), max_window_samples=int(_CHECK_WINDOW_SECONDS * SAMPLE_RATE_HZ),
                                  min_window_samples=min_samples)[:3]:
            windows.append(wave[a:b])
    return windows


def onnx_row(graph: str, precision: str, report, path: Path) -> Check:
    """One row for the graph file ``path``; for int8 also its weight range, which keeps every CPU's kernel exact."""
    max_rel_tol, min_cos = ONNX_TOLERANCES[(graph, precision)]
    # The row's verdict rests on the graph's main output (the means / the injection vectors).
    main = report[STATE_MEANS if graph == "encoder" else INJECTION]
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
        frames = report[N_FRAMES]
        ok &= frames.max_abs == 0
        parts.append("frames equal")
    if precision == "int8":
        from export.onnx_precision import int8_weight_limit

        ok &= int8_weight_limit(path) <= INT8_WEIGHT_LIMIT
        parts.append(f"|w| <= {INT8_WEIGHT_LIMIT}")
    return Check(f"{graph}/{precision}", max(o.max_abs for o in report.outputs), rel, cos, ", ".join(parts),
                 bool(ok), f"{report.n_cases} inputs")


@dataclasses.dataclass(frozen=True)
class OnnxReference:
    """The torch music model's outputs on the check windows (:func:`onnx_reference`): everything
    :func:`onnx_checks` needs, so the (multi-GB) torch model can be freed before the ONNX variants and the
    GGUF are made, and is run once rather than once per precision."""

    windows: tuple[np.ndarray, ...]
    encoder: tuple[dict[str, np.ndarray], ...]      # per window: state_means, n_frames
    adapter: tuple[dict[str, np.ndarray], ...]      # per window's state means: injection, music_query

    @property
    def state_means(self) -> list[np.ndarray]:
        return [r[STATE_MEANS] for r in self.encoder]


def onnx_reference(model, windows: Sequence[np.ndarray]) -> OnnxReference:
    """Run the torch music model (:class:`~training.reference.model.MullamaModel` or its music part) on ``windows``."""
    from export.onnx_compare import adapter_reference, encoder_reference

    encoder = encoder_reference(model, windows)
    adapter = adapter_reference(model, [r[STATE_MEANS] for r in encoder])
    return OnnxReference(tuple(windows), tuple(encoder), tuple(adapter))


def onnx_checks(reference: OnnxReference, bundle_dir: Path, manifest: Manifest,
                precisions: Iterable[str] | None = None, threads: int | None = None) -> list[Check]:
    """Each ONNX graph of the bundle (every precision present) against the torch reference's outputs."""
    from export.onnx_compare import compare_adapter, compare_encoder

    rows = []
    for p in list(precisions or manifest.encoder):
        encoder, adapter = safe_member(bundle_dir, manifest.encoder[p]), safe_member(bundle_dir, manifest.adapter[p])
        rows.append(onnx_row("encoder", p, compare_encoder(
            None, encoder, reference.windows, threads=threads, reference=reference.encoder), encoder))
        rows.append(onnx_row("adapter", p, compare_adapter(
            None, adapter, reference.state_means, threads=threads, reference=reference.adapter), adapter))
    return rows


def llm_checks(model, bundle_dir: Path, manifest: Manifest, windows: Sequence[np.ndarray],
               quants: Iterable[str] | None = None, threads: int | None = None) -> list[Check]:
    """Each GGUF of the bundle, hooked, against the torch reference's logits over whole prompts.

    Needs the full reference model (:func:`training.reference.build.build_model`).
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


def failed_rows(checks: Iterable[Check]) -> list[str]:
    """Names of the rows that failed (a skipped row is not a failure): what fails an export or ``verify``."""
    return [c.name for c in checks if not c.passed and not c.skipped]


def format_table(checks: Sequence[Check]) -> str:
    """The rows as an aligned text table (column widths from the contents)."""
    rows = [("check", "max abs", "max rel", "min cos", "tolerance", "result", "note")]
    for c in checks:
        cos = "-" if c.min_cosine is None else f"{c.min_cosine:.5f}"
        result = "SKIP" if c.skipped else "PASS" if c.passed else "FAIL"
        rows.append((c.name, f"{c.max_abs:.3g}", f"{c.max_rel:.3g}", cos, c.tolerance, result, c.note))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    right = (False, True, True, True, False, False)

    def line(r: tuple[str, ...]) -> str:
        cells = [r[i].rjust(w) if right[i] else r[i].ljust(w) for i, w in enumerate(widths)]
        return "  ".join(cells + [r[-1]]).rstrip()

    lines = [line(r) for r in rows]
    lines.insert(1, "-" * max(len(x) for x in lines))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ TensorRT
def trt_check_windows(profile, audio_files: Sequence[Path] = ()) -> list[np.ndarray]:
    """Windows for the TensorRT rows: the check windows inside ``profile`` plus its min and max lengths."""
    windows = [w for w in check_windows(audio_files) if profile.contains(len(w))]
    base = np.concatenate(synthetic_clips())
    for n in (profile.min, profile.max):
        if not any(len(w) == n for w in windows):
            windows.append(np.ascontiguousarray(np.tile(base, -(-n // len(base)))[:n]))
    return windows


def compare_trt(encoder_engine: Path, adapter_engine: Path, encoder_onnx: Path, adapter_onnx: Path,
                windows: Sequence[np.ndarray], *, precision: str, threads: int | None = None) -> list[Check]:
    """TensorRT engines against ONNX Runtime fp32 (CPU provider) on the windows inside the engine's profile.

    The adapter engine gets the ORT encoder's frame-weighted means, as does the ORT adapter.
    """
    from export.onnx_compare import cpu_session, error_report, run_session
    from mullama_sdk.encoder_trt import TensorRTMusicEncoder

    tol = TRT_TOLERANCES[precision]
    enc = TensorRTMusicEncoder(encoder_engine, adapter_engine)  # no fallback: only in-profile windows
    try:
        used = [w for w in windows if enc.profile.contains(len(w))]
        if not used:
            raise ValueError(f"no check window lies inside the engine's profile {enc.profile}")
        ort_enc, ort_ad = cpu_session(encoder_onnx, threads), cpu_session(adapter_onnx, threads)
        refs, outs = [], []
        for w in used:
            w = np.ascontiguousarray(w, np.float32)
            refs.append(run_session(ort_enc, {WAVEFORM: w[None]}))
            means, frames = enc.window_means(w)
            outs.append({STATE_MEANS: means, N_FRAMES: np.asarray(frames, np.int64)})
        enc_report = error_report("encoder", Path(encoder_engine).name, Path(encoder_onnx).name, refs, outs)
        total = sum(int(r[N_FRAMES]) for r in refs)
        mixed = sum(r[STATE_MEANS].astype(np.float64) * int(r[N_FRAMES]) for r in refs) / total
        feeds = [r[STATE_MEANS] for r in refs] + [mixed.astype(np.float32)]
        ad_refs = [run_session(ort_ad, {STATE_MEANS: h}) for h in feeds]
        ad_outs = []
        for h in feeds:
            injection, query = enc.adapt(h)
            ad_outs.append({INJECTION: injection, MUSIC_QUERY: query})
        ad_report = error_report("adapter", Path(adapter_engine).name, Path(adapter_onnx).name, ad_refs, ad_outs)
    finally:
        enc.close()
    rows = []
    for graph, report in (("encoder", enc_report), ("adapter", ad_report)):
        main = report[STATE_MEANS if graph == "encoder" else INJECTION]
        rel = max(o.max_rel for o in report.outputs)
        ok = rel <= tol
        parts = [f"rel <= {tol:g} vs ORT fp32"]
        if graph == "encoder":
            ok &= report[N_FRAMES].max_abs == 0
            parts.append("frames equal")
        skipped = len(windows) - len(used)
        note = f"{report.n_cases} inputs" + (f" ({skipped} outside the profile)" if graph == "encoder" and skipped
                                              else "")
        rows.append(Check(f"trt-{graph}/{precision}", max(o.max_abs for o in report.outputs), rel,
                          main.min_cosine, ", ".join(parts), bool(ok), note))
    return rows


def _skipped(precision: str, reason: str) -> list[Check]:
    return [Check(f"trt-{g}/{precision}", 0.0, 0.0, None, f"rel <= {TRT_TOLERANCES[precision]:g} vs ORT fp32",
                  False, f"skipped: {reason}", skipped=True) for g in ("encoder", "adapter")]


def trt_checks(bundle_dir: Path, manifest: Manifest, *, audio_files: Sequence[Path] = (),
               precisions: Iterable[str] | None = None, threads: int | None = None) -> list[Check]:
    """Rows for every TensorRT engine pair of the bundle; ``SKIP`` rows (with the reason) where they cannot run.

    Args:
        audio_files: Extra clips (see :func:`trt_check_windows`).
        precisions: Engine precisions to check (default: all in the manifest).
    """
    from mullama_sdk.encoder_trt import cuda_device, engine_incompatibility, tensorrt_version
    from mullama_sdk.errors import BackendUnavailableError

    precisions = [p for p in (precisions or manifest.trt) if p in manifest.trt]
    if not precisions:
        return []
    if "fp32" not in manifest.encoder or "fp32" not in manifest.adapter:
        return [row for p in precisions for row in _skipped(p, "the bundle has no fp32 ONNX graphs to compare with")]
    try:
        version, gpu = tensorrt_version(), cuda_device()
    except BackendUnavailableError as e:
        return [row for p in precisions for row in _skipped(p, str(e))]
    rows = []
    for p in precisions:
        entry = manifest.trt[p]
        why = engine_incompatibility(entry, tensorrt_version=version, gpu=gpu)
        if why is not None:
            rows += _skipped(p, why)
            continue
        rows += compare_trt(safe_member(bundle_dir, entry.encoder), safe_member(bundle_dir, entry.adapter),
                            safe_member(bundle_dir, manifest.encoder["fp32"]),
                            safe_member(bundle_dir, manifest.adapter["fp32"]),
                            trt_check_windows(entry.profile, audio_files), precision=p, threads=threads)
    return rows
