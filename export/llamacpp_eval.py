"""Conveniences for checking a GGUF with llama.cpp: logits of token lists and greedy continuations.

A thin layer over the runtime's own llama.cpp classes (:mod:`mullama_sdk.llm`), so the export's
checks exercise exactly the code the SDK runs. With ``exact=True`` the context runs without flash
attention and with an F32 KV cache: a float32 GGUF then matches a float64 reference to ~1e-6.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from mullama_sdk.errors import ContextLengthError
from mullama_sdk.llm import LlamaContext, LlamaModel, route_llama_logs

__all__ = ["LlamaCppModel", "route_llama_logs"]


class LlamaCppModel:
    """One GGUF with one single-sequence context (CPU).

    Args:
        path: The GGUF file.
        n_ctx: Context length (tokens); llama.cpp may round it up (see :attr:`n_ctx`).
        n_batch: Tokens per ``llama_decode`` call.
        n_threads: Decoding threads (default: llama.cpp's).
        exact: No flash attention + F32 KV cache (tests / verification).
        hook: Optional :class:`native_bridge.InjectionHook` (must outlive this object).
        load_mode: ``llama_model_params.load_mode``; ``None`` keeps llama.cpp's default (mmap on CPU).

    Raises:
        BundleError: the file is missing or llama.cpp cannot load it.
    """

    def __init__(self, path: str | os.PathLike[str], *, n_ctx: int = 512, n_batch: int = 512,
                 n_threads: int | None = None, exact: bool = False, hook=None, load_mode: int | None = None):
        self._model = LlamaModel(path, load_mode=load_mode)
        try:
            self._ctx = LlamaContext(self._model, hook, n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads,
                                     exact=exact)
        except BaseException:
            self._model.close()
            raise
        self.path = self._model.path
        self.n_ctx, self.n_batch = self._ctx.n_ctx, n_batch
        self.n_vocab, self.n_embd, self.n_layer = self._model.n_vocab, self._model.n_embd, self._model.n_layer
        self.closed = False

    # tokenizer and metadata come straight from the model
    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return self._model.tokenize(text, add_bos=add_special, parse_special=parse_special)

    def detokenize(self, ids: Sequence[int], **kw) -> str:
        return self._model.detokenize(ids, **kw)

    def detokenize_bytes(self, ids: Sequence[int], **kw) -> bytes:
        return self._model.detokenize_bytes(ids, **kw)

    def token_to_piece(self, token: int, *, special: bool = False) -> bytes:
        return self._model.token_to_piece(token, special=special)

    def meta(self, key: str) -> str | None:
        return self._model.meta(key)

    def clear(self) -> None:
        self._ctx.clear()

    def decode(self, tokens: Sequence[int], start_pos: int, *, all_logits: bool = True) -> np.ndarray:
        """Decode ``tokens`` at positions ``start_pos ...``; logits ``(T, n_vocab)`` or, else, of the last.

        Raises:
            ContextLengthError: the positions would exceed ``n_ctx``.
        """
        n = len(tokens)
        if n == 0:
            raise ValueError("no tokens to decode")
        if start_pos + n > self.n_ctx:
            raise ContextLengthError(f"{start_pos} cached + {n} new tokens exceed the context of {self.n_ctx}")
        want = [all_logits or i == n - 1 for i in range(n)]
        rows = self._ctx.decode(tokens, range(start_pos, start_pos + n), [0] * n, want)
        return np.stack(rows) if all_logits else rows[-1]

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits of every position of ``tokens`` from position 0 (clears the cache first)."""
        self.clear()
        return self.decode(tokens, 0, all_logits=True)

    def greedy(self, prompt: Sequence[int], max_new_tokens: int, *, stop_at_eog: bool = True) -> list[int]:
        """Greedy continuation of ``prompt`` (clears the cache first)."""
        self.clear()
        last = self.decode(prompt, 0, all_logits=False)
        out: list[int] = []
        for pos in range(len(prompt), len(prompt) + max_new_tokens):
            tok = int(np.argmax(last))
            if stop_at_eog and self._model.is_eog(tok):
                break
            out.append(tok)
            if len(out) == max_new_tokens:
                break
            last = self.decode([tok], pos, all_logits=False)
        return out

    def close(self) -> None:
        if not self.closed:
            self._ctx.close()
            self._model.close()
            self.closed = True

    def __enter__(self) -> LlamaCppModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
