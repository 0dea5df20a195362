"""Token generation conditioned on music: the only code that programs the music hook and uses the KV cache.

The hook (:class:`native_bridge.InjectionHook`) adds each clip's vectors to LLaMA's attention output;
which vectors, and for which rows of a batch, is state set here and nowhere else. The KV cache is
used two ways:

* one clip at a time (:meth:`Decoder.generate`), on a single-sequence context whose cache is kept
  between calls: a new question about the *same* clip (same :class:`MusicVectors` key) re-uses the
  cached prompt prefix, bit for bit what a fresh prefill would compute;
* several clips at once (:meth:`Decoder.generate_batch`), one sequence per clip in one unified-cache
  context (created on first use), each row of every ``llama_decode`` mapped to its clip's vectors.

Callers (the :class:`~mullama_sdk.captioner.Captioner`) hold their lock around every method here; a
cancel request from another thread reaches the running ``llama_decode`` through :meth:`Decoder.abort`.
Results come back as values (:class:`Decoded`), timings included.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass

from mullama_sdk.errors import ContextLengthError
from mullama_sdk.llm import LlamaContext, LlamaModel, native_bridge_errors
from mullama_sdk.options import GenerationOptions
from mullama_sdk.results import MusicVectors


@dataclass(frozen=True)
class Decoded:
    """What one generation produced: the prompt it ran, the tokens it made (no EOS), why it ended
    (``"eos"``, ``"max_new_tokens"``, ``"cancelled"``, ``"stopped"``) and how long prefill and decoding took."""

    prompt: tuple[int, ...]
    tokens: tuple[int, ...]
    stop_reason: str
    prefill_ms: float = 0.0
    decode_ms: float = 0.0


def open_hook(n_embd: int, n_layer: int, backend: str = "auto"):
    """A new :class:`native_bridge.InjectionHook` (``backend``: ``"auto"``, ``"native"`` or ``"python"``).

    Raises:
        BackendUnavailableError: ``backend="native"`` and the C hook cannot be built or loaded here.
    """
    from native_bridge import InjectionHook

    with native_bridge_errors():
        return InjectionHook(n_embd, n_layer, backend=backend)


def check_fits(n_prompt: int, n_new: int, n_ctx: int) -> None:
    """Raise :class:`ContextLengthError` unless a prompt and ``n_new`` answer tokens fit ``n_ctx`` cells."""
    if n_prompt + n_new > n_ctx:
        raise ContextLengthError(
            f"prompt ({n_prompt} tokens) + max_new_tokens ({n_new}) exceed the context of {n_ctx} tokens; "
            "shorten the question, lower max_new_tokens or create the Captioner with a larger n_ctx"
        )


class Decoder:
    """LLaMA (llama.cpp) with the music hook, for one :class:`~mullama_sdk.captioner.Captioner`.

    Args:
        model, hook: The loaded GGUF and the hook installed in every context made here.
        inject_layers: Layer ids the vectors' rows belong to (manifest ``inject_layers``).
        eos_id: The bundle's end-of-sequence id (the model's other end-of-generation ids also stop).
        n_ctx: KV cells per sequence; a batch context gets ``n_ctx * batch_size``.
        batch_size: Most sequences one :meth:`generate_batch` call takes.
        n_threads, exact: As for :class:`~mullama_sdk.llm.LlamaContext`.
    """

    def __init__(self, model: LlamaModel, hook, *, inject_layers: Sequence[int], eos_id: int, n_ctx: int,
                 batch_size: int, n_threads: int | None, exact: bool) -> None:
        self._model = model
        self._hook = hook
        self._layers = list(inject_layers)
        self._eos_id = eos_id
        self._n_ctx = n_ctx
        self._n_threads = n_threads
        self._exact = exact
        self.batch_size = batch_size
        self._ctx = LlamaContext(model, hook, n_ctx=n_ctx, n_threads=n_threads, exact=exact)
        self._batch_ctx: LlamaContext | None = None
        self._active_ctx: LlamaContext | None = None  # the context decoding now, for abort()
        self._kv_key: str | None = None  # MusicVectors.key of the clip the single-sequence KV cache holds
        self._kv_tokens: list[int] = []

    @property
    def n_ctx(self) -> int:
        """Cells of the single-sequence cache: llama.cpp may round the requested size up."""
        return self._ctx.n_ctx

    def abort(self) -> None:
        """Make the ``llama_decode`` running now (if any) stop early; callable from any thread."""
        ctx = self._active_ctx
        if ctx is not None:
            ctx.request_abort()

    def _is_end(self, token: int) -> bool:
        return token == self._eos_id or self._model.is_eog(token)

    # ---- one clip -------------------------------------------------------------------------------
    def generate(self, prompt: list[int], clip: MusicVectors, options: GenerationOptions, *,
                 cancelled: Callable[[], bool], stop: Callable[[], bool] | None = None,
                 ) -> Generator[int, None, Decoded]:
        """Yield the answer's token ids for one clip; the generator's return value is the :class:`Decoded`.

        ``options`` must be resolved. ``cancelled`` is checked before prefill and after every token,
        ``stop`` after every token.
        """
        n_new, sampler = options.max_new_tokens, options.new_sampler()
        check_fits(len(prompt), n_new, self._ctx.n_ctx)
        out: list[int] = []
        reason, prefill_ms, decode_ms = "max_new_tokens", 0.0, 0.0
        self._active_ctx = ctx = self._ctx
        ctx.reset_abort()  # a cancel() that came after the previous generation's last decode
        try:
            if cancelled():  # cancelled while encoding or waiting for the lock
                return Decoded(tuple(prompt), (), "cancelled")
            self._hook.set_clip_vectors(0, (self._layers, clip.injection))
            self._hook.use_single_clip(0)
            key = clip.key  # a digest of the vectors: computed once per call
            keep = self._reusable_prefix(key, prompt)
            t0 = time.perf_counter()
            try:
                logits = ctx.decode(prompt[keep:], range(keep, len(prompt)), [0] * (len(prompt) - keep),
                                    [i == len(prompt) - 1 for i in range(keep, len(prompt))])[0]
            except InterruptedError:
                self._forget_kv()
                return Decoded(tuple(prompt), (), "cancelled")
            self._kv_key, self._kv_tokens = key, list(prompt)
            t1 = time.perf_counter()
            prefill_ms = 1000 * (t1 - t0)
            pos = len(prompt)
            for step in range(n_new):
                token = sampler.pick(logits)
                if self._is_end(token):
                    reason = "eos"
                    break
                out.append(token)
                yield token
                if cancelled():
                    reason = "cancelled"
                    break
                if stop is not None and stop():
                    reason = "stopped"
                    break
                if step + 1 == n_new:
                    break
                try:
                    logits = ctx.decode([token], [pos], [0], [True])[0]
                except InterruptedError:
                    self._forget_kv()
                    reason = "cancelled"
                    break
                self._kv_tokens.append(token)
                pos += 1
            decode_ms = 1000 * (time.perf_counter() - t1)
            return Decoded(tuple(prompt), tuple(out), reason, prefill_ms, decode_ms)
        finally:
            self._active_ctx = None

    def _reusable_prefix(self, key: str, prompt: list[int]) -> int:
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

    # ---- several clips --------------------------------------------------------------------------
    def generate_batch(self, prompts: Sequence[list[int]], clips: Sequence[MusicVectors],
                       options: GenerationOptions, *, cancelled: Callable[[], bool]) -> list[Decoded]:
        """Generate for up to :attr:`batch_size` clips together, one sequence each, in one llama.cpp batch.

        Each sequence samples with its own :meth:`GenerationOptions.new_sampler` (the same seed its
        :meth:`generate` would use). A cancel ends every unfinished sequence with ``"cancelled"``.
        """
        n = len(prompts)
        if not 0 < n <= self.batch_size or len(clips) != n:
            raise ValueError(f"a batch takes 1..{self.batch_size} clips with one prompt each, got "
                             f"{len(clips)} clips and {n} prompts")
        if self._batch_ctx is None:
            self._batch_ctx = LlamaContext(
                self._model, self._hook, n_ctx=self._n_ctx * self.batch_size,
                n_seq_max=self.batch_size, n_threads=self._n_threads, exact=self._exact)
        ctx = self._batch_ctx
        n_new = options.max_new_tokens
        samplers = [options.new_sampler() for _ in prompts]
        for p in prompts:
            check_fits(len(p), n_new, self._n_ctx)
        self._active_ctx = ctx
        ctx.reset_abort()  # a cancel() that came after the previous generation's last decode
        ctx.clear()
        out: list[list[int]] = [[] for _ in range(n)]
        reason = ["max_new_tokens"] * n
        active = set(range(n))
        t0, t1 = time.perf_counter(), None
        try:
            if cancelled():  # cancelled while encoding or in an earlier batch of this call
                raise InterruptedError
            for i, clip in enumerate(clips):
                self._hook.set_clip_vectors(i, (self._layers, clip.injection))
            toks, pos, seqs, want = [], [], [], []
            for i, p in enumerate(prompts):
                toks += p
                pos += range(len(p))
                seqs += [i] * len(p)
                want += [False] * (len(p) - 1) + [True]
            t0 = time.perf_counter()
            # Each prompt row is injected with its own clip's vectors: the row -> clip map is the sequence id.
            logits = dict(enumerate(self._decode_rows(ctx, toks, pos, seqs, want)))
            t1 = time.perf_counter()
            while active:
                step_seqs = []
                for i in sorted(active):
                    if len(out[i]) >= n_new:
                        active.discard(i)
                        continue
                    token = samplers[i].pick(logits[i])
                    if self._is_end(token):
                        reason[i] = "eos"
                        active.discard(i)
                        continue
                    out[i].append(token)
                    if len(out[i]) < n_new:
                        step_seqs.append(i)
                    else:
                        active.discard(i)
                if cancelled():
                    raise InterruptedError
                if not step_seqs:
                    break
                step_logits = self._decode_rows(ctx, [out[i][-1] for i in step_seqs],
                                                [len(prompts[i]) + len(out[i]) - 1 for i in step_seqs],
                                                step_seqs, [True] * len(step_seqs))
                logits = dict(zip(step_seqs, step_logits, strict=True))
        except InterruptedError:  # cancel(): seen between steps, or llama.cpp's abort callback
            for i in active:
                reason[i] = "cancelled"
        finally:
            self._active_ctx = None
            ctx.clear()
        t2 = time.perf_counter()
        t1 = t2 if t1 is None else t1
        return [Decoded(tuple(prompts[i]), tuple(out[i]), reason[i], 1000 * (t1 - t0), 1000 * (t2 - t1))
                for i in range(n)]

    def _decode_rows(self, ctx: LlamaContext, tokens, positions, seq_ids, want) -> list:
        """``ctx.decode`` one ``n_batch`` chunk at a time, each preceded by its rows' clip map (sequence i
        is clip i), so that the hook injects every row with its own clip's vectors."""
        logits = []
        for start in range(0, len(tokens), ctx.n_batch):
            end = start + ctx.n_batch
            self._hook.set_row_clips(seq_ids[start:end])
            logits += ctx.decode(tokens[start:end], positions[start:end], seq_ids[start:end], want[start:end])
        return logits

    def close(self) -> None:
        """Free both llama.cpp contexts (their KV caches); the model and the hook stay the caller's."""
        for ctx in (self._ctx, self._batch_ctx):
            if ctx is not None:
                ctx.close()
