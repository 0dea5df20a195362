"""A small owner of one llama.cpp model + context: logits of token lists, tokenize, detokenize.

Used by the export tests and verification, and meant for reuse by the SDK runtime: it imports only
numpy and llama_cpp (no torch). Tier 2 of the llama-cpp-python pattern: one class owns the native
handles, checks every return code and frees them in :meth:`LlamaCppModel.close`.

Exactness: with ``exact=True`` the context runs without flash attention and with an F32 KV cache; a
float32 GGUF then matches a float64 reference to ~1e-6 (llamacpp_notes section 2). The defaults
(flash attention "auto", F16 KV cache) cost ~1e-3 in logits and are what production decoding uses.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mullama_sdk.errors import BundleError, ContextLengthError

log = logging.getLogger(__name__)
native_log = logging.getLogger("llama_cpp.native")

__all__ = ["LlamaCppModel", "route_llama_logs"]

# enum ggml_log_level (ggml.h of the pinned llama-cpp-python): NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5
_LOG_LEVELS = {0: logging.DEBUG, 1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
_GGML_TYPE_F32 = 0
_LLAMA_FLASH_ATTN_TYPE_DISABLED = 0

_log_lock = threading.Lock()
_cb_lock = threading.Lock()
_log_state: dict[str, Any] = {"callback": None, "level": logging.DEBUG, "buffer": ""}


def route_llama_logs() -> None:
    """Send llama.cpp's log output to the ``llama_cpp.native`` logger instead of stderr.

    llama.cpp's INFO chatter becomes DEBUG; its warnings and errors keep their level. Idempotent; the
    callback object is kept referenced for the life of the process (a collected callback crashes the
    next log line).
    """
    import llama_cpp

    with _log_lock:
        if _log_state["callback"] is not None:
            return

        def _cb(level: int, text: bytes, _user: Any) -> None:
            # Called from llama.cpp's threads too (the quantiser's workers): keep lines whole.
            with _cb_lock:
                if level != 5:
                    _log_state["level"] = _LOG_LEVELS.get(level, logging.DEBUG)
                chunk = _log_state["buffer"] + (text or b"").decode("utf-8", "replace")
                *lines, _log_state["buffer"] = chunk.split("\n")
                lvl = _log_state["level"]
            for line in lines:
                if line.strip():
                    native_log.log(lvl, "%s", line)

        _log_state["callback"] = llama_cpp.llama_log_callback(_cb)
        llama_cpp.llama_log_set(_log_state["callback"], ctypes.c_void_p(None))


class LlamaCppModel:
    """One GGUF loaded by llama.cpp (CPU) with one context.

    Args:
        path: The GGUF file.
        n_ctx: Context length of the context (tokens).
        n_batch: Tokens per ``llama_decode`` call (``n_ubatch`` is the same, so one call = one graph).
        n_threads: Threads for decoding; default: all cores.
        exact: No flash attention + F32 KV cache (tests / verification); see the module docstring.
        configure: Called with the ``llama_context_params`` before the context is created, e.g.
            ``functools.partial(native_bridge.apply_to_context_params, hook=hook)`` to install the
            music-injection hook (the hook must then outlive this object).
        load_mode: ``llama_model_params.load_mode`` (``llama_cpp.LLAMA_LOAD_MODE_*``); ``None`` keeps
            llama.cpp's default (mmap on CPU).

    Raises:
        BundleError: the file is missing or llama.cpp cannot load it / create the context.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        n_ctx: int = 512,
        n_batch: int = 512,
        n_threads: int | None = None,
        exact: bool = False,
        configure: Callable[[Any], Any] | None = None,
        load_mode: int | None = None,
    ) -> None:
        import llama_cpp

        self._lib = llama_cpp
        self.path = Path(path)
        self._model = None
        self._ctx = None
        if not self.path.is_file():
            raise BundleError(f"GGUF not found: {self.path}")
        route_llama_logs()
        llama_cpp.llama_backend_init()

        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = 0
        if load_mode is not None:
            mparams.load_mode = load_mode
        model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not model:
            raise BundleError(f"llama.cpp could not load {self.path} (see the llama_cpp.native log)")
        self._model = model
        self._vocab = llama_cpp.llama_model_get_vocab(model)

        threads = n_threads or max(1, os.cpu_count() or 1)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch
        cparams.n_seq_max = 1
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.no_perf = True
        if exact:
            cparams.flash_attn_type = _LLAMA_FLASH_ATTN_TYPE_DISABLED
            cparams.type_k = _GGML_TYPE_F32
            cparams.type_v = _GGML_TYPE_F32
        if configure is not None:
            configure(cparams)
        self._cparams = cparams  # keeps any callback installed by ``configure`` referenced
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            self.close()
            raise BundleError(f"llama.cpp could not create a context (n_ctx={n_ctx}) for {self.path}")
        self._ctx = ctx
        self.n_ctx = int(llama_cpp.llama_n_ctx(ctx))
        self.n_batch = int(n_batch)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self.n_embd = int(llama_cpp.llama_model_n_embd(model))
        self.n_layer = int(llama_cpp.llama_model_n_layer(model))

    # ------------------------------------------------------------------------------------- lifecycle
    @property
    def closed(self) -> bool:
        return self._model is None

    def close(self) -> None:
        """Free the context, then the model. Safe to call twice."""
        if self._ctx is not None:
            self._lib.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            self._lib.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> LlamaCppModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # last resort; call close()
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: the library may be gone
            pass

    def _check_open(self) -> None:
        if self._ctx is None:
            raise RuntimeError("LlamaCppModel is closed")

    @property
    def context(self) -> Any:
        """The raw ``llama_context *`` (for callers that drive ``llama_decode`` themselves)."""
        self._check_open()
        return self._ctx

    @property
    def model(self) -> Any:
        """The raw ``llama_model *``."""
        self._check_open()
        return self._model

    # -------------------------------------------------------------------------------------- metadata
    def meta(self, key: str) -> str | None:
        """A GGUF metadata value as llama.cpp renders it (arrays are summarised), or ``None``."""
        self._check_open()
        buf = ctypes.create_string_buffer(4096)
        n = self._lib.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return None if n < 0 else buf.value.decode("utf-8", "replace")

    # ------------------------------------------------------------------------------------- decoding
    def clear(self) -> None:
        """Forget every cached position (KV memory)."""
        self._check_open()
        self._lib.llama_memory_clear(self._lib.llama_get_memory(self._ctx), True)

    def decode(self, tokens: Sequence[int], start_pos: int, *, all_logits: bool = True) -> np.ndarray:
        """``llama_decode`` of ``tokens`` at positions ``start_pos ...`` (sequence 0), chunked by ``n_batch``.

        Returns:
            float32 logits ``(len(tokens), n_vocab)`` if ``all_logits``, else ``(n_vocab,)`` of the last.

        Raises:
            ContextLengthError: the positions would exceed ``n_ctx``.
            RuntimeError: llama_decode failed.
        """
        self._check_open()
        lib = self._lib
        n = len(tokens)
        if n == 0:
            raise ValueError("no tokens to decode")
        if start_pos + n > self.n_ctx:
            raise ContextLengthError(
                f"{start_pos} cached + {n} new tokens exceed the context of {self.n_ctx} tokens"
            )
        bad = [t for t in tokens if not 0 <= int(t) < self.n_vocab]
        if bad:
            raise ValueError(f"token ids outside 0..{self.n_vocab - 1}: {bad[:5]}")
        rows = []
        for lo in range(0, n, self.n_batch):
            chunk = tokens[lo : lo + self.n_batch]
            last_chunk = lo + len(chunk) == n
            batch = lib.llama_batch_init(len(chunk), 0, 1)
            try:
                batch.n_tokens = len(chunk)
                for i, tok in enumerate(chunk):
                    batch.token[i] = int(tok)
                    batch.pos[i] = start_pos + lo + i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = 1 if all_logits or (last_chunk and i == len(chunk) - 1) else 0
                rc = lib.llama_decode(self._ctx, batch)
                if rc != 0:
                    raise RuntimeError(f"llama_decode returned {rc} (positions {start_pos + lo}..)")
                wanted = range(len(chunk)) if all_logits else ([len(chunk) - 1] if last_chunk else [])
                for i in wanted:
                    ptr = lib.llama_get_logits_ith(self._ctx, i)
                    rows.append(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy())
            finally:
                lib.llama_batch_free(batch)
        return np.stack(rows) if all_logits else rows[-1]

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits of every position of ``tokens`` from position 0 (clears the cache first); ``(T, n_vocab)``."""
        self.clear()
        return self.decode(tokens, 0, all_logits=True)

    def greedy(self, prompt: Sequence[int], max_new_tokens: int, *, stop_at_eog: bool = True) -> list[int]:
        """Greedy continuation of ``prompt`` (argmax each step; clears the cache first)."""
        self.clear()
        last = self.decode(prompt, 0, all_logits=False)
        out: list[int] = []
        pos = len(prompt)
        for _ in range(max_new_tokens):
            tok = int(np.argmax(last))
            if stop_at_eog and self._lib.llama_vocab_is_eog(self._vocab, tok):
                break
            out.append(tok)
            if len(out) == max_new_tokens:
                break
            last = self.decode([tok], pos, all_logits=False)
            pos += 1
        return out

    # ------------------------------------------------------------------------------------ tokenizer
    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """llama.cpp's tokenizer (``add_special`` adds BOS as the GGUF says; special text stays text)."""
        self._check_open()
        raw = text.encode("utf-8")
        cap = len(raw) + 8
        for _ in range(2):
            buf = (self._lib.llama_token * cap)()
            n = self._lib.llama_tokenize(self._vocab, raw, len(raw), buf, cap, add_special, parse_special)
            if n >= 0:
                return list(buf[:n])
            if n == -(2**31):
                break
            cap = -n
        raise RuntimeError(f"llama_tokenize failed for a text of {len(raw)} bytes")

    def detokenize(self, ids: Sequence[int], *, remove_special: bool = True, unparse_special: bool = False) -> str:
        """llama.cpp's inverse of :meth:`tokenize` (invalid UTF-8 from byte pieces becomes U+FFFD)."""
        return self.detokenize_bytes(ids, remove_special=remove_special, unparse_special=unparse_special).decode(
            "utf-8", "replace")

    def detokenize_bytes(
        self, ids: Sequence[int], *, remove_special: bool = True, unparse_special: bool = False
    ) -> bytes:
        self._check_open()
        arr = (self._lib.llama_token * max(1, len(ids)))(*[int(i) for i in ids])
        cap = 16 * len(ids) + 16
        for _ in range(2):
            buf = ctypes.create_string_buffer(cap)
            n = self._lib.llama_detokenize(self._vocab, arr, len(ids), buf, cap, remove_special, unparse_special)
            if n >= 0:
                return buf.raw[:n]
            cap = -n + 1
        raise RuntimeError(f"llama_detokenize failed for {len(ids)} tokens")

    def token_to_piece(self, token: int, *, special: bool = False) -> bytes:
        """The bytes one token contributes to text (what a streaming decoder appends)."""
        self._check_open()
        buf = ctypes.create_string_buffer(64)
        n = self._lib.llama_token_to_piece(self._vocab, int(token), buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._lib.llama_token_to_piece(self._vocab, int(token), buf, len(buf), 0, special)
        return buf.raw[: max(n, 0)]
