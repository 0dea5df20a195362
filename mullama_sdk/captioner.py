"""The public entry point: ``Captioner.from_pretrained(bundle)`` -> ``caption(audio)``.

Threading model: ONNX Runtime sessions run concurrently; everything that touches llama.cpp (the
KV cache, the music hook's vectors, the vocabulary that ``close()`` frees) runs under one lock, so
one Captioner can be shared by any number of threads and each call gets exactly its single-threaded
result. A thread that holds the lock cannot re-enter it: calling the Captioner from a ``stop``
callback, or from the body of a ``caption_stream`` loop, raises ``RuntimeError`` (encode() is fine).
``caption_stream`` holds the lock from its first item until it is exhausted or closed. For parallel
decoding of many clips use :meth:`Captioner.caption_batch` (one llama.cpp batch).

The stages live in their own modules: :mod:`mullama_sdk.options` (the call's generation options,
resolved once against the bundle), :mod:`mullama_sdk.encoding` (audio -> music vectors),
:mod:`mullama_sdk.generation` (the music hook and the KV cache) and :mod:`mullama_sdk.results`. This
module loads a bundle, holds the lock, cancels and closes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import Any

from mullama_sdk.bundle_files import check_files, check_gguf_dims, safe_member
from mullama_sdk.constants import MIN_WINDOW_SAMPLES
from mullama_sdk.encoding import MusicEncoder, encode_clip, window_vectors
from mullama_sdk.errors import BundleError, ClosedError
from mullama_sdk.generation import Decoded, Decoder, open_hook
from mullama_sdk.manifest import ENCODER_PRECISIONS, LLM_QUANTS, Manifest, failed_verification, load_manifest
from mullama_sdk.options import GenerationOptions
from mullama_sdk.prompt import check_question
from mullama_sdk.results import Caption, MusicVectors, Segment, Timings

__all__ = ["AudioInput", "Caption", "Captioner", "MusicVectors", "Segment", "Timings"]

log = logging.getLogger(__name__)

AudioInput = Any  # path, bytes, file-like, numpy array (+ sample_rate) or MusicVectors


class Captioner:
    """MU-LLaMA on ONNX Runtime (encoder, adapter) and llama.cpp (LLaMA), from one bundle folder.

    Use :meth:`from_pretrained`; close it (or use ``with``) to free the native memory. Encoding math lives
    in :mod:`mullama_sdk.encoding`, decoding in :mod:`mullama_sdk.generation`; this class loads, locks,
    cancels and closes.
    """

    def __init__(self, bundle_dir: Path, manifest: Manifest, encoder: MusicEncoder, llm_model, hook, *,
                 n_ctx: int, n_threads: int | None, batch_size: int, exact: bool,
                 max_window_seconds: float) -> None:
        self.bundle_dir = bundle_dir
        self.manifest = manifest
        self._encoder = encoder
        self._model = llm_model
        self._hook = hook
        self.max_window_seconds = max_window_seconds
        #: Shortest clip accepted, in 24 kHz samples: the bundle's own minimum (its encoder was exported and
        #: verified down to it; 0.5 s in bundles older than the 400-sample minimum), never below one MERT frame.
        self.min_window_samples = max(manifest.min_window_samples, MIN_WINDOW_SAMPLES)
        # A plain Lock, not an RLock: an abandoned caption_stream may be finalised (and release it) in
        # another thread. Re-entry from the owning thread is detected through _owner instead.
        self._lock = threading.Lock()
        self._owner: int | None = None  # the thread holding _lock
        self._cancel_epoch = 0  # cancel() counts up; a call whose starting value changed is cancelled
        self._decoder = Decoder(llm_model, hook, inject_layers=manifest.inject_layers, eos_id=manifest.eos_id,
                                n_ctx=n_ctx, batch_size=batch_size, n_threads=n_threads, exact=exact)
        self._closed = False

    @property
    def n_ctx(self) -> int:
        """Tokens (prompt + answer) one caption may use: llama.cpp may round the requested size up."""
        return self._decoder.n_ctx

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
        hook = open_hook(d.n_embd, d.n_layer, hook_backend)
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
        try:
            return encode_clip(self._encoder, audio, sample_rate, rate_hz=self.manifest.sample_rate,
                               max_window_seconds=self.max_window_seconds,
                               min_window_samples=self.min_window_samples, keep_windows=keep_windows,
                               cancelled=None if epoch is None else self._cancel_check(epoch))
        except AttributeError:
            self._check_open()  # close() from another thread released the sessions: say so
            raise

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
        options = self._options(max_new_tokens, temperature, top_p, seed)
        epoch = self._cancel_epoch
        vec = self._encode(audio, sample_rate, segments, epoch)
        if vec is None:
            return self._cancelled(question)
        cap = self._run(vec, question, options, stop, epoch)
        if not segments:
            return cap
        segs = []
        for start, end, window_vec in window_vectors(self._encoder, vec):
            c = self._run(window_vec, question, options, stop, epoch)
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
        options = self._options(max_new_tokens, temperature, top_p, seed)
        epoch = self._cancel_epoch
        vec = self._encode(audio, sample_rate, False, epoch)
        if vec is None:
            return
        tokens: list[int] = []
        emitted = ""
        for token in self._tokens(vec, question, options, stop, epoch):
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
        options = self._options(max_new_tokens, temperature, top_p, seed)
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
        size = self._decoder.batch_size
        for start in range(0, len(vectors), size):
            chunk, asked = vectors[start:start + size], questions[start:start + size]
            with self._llama():
                prompts = [self._prompt(q) for q in asked]
                done = self._decoder.generate_batch(prompts, chunk, options, cancelled=self._cancel_check(epoch))
                results += [_result(vec, d, self._model.detokenize(d.tokens)) for vec, d in zip(chunk, done,
                                                                                             strict=True)]
        return results

    def cancel(self) -> None:
        """End every :meth:`caption`, :meth:`caption_stream` and :meth:`caption_batch` call in progress (any
        thread), within one token or one llama.cpp graph node, or after the audio window being encoded.

        They return with ``stop_reason="cancelled"`` (the tokens made so far; the rest of a batch with no
        tokens). Calls that start after cancel() are not affected; :meth:`encode` alone is not cancelled.
        """
        self._cancel_epoch += 1
        self._decoder.abort()

    # ---- helpers of the public methods ----------------------------------------------------------
    def _options(self, max_new_tokens, temperature, top_p, seed) -> GenerationOptions:
        """The call's keyword arguments as one validated options object, resolved against the bundle."""
        return GenerationOptions(max_new_tokens, temperature, top_p, seed).resolve(self.manifest.sampling)

    def _cancel_check(self, epoch: int) -> Callable[[], bool]:
        """True once :meth:`cancel` has been called after a call that started at ``epoch``."""
        return lambda: epoch != self._cancel_epoch

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

    def _text(self, tokens: Sequence[int]) -> str:
        # Under the lock: close() from another thread frees the vocabulary.
        with self._llama():
            return self._model.detokenize(tokens)

    def _cancelled(self, question: str | None) -> Caption:
        """The result of a call cancelled before its generation started."""
        with self._llama():
            prompt = self._prompt(question)
        return Caption("", (), tuple(prompt), Timings(), "cancelled")

    def _prompt(self, question: str | None) -> list[int]:
        q = check_question(self.manifest.default_question if question is None else question)
        return self._model.tokenize(self.manifest.prompt_template.format(question=q), add_bos=True)

    def _run(self, vec: MusicVectors, question, options: GenerationOptions, stop, epoch: int) -> Caption:
        tokens = self._tokens(vec, question, options, stop, epoch)
        while True:  # drain the generator: its return value is the Decoded
            try:
                next(tokens)
            except StopIteration as end:
                done: Decoded = end.value
                break
        return _result(vec, done, self._text(done.tokens))

    def _tokens(self, vec: MusicVectors, question, options: GenerationOptions, stop,
                epoch: int) -> Generator[int, None, Decoded]:
        """Generate token ids for one clip on the single-sequence context (holds the lock throughout)."""
        with self._llama():
            # Tokenized under the lock: close() from another thread frees the vocabulary.
            prompt = self._prompt(question)
            return (yield from self._decoder.generate(prompt, vec, options, cancelled=self._cancel_check(epoch),
                                                      stop=stop))

    # ---- lifetime -------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("this Captioner is closed")

    def close(self) -> None:
        """Free the llama.cpp contexts and model, the hook and the ONNX sessions (idempotent).

        Waits for a generation in another thread to finish. From the generating thread itself (a stop
        callback, a caption_stream loop, a ``with`` block left by an exception) it closes at once; that
        generation then ends with :class:`~mullama_sdk.errors.ClosedError` (a ``RuntimeError``).
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
        self._decoder.close()
        self._model.close()
        self._hook.close()
        self._encoder.close()

    def __enter__(self) -> Captioner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _result(vec: MusicVectors, done: Decoded, text: str) -> Caption:
    """The public result of one generation for the clip ``vec``."""
    timings = Timings(audio_s=vec.duration_s, encode_ms=vec.encode_ms, adapter_ms=vec.adapter_ms,
                      prefill_ms=done.prefill_ms, decode_ms=done.decode_ms,
                      n_prompt_tokens=len(done.prompt), n_tokens=len(done.tokens))
    return Caption(text, done.tokens, done.prompt, timings, done.stop_reason)
