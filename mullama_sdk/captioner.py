"""The public entry point: ``Captioner.from_pretrained(bundle)`` -> ``caption(audio)``.

Threading model: ONNX Runtime sessions run concurrently; everything that touches llama.cpp (the
KV cache, the music hook's vectors, the vocabulary that ``close()`` frees) runs under one lock, so
one Captioner can be shared by any number of threads and each call gets exactly its single-threaded
result. A thread that holds the lock cannot re-enter it: calling the Captioner from a ``stop``
callback, or from the body of a ``caption_stream`` loop, raises ``RuntimeError`` (encode() is fine).
``caption_stream`` holds the lock from its first item until it is exhausted or closed. For parallel
decoding of many clips use :meth:`Captioner.caption_batch` (one llama.cpp batch).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mullama_sdk.audio import iter_windows
from mullama_sdk.bundle_files import check_files, check_gguf_dims, safe_member
from mullama_sdk.constants import MIN_WINDOW_SAMPLES
from mullama_sdk.errors import AudioError, BundleError, ContextLengthError
from mullama_sdk.manifest import ENCODER_PRECISIONS, LLM_QUANTS, Manifest, failed_verification, load_manifest
from mullama_sdk.sampling import Sampler

log = logging.getLogger(__name__)

AudioInput = Any  # path, bytes, file-like, numpy array (+ sample_rate) or MusicVectors
#: Above this sample magnitude a non-finite encoder output is blamed on the audio, below on the weights.
_SANE_PEAK = 1e3
_keys = itertools.count(1)


@dataclass(frozen=True)
class Timings:
    """Where the time went, in milliseconds (``tokens_per_s`` counts generated tokens while decoding)."""

    audio_s: float = 0.0
    encode_ms: float = 0.0
    adapter_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    n_prompt_tokens: int = 0
    n_tokens: int = 0

    @property
    def tokens_per_s(self) -> float:
        return 1000.0 * self.n_tokens / self.decode_ms if self.decode_ms > 0 else 0.0

    def to_dict(self) -> dict[str, float]:
        d = {k: round(v, 3) if isinstance(v, float) else v for k, v in self.__dict__.items()}
        d["tokens_per_s"] = round(self.tokens_per_s, 2)
        return d


@dataclass(frozen=True)
class Segment:
    """The caption of one window of a long clip."""

    start_s: float
    end_s: float
    text: str
    tokens: tuple[int, ...]


@dataclass(frozen=True)
class Caption:
    """A generated answer. ``tokens`` excludes the EOS; ``stop_reason`` says why generation ended:
    ``"eos"``, ``"max_new_tokens"``, ``"cancelled"`` (``cancel()``) or ``"stopped"`` (stop callback)."""

    text: str
    tokens: tuple[int, ...]
    prompt_tokens: tuple[int, ...]
    timings: Timings
    stop_reason: str
    segments: tuple[Segment, ...] = ()


@dataclass(frozen=True, eq=False)
class MusicVectors:
    """What the encoder made of one clip: reuse it to ask several questions without re-encoding.

    ``injection`` holds ``d_l`` for every injected layer, ``(n_inject, n_embd)`` float32.
    """

    injection: np.ndarray
    music_query: np.ndarray
    duration_s: float
    n_frames: int
    encode_ms: float
    adapter_ms: float
    window_bounds_s: tuple[tuple[float, float], ...] = ()
    window_means: tuple[tuple[np.ndarray, int], ...] = field(default=(), repr=False)
    key: int = field(default_factory=lambda: next(_keys))


class Captioner:
    """MU-LLaMA on ONNX Runtime (encoder, adapter) and llama.cpp (LLaMA), from one bundle folder.

    Use :meth:`from_pretrained`; close it (or use ``with``) to free the native memory.
    """

    def __init__(self, bundle_dir: Path, manifest: Manifest, encoder, llm_model, hook, *, n_ctx: int,
                 n_threads: int | None, batch_size: int, exact: bool, max_window_seconds: float) -> None:
        from mullama_sdk.llm import LlamaContext

        self.bundle_dir = bundle_dir
        self.manifest = manifest
        self._encoder = encoder
        self._model = llm_model
        self._hook = hook
        self._n_ctx = n_ctx
        self._n_threads = n_threads
        self._batch_size = batch_size
        self._exact = exact
        self.max_window_seconds = max_window_seconds
        #: Shortest clip accepted, in 24 kHz samples: the bundle's own minimum (its encoder was exported and
        #: verified down to it; 0.5 s in bundles older than the 400-sample minimum), never below one MERT frame.
        self.min_window_samples = max(manifest.min_window_samples, MIN_WINDOW_SAMPLES)
        # A plain Lock, not an RLock: an abandoned caption_stream may be finalised (and release it) in
        # another thread. Re-entry from the owning thread is detected through _owner instead.
        self._lock = threading.Lock()
        self._owner: int | None = None  # the thread holding _lock
        self._cancel_epoch = 0  # cancel() counts up; a call whose starting value changed is cancelled
        self._ctx = LlamaContext(llm_model, hook, n_ctx=n_ctx, n_threads=n_threads, exact=exact)
        self._batch_ctx = None
        self._active_ctx = None
        self._kv_key: int | None = None  # which clip the single-sequence KV cache holds
        self._kv_tokens: list[int] = []
        self._closed = False

    @property
    def n_ctx(self) -> int:
        """Tokens (prompt + answer) one caption may use: llama.cpp may round the requested size up."""
        return self._ctx.n_ctx

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        bundle: str | os.PathLike,
        *,
        device: str = "auto",
        n_threads: int | None = None,
        n_ctx: int = 1024,
        encoder_precision: str | None = None,
        quant: str | None = None,
        batch_size: int = 4,
        verify_checksums: bool = False,
        exact: bool = False,
        hook_backend: str = "auto",
        max_window_seconds: float | None = None,
        encoder_backend: str = "auto",
        low_memory: bool = False,
    ) -> Captioner:
        """Validate a bundle folder, then load its encoder, adapter and LLM.

        Args:
            bundle: Folder written by ``mullama-export bundle``.
            device: ``"auto"`` (the GPU when one is usable, else CPU), ``"cpu"`` or ``"cuda"``. On a GPU the
                encoder runs on the bundle's TensorRT engines when they are compatible, else on ONNX
                Runtime's CUDA provider; ``"cuda"`` without either falls back to the CPU with a logged
                warning (see :mod:`mullama_sdk.encoder_backend`).
            n_threads: CPU threads for ONNX Runtime and llama.cpp (default: theirs).
            n_ctx: KV-cache tokens per sequence (prompt + answer must fit).
            encoder_precision: ``fp32``, ``fp16`` or ``int8``; default from the manifest (fp16 on CUDA
                when the bundle has it).
            quant: Which GGUF: ``f32``, ``f16``, ``q8_0``, ``q4_k_m``; default from the manifest.
            batch_size: Most clips one :meth:`caption_batch` step decodes together.
            verify_checksums: Hash every file against the manifest (slow for big bundles; sizes are
                always checked).
            exact: llama.cpp without flash attention and with an F32 KV cache (matches the torch
                reference to ~1e-6; slower). For tests and ``verify``.
            hook_backend: ``"auto"``, ``"native"`` (C) or ``"python"`` (slower fallback).
            max_window_seconds: Longest window the encoder sees (default: the bundle's, 30 s).
            encoder_backend: ``"auto"``, ``"tensorrt"`` (engines from ``mullama-export trt``; raises
                BackendUnavailableError with the reason when they cannot run here) or ``"onnxruntime"``.
            low_memory: Keep no second copy of any weights and no activation arena between calls: ONNX
                Runtime without weight prepacking and without its CPU arena, llama.cpp without weight
                repacking. Resident memory then stays near the size of the loaded files, the KV cache
                and one window's activations on top, and does not grow with later calls (measured at
                real widths, int8 + q4_k_m: 1.12x the files after load, 1.17x after captions, vs 1.46x /
                1.66x-1.85x by default); a 10 s caption takes 1.21x as long, mostly in the encoder
                (bench/RESULTS.md, memory section). Outputs are unchanged up to float rounding.

        Raises:
            BundleError: missing/corrupt files, dims that disagree, unknown variants.
            BackendUnavailableError: ONNX Runtime / CUDA / the hook cannot run here.
        """
        from mullama_sdk.encoder_backend import choose_encoder_backend, open_encoder
        from mullama_sdk.llm import LlamaModel
        from native_bridge import InjectionHook

        bundle_dir = Path(bundle)
        manifest = load_manifest(bundle_dir)
        choice = choose_encoder_backend(manifest, device=device, encoder_backend=encoder_backend,
                                        encoder_precision=encoder_precision)
        on_gpu = choice.on_gpu
        precision = choice.onnx_precision
        quant = quant or manifest.default_quant
        for name, value, options, allowed in (("encoder_precision", precision, manifest.encoder, ENCODER_PRECISIONS),
                                              ("quant", quant, manifest.llm, LLM_QUANTS)):
            if value not in options:
                raise BundleError(
                    f"{name}={value!r} is not in this bundle (it has {sorted(options)}; known: {allowed})"
                )
        failed = failed_verification(manifest)
        if failed:  # a bundle exported with --no-strict
            used = [n for n in failed if n in (f"encoder/{precision}", f"adapter/{precision}", f"llm/{quant}")]
            log.warning("bundle %s failed verification at export time for %s (exported with --no-strict)%s",
                        bundle_dir, ", ".join(failed),
                        f"; the variants loaded now ({', '.join(used)}) are among them: outputs may be wrong"
                        if used else "; the variants loaded now passed")
        if n_ctx < 16:
            raise ValueError(f"n_ctx must be at least 16 tokens, got {n_ctx}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        files = choice.files(manifest) + [manifest.llm[quant]]
        check_files(bundle_dir, manifest, files, sha256=verify_checksums)
        gguf_path = safe_member(bundle_dir, manifest.llm[quant])
        check_gguf_dims(gguf_path, manifest)

        encoder = open_encoder(choice, bundle_dir, manifest, n_threads=n_threads, low_memory=low_memory)
        model = LlamaModel(gguf_path, n_gpu_layers=999 if on_gpu else 0, repack_weights=not low_memory)
        d = manifest.dims
        if (model.n_embd, model.n_layer, model.n_vocab) != (d.n_embd, d.n_layer, d.n_vocab):
            model.close()
            raise BundleError(f"{gguf_path.name} loaded as n_embd={model.n_embd}, n_layer={model.n_layer}, "
                              f"n_vocab={model.n_vocab}; the manifest says {d}")
        hook = InjectionHook(d.n_embd, d.n_layer, backend=hook_backend)
        log.info("mullama: encoder %s, LLM %s, hook %s", choice.describe(), quant, hook.backend)
        return cls(bundle_dir, manifest, encoder, model, hook, n_ctx=n_ctx, n_threads=n_threads,
                   batch_size=batch_size, exact=exact,
                   max_window_seconds=max_window_seconds or manifest.max_window_seconds)

    # ---- audio -> music vectors -----------------------------------------------------------------
    def encode(self, audio: AudioInput, *, sample_rate: int | None = None, keep_windows: bool = False) -> MusicVectors:
        """Run the encoder (per window, frame-weighted mean) and the adapter on one clip."""
        return self._encode(audio, sample_rate, keep_windows, None)

    def _encode(self, audio: AudioInput, sample_rate: int | None, keep_windows: bool,
                epoch: int | None) -> MusicVectors | None:
        """:meth:`encode`; ``None`` when ``epoch`` is given and cancel() was called meanwhile."""
        self._check_open()
        if isinstance(audio, MusicVectors):
            return audio
        sr = self.manifest.sample_rate
        t0 = time.perf_counter()
        bounds, per_window, peak = [], [], 0.0
        try:
            # Windows arrive one by one (long files are streamed), so memory does not grow with duration.
            for start, stop, window in iter_windows(audio, sample_rate, max_window_seconds=self.max_window_seconds,
                                                    min_window_samples=self.min_window_samples):
                if epoch is not None and epoch != self._cancel_epoch:
                    return None
                bounds.append((start, stop))
                peak = max(peak, float(np.abs(window).max()))
                per_window.append(self._encoder.window_means(window))
            t1 = time.perf_counter()
            total_frames = sum(n for _, n in per_window)
            means = sum(m * n for m, n in per_window) / total_frames
            injection, query = self._encoder.adapt(means)
        except AttributeError:
            self._check_open()  # close() from another thread released the sessions: say so
            raise
        if not (np.isfinite(injection).all() and np.isfinite(query).all()):
            if peak > _SANE_PEAK:
                raise AudioError(f"the encoder overflowed on audio with sample values up to {peak:.3g}; "
                                 "audio samples are expected in [-1, 1]")
            raise BundleError("the encoder produced non-finite music vectors (NaN/Inf) from ordinary audio: the "
                              "bundle's encoder or adapter weights are damaged (load it with "
                              "verify_checksums=True, or re-export it)")
        t2 = time.perf_counter()
        n_samples = bounds[-1][1]
        return MusicVectors(
            injection=injection, music_query=query, duration_s=n_samples / sr, n_frames=total_frames,
            encode_ms=1000 * (t1 - t0), adapter_ms=1000 * (t2 - t1),
            window_bounds_s=tuple((a / sr, b / sr) for a, b in bounds),
            window_means=tuple(per_window) if keep_windows else (),
        )

    # ---- generation -----------------------------------------------------------------------------
    def caption(
        self,
        audio: AudioInput,
        *,
        question: str | None = None,
        sample_rate: int | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        segments: bool = False,
        stop: Callable[[], bool] | None = None,
    ) -> Caption:
        """Caption (or answer ``question`` about) one clip.

        Args:
            audio: Path, bytes, file object, numpy array (with ``sample_rate``) or :class:`MusicVectors`.
            question: The instruction; default the bundle's ("Describe the audio").
            max_new_tokens, temperature, top_p: Default to the bundle's sampling settings;
                temperature 0 is greedy.
            seed: Seed of the sampler (reproducible sampling).
            segments: Also caption every encoder window separately (long audio), with start/end times.
            stop: Called once per token; returning True ends generation (``stop_reason="stopped"``).
        """
        epoch = self._cancel_epoch
        vec = self._encode(audio, sample_rate, segments, epoch)
        if vec is None:
            return self._cancelled(question)
        cap = self._run(vec, question, max_new_tokens, temperature, top_p, seed, stop, epoch)
        if not segments:
            return cap
        segs = []
        for (start, end), (means, _frames) in zip(vec.window_bounds_s, vec.window_means, strict=True):
            t0 = time.perf_counter()
            injection, query = self._encoder.adapt(means)
            window_vec = MusicVectors(injection, query, end - start, _frames, 0.0,
                                      1000 * (time.perf_counter() - t0))
            c = self._run(window_vec, question, max_new_tokens, temperature, top_p, seed, stop, epoch)
            segs.append(Segment(start, end, c.text, c.tokens))
        return Caption(cap.text, cap.tokens, cap.prompt_tokens, cap.timings, cap.stop_reason, tuple(segs))

    def ask(self, audio: AudioInput, question: str, **kwargs: Any) -> Caption:
        """Answer ``question`` about ``audio`` (same options as :meth:`caption`)."""
        return self.caption(audio, question=question, **kwargs)

    def caption_stream(
        self,
        audio: AudioInput,
        *,
        question: str | None = None,
        sample_rate: int | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> Iterator[str]:
        """Yield the caption's text as it is generated; pieces never split a UTF-8 character.

        The pieces join to exactly :meth:`caption`'s ``text``. Consume the iterator to the end (or
        ``close()`` it): it holds the decoding lock meanwhile.
        """
        epoch = self._cancel_epoch
        vec = self._encode(audio, sample_rate, False, epoch)
        if vec is None:
            return
        tokens: list[int] = []
        emitted = ""
        for token in self._tokens(vec, question, max_new_tokens, temperature, top_p, seed, stop, {}, epoch):
            tokens.append(token)
            text = self._model.detokenize(tokens)
            # A trailing U+FFFD is a multi-byte character whose remaining bytes are still to come.
            stable = text.rstrip("\ufffd")
            if len(stable) > len(emitted) and stable.startswith(emitted):
                yield stable[len(emitted):]
                emitted = stable
        final = self._text(tokens)
        if final != emitted and final.startswith(emitted):
            yield final[len(emitted):]

    def cancel(self) -> None:
        """End every :meth:`caption`, :meth:`caption_stream` and :meth:`caption_batch` call in progress (any
        thread), within one token or one llama.cpp graph node, or after the audio window being encoded.

        They return with ``stop_reason="cancelled"`` (the tokens made so far; the rest of a batch with no
        tokens). Calls that start after cancel() are not affected; :meth:`encode` alone is not cancelled.
        """
        self._cancel_epoch += 1
        ctx = self._active_ctx
        if ctx is not None:
            ctx.request_abort()

    @contextlib.contextmanager
    def _llama(self) -> Iterator[None]:
        """Hold the llama.cpp lock; refuse re-entry from the thread that holds it (it would deadlock, or
        with a re-entrant lock derail the generation in progress)."""
        me = threading.get_ident()
        if self._owner == me:
            raise RuntimeError(
                "this Captioner is already generating in this thread: it was called from a stop callback "
                "or from inside a caption_stream loop; finish or close() the stream first, or use "
                "another Captioner")
        with self._lock:
            self._owner = me
            try:
                self._check_open()
                yield
            finally:
                self._owner = None

    def _text(self, tokens: list[int]) -> str:
        # Under the lock: close() from another thread frees the vocabulary.
        with self._llama():
            return self._model.detokenize(tokens)

    def _cancelled(self, question: str | None) -> Caption:
        """The result of a call cancelled before its generation started."""
        with self._llama():
            prompt = self._prompt(question)
        return Caption("", (), tuple(prompt), Timings(), "cancelled")

    def _sampling(self, max_new_tokens, temperature, top_p, seed) -> tuple[int, Sampler]:
        s = self.manifest.sampling
        n = int(s.get("max_new_tokens", 512) if max_new_tokens is None else max_new_tokens)
        if n < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {n}")
        t = float(s.get("temperature", 0.6) if temperature is None else temperature)
        p = float(s.get("top_p", 0.8) if top_p is None else top_p)
        return n, Sampler(t, p, seed)

    def _prompt(self, question: str | None) -> list[int]:
        q = self.manifest.default_question if question is None else question
        if not isinstance(q, str) or not q.strip():
            raise ValueError(f"question must be a non-empty string, got {q!r}")
        return self._model.tokenize(self.manifest.prompt_template.format(question=q), add_bos=True)

    def _run(self, vec, question, max_new_tokens, temperature, top_p, seed, stop, epoch) -> Caption:
        info: dict[str, Any] = {}
        tokens = list(self._tokens(vec, question, max_new_tokens, temperature, top_p, seed, stop, info, epoch))
        timings = Timings(audio_s=vec.duration_s, encode_ms=vec.encode_ms, adapter_ms=vec.adapter_ms,
                          prefill_ms=info["prefill_ms"], decode_ms=info["decode_ms"],
                          n_prompt_tokens=len(info["prompt"]), n_tokens=len(tokens))
        return Caption(self._text(tokens), tuple(tokens), tuple(info["prompt"]), timings, info["stop_reason"])

    def _tokens(self, vec: MusicVectors, question, max_new_tokens, temperature, top_p, seed, stop,
                info: dict[str, Any], epoch: int) -> Iterator[int]:
        """Generate token ids for one clip on the single-sequence context (holds the lock throughout)."""
        n_new, sampler = self._sampling(max_new_tokens, temperature, top_p, seed)
        with self._llama():
            # Tokenized under the lock: close() from another thread frees the vocabulary.
            prompt = self._prompt(question)
            self._check_fits(len(prompt), n_new, self._ctx.n_ctx)
            info.update(prompt=prompt, prefill_ms=0.0, decode_ms=0.0, stop_reason="max_new_tokens")
            self._active_ctx = ctx = self._ctx
            ctx.reset_abort()  # a cancel() that came after the previous generation's last decode
            try:
                if epoch != self._cancel_epoch:  # cancelled while encoding or waiting for the lock
                    info["stop_reason"] = "cancelled"
                    return
                self._hook.set_clip_vectors(0, (list(self.manifest.inject_layers), vec.injection))
                self._hook.use_single_clip(0)
                keep = self._reusable_prefix(vec.key, prompt)
                t0 = time.perf_counter()
                try:
                    logits = ctx.decode(prompt[keep:], range(keep, len(prompt)), [0] * (len(prompt) - keep),
                                        [i == len(prompt) - 1 for i in range(keep, len(prompt))])[0]
                except InterruptedError:
                    self._forget_kv()
                    info["stop_reason"] = "cancelled"
                    return
                self._kv_key, self._kv_tokens = vec.key, list(prompt)
                t1 = time.perf_counter()
                info["prefill_ms"] = 1000 * (t1 - t0)
                pos = len(prompt)
                for step in range(n_new):
                    token = sampler.pick(logits)
                    if token == self.manifest.eos_id or self._model.is_eog(token):
                        info["stop_reason"] = "eos"
                        break
                    yield token
                    if epoch != self._cancel_epoch:
                        info["stop_reason"] = "cancelled"
                        break
                    if stop is not None and stop():
                        info["stop_reason"] = "stopped"
                        break
                    if step + 1 == n_new:
                        break
                    try:
                        logits = ctx.decode([token], [pos], [0], [True])[0]
                    except InterruptedError:
                        self._forget_kv()
                        info["stop_reason"] = "cancelled"
                        break
                    self._kv_tokens.append(token)
                    pos += 1
                info["decode_ms"] = 1000 * (time.perf_counter() - t1)
            finally:
                self._active_ctx = None

    def _reusable_prefix(self, key: int, prompt: list[int]) -> int:
        """How many leading prompt tokens the KV cache already holds for this very clip (exact reuse)."""
        if self._kv_key != key:
            self._forget_kv()
            return 0
        n = 0
        for a, b in zip(self._kv_tokens, prompt):
            if a != b:
                break
            n += 1
        n = min(n, len(prompt) - 1)  # re-run at least one token: its logits start the answer
        self._ctx.clear(0, n)
        del self._kv_tokens[n:]
        return n

    def _forget_kv(self) -> None:
        self._ctx.clear()
        self._kv_key, self._kv_tokens = None, []

    @staticmethod
    def _check_fits(n_prompt: int, n_new: int, n_ctx: int) -> None:
        if n_prompt + n_new > n_ctx:
            raise ContextLengthError(
                f"prompt ({n_prompt} tokens) + max_new_tokens ({n_new}) exceed the context of {n_ctx} tokens; "
                "shorten the question, lower max_new_tokens or create the Captioner with a larger n_ctx"
            )

    # ---- batches --------------------------------------------------------------------------------
    def caption_batch(
        self,
        audios: Sequence[AudioInput],
        *,
        questions: str | Sequence[str | None] | None = None,
        sample_rate: int | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> list[Caption]:
        """Caption several clips, decoding up to ``batch_size`` of them together in one llama.cpp batch.

        Each clip gets the prompt, music vectors and sampling seed its own :meth:`caption` would use. With
        f32/f16 GGUFs the results are equal (the tests check it); with quantized GGUFs llama.cpp's batched
        matrix kernels round differently from its single-sequence ones (measured: logits of the 2nd..8th
        sequence of a q4_k_m or q8_0 batch differ by 0.06-0.08, also without the music hook), so a greedy
        caption can occasionally part from the unbatched one after a near-tie.
        """
        from mullama_sdk.llm import LlamaContext

        audios = list(audios)
        if isinstance(questions, str) or questions is None:
            questions = [questions] * len(audios)
        questions = list(questions)
        if len(questions) != len(audios):
            raise ValueError(f"{len(audios)} clips but {len(questions)} questions")
        epoch = self._cancel_epoch
        vectors = []
        for audio in audios:
            vec = self._encode(audio, sample_rate, False, epoch)
            if vec is None:
                return [self._cancelled(q) for q in questions]
            vectors.append(vec)
        results: list[Caption] = []
        for start in range(0, len(vectors), self._batch_size):
            chunk = list(zip(vectors[start:start + self._batch_size], questions[start:start + self._batch_size],
                             strict=True))
            with self._llama():
                if self._batch_ctx is None:
                    self._batch_ctx = LlamaContext(
                        self._model, self._hook, n_ctx=self._n_ctx * self._batch_size,
                        n_seq_max=self._batch_size, n_threads=self._n_threads, exact=self._exact)
                results.extend(self._decode_batch(self._batch_ctx, chunk, max_new_tokens, temperature, top_p, seed,
                                                  epoch))
        return results

    def _decode_batch(self, ctx, chunk, max_new_tokens, temperature, top_p, seed, epoch) -> list[Caption]:
        n = len(chunk)
        prompts = [self._prompt(q) for _, q in chunk]
        plans = [self._sampling(max_new_tokens, temperature, top_p, seed) for _ in chunk]
        for p, (n_new, _) in zip(prompts, plans, strict=True):
            self._check_fits(len(p), n_new, self._n_ctx)
        self._active_ctx = ctx
        ctx.reset_abort()  # a cancel() that came after the previous generation's last decode
        ctx.clear()
        out: list[list[int]] = [[] for _ in range(n)]
        reason = ["max_new_tokens"] * n
        active = set(range(n))
        t0, t1 = time.perf_counter(), None
        try:
            if epoch != self._cancel_epoch:  # cancelled while encoding or in an earlier batch of this call
                raise InterruptedError
            layers = list(self.manifest.inject_layers)
            for i, (vec, _) in enumerate(chunk):
                self._hook.set_clip_vectors(i, (layers, vec.injection))
            toks, pos, seqs, want, clips = [], [], [], [], []
            for i, p in enumerate(prompts):
                toks += p
                pos += range(len(p))
                seqs += [i] * len(p)
                want += [False] * (len(p) - 1) + [True]
                clips += [i] * len(p)
            t0 = time.perf_counter()
            logits = dict(enumerate(ctx.decode(toks, pos, seqs, want, row_clips=clips)))
            t1 = time.perf_counter()
            while active:
                step_seqs = []
                for i in sorted(active):
                    n_new, sampler = plans[i]
                    if len(out[i]) >= n_new:
                        active.discard(i)
                        continue
                    token = sampler.pick(logits[i])
                    if token == self.manifest.eos_id or self._model.is_eog(token):
                        reason[i] = "eos"
                        active.discard(i)
                        continue
                    out[i].append(token)
                    if len(out[i]) < n_new:
                        step_seqs.append(i)
                    else:
                        active.discard(i)
                if epoch != self._cancel_epoch:
                    raise InterruptedError
                if not step_seqs:
                    break
                step_logits = ctx.decode([out[i][-1] for i in step_seqs],
                                         [len(prompts[i]) + len(out[i]) - 1 for i in step_seqs],
                                         step_seqs, [True] * len(step_seqs), row_clips=step_seqs)
                logits = dict(zip(step_seqs, step_logits, strict=True))
        except InterruptedError:  # cancel(): seen between steps, or llama.cpp's abort callback
            for i in active:
                reason[i] = "cancelled"
        finally:
            self._active_ctx = None
            ctx.clear()
        t2 = time.perf_counter()
        t1 = t2 if t1 is None else t1
        caps = []
        for i, (vec, _) in enumerate(chunk):
            timings = Timings(audio_s=vec.duration_s, encode_ms=vec.encode_ms, adapter_ms=vec.adapter_ms,
                              prefill_ms=1000 * (t1 - t0), decode_ms=1000 * (t2 - t1),
                              n_prompt_tokens=len(prompts[i]), n_tokens=len(out[i]))
            caps.append(Caption(self._model.detokenize(out[i]), tuple(out[i]), tuple(prompts[i]), timings,
                                reason[i]))
        return caps

    # ---- lifetime -------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this Captioner is closed")

    def close(self) -> None:
        """Free the llama.cpp contexts and model, the hook and the ONNX sessions (idempotent).

        Waits for a generation in another thread to finish. From the generating thread itself (a stop
        callback, a caption_stream loop, a ``with`` block left by an exception) it closes at once; that
        generation then ends with ``RuntimeError``.
        """
        if self._owner == threading.get_ident():
            self._free()
            return
        with self._lock:
            self._free()

    def _free(self) -> None:
        if self._closed:
            return
        self._closed = True
        for ctx in (self._ctx, self._batch_ctx):
            if ctx is not None:
                ctx.close()
        self._model.close()
        self._hook.close()
        self._encoder.close()

    def __enter__(self) -> Captioner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
