"""llama.cpp through llama-cpp-python's low-level C API: one class per handle, every return code checked.

The high-level ``llama_cpp.Llama`` class is not used: it has no ``cb_eval`` argument (needed for the
music hook), no ``kv_unified`` switch (needed for batches of clips) and samples in its own way. Our
runner takes logits and leaves sampling to :class:`mullama_sdk.sampling.Sampler`.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mullama_sdk.errors import BackendUnavailableError, BundleError, ContextLengthError, MullamaError

log = logging.getLogger(__name__)

# enum ggml_type: GGML_TYPE_F32 = 0, GGML_TYPE_F16 = 1
_GGML_TYPE_F32 = 0
# enum llama_flash_attn_type { AUTO = -1, DISABLED = 0, ENABLED = 1 }
_FLASH_ATTN_DISABLED = 0

_init_lock = threading.Lock()
_backend_ready = False
_log_callback = None  # llama.cpp's log sink is process-wide; the ctypes callback must outlive every model


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:  # pragma: no cover - a hard dependency, but give the reason if it broke
        raise BackendUnavailableError(f"llama-cpp-python cannot be imported: {e}") from e
    return llama_cpp


def _ensure_backend() -> None:
    """``llama_backend_init`` once per process, and llama.cpp's logging routed to :mod:`logging`."""
    global _backend_ready, _log_callback
    with _init_lock:
        if _backend_ready:
            return
        lc = _llama_cpp()
        lc.llama_backend_init()
        llama_log = logging.getLogger("llama_cpp.native")

        def sink(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
            # ggml_log_level: 2 = WARN, 3 = ERROR; the rest (INFO/DEBUG/CONT) is chatter.
            msg = text.decode("utf-8", "replace").rstrip()
            if msg:
                llama_log.log(logging.WARNING if level in (2, 3) else logging.DEBUG, "%s", msg)

        _log_callback = lc.llama_log_callback(sink)
        lc.llama_log_set(_log_callback, ctypes.c_void_p(0))
        _backend_ready = True


class LlamaModel:
    """A loaded GGUF (weights + vocabulary). Shareable by several :class:`LlamaContext` objects."""

    def __init__(self, path: Path, *, n_gpu_layers: int = 0) -> None:
        _ensure_backend()
        self._lc = lc = _llama_cpp()
        self.path = Path(path)
        params = lc.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        self._model = lc.llama_model_load_from_file(str(self.path).encode(), params)
        if not self._model:
            raise BundleError(f"llama.cpp could not load {self.path.name} (see the llama_cpp.native log)")
        self._vocab = lc.llama_model_get_vocab(self._model)
        self.n_vocab = lc.llama_vocab_n_tokens(self._vocab)
        self.n_embd = lc.llama_model_n_embd(self._model)
        self.n_layer = lc.llama_model_n_layer(self._model)
        self.eos_id = lc.llama_vocab_eos(self._vocab)
        self.bos_id = lc.llama_vocab_bos(self._vocab)

    @property
    def handle(self):
        if self._model is None:
            raise MullamaError("the model is closed")
        return self._model

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        """llama.cpp's SentencePiece-compatible tokenization (specials in ``text`` are not parsed)."""
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (self._lc.llama_token * cap)()
        n = self._lc.llama_tokenize(self._vocab, data, len(data), buf, cap, add_bos, False)
        if n < 0:  # buffer too small: -n is the size needed
            cap = -n
            buf = (self._lc.llama_token * cap)()
            n = self._lc.llama_tokenize(self._vocab, data, len(data), buf, cap, add_bos, False)
        if n < 0:
            raise MullamaError(f"llama.cpp failed to tokenize {len(data)} bytes of text")
        return list(buf[:n])

    def detokenize_bytes(self, tokens: Sequence[int]) -> bytes:
        """Bytes of ``tokens`` as SentencePiece decodes them (leading space of the first piece removed)."""
        if not tokens:
            return b""
        arr = (self._lc.llama_token * len(tokens))(*tokens)
        cap = 8 * len(tokens) + 16
        while True:
            buf = ctypes.create_string_buffer(cap)
            n = self._lc.llama_detokenize(self._vocab, arr, len(tokens), buf, cap, True, False)
            if n >= 0:
                return buf.raw[:n]
            cap = -n

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.detokenize_bytes(tokens).decode("utf-8", "replace")

    def is_eog(self, token: int) -> bool:
        return bool(self._lc.llama_vocab_is_eog(self._vocab, token))

    def close(self) -> None:
        if getattr(self, "_model", None):
            self._lc.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        self.close()


class LlamaContext:
    """One llama.cpp context (KV cache + compute graph) with the music hook installed.

    Args:
        model: The loaded GGUF.
        hook: A :class:`native_bridge.InjectionHook` (installed as ``cb_eval``; must outlive the context).
        n_ctx: KV cells in total. With ``n_seq_max > 1`` the cache is unified (one stream), so the
            sequences share these cells and the hook's row order stays the batch order.
        exact: Flash attention off and an F32 KV cache: matches a float64 reference to ~1e-6, slower.
    """

    def __init__(
        self,
        model: LlamaModel,
        hook,
        *,
        n_ctx: int,
        n_batch: int = 512,
        n_seq_max: int = 1,
        n_threads: int | None = None,
        exact: bool = False,
    ) -> None:
        from native_bridge import apply_to_context_params, set_exact_arithmetic

        lc = self._lc = _llama_cpp()
        self.model = model
        self.hook = hook
        self.n_seq_max = n_seq_max
        self._abort = threading.Event()
        p = lc.llama_context_default_params()
        p.n_ctx = n_ctx
        p.n_batch = p.n_ubatch = min(n_batch, n_ctx)
        p.n_seq_max = n_seq_max
        # One KV stream keeps ubatch rows in batch order, which the hook's row -> clip map relies on.
        p.kv_unified = True
        if n_threads:
            p.n_threads = p.n_threads_batch = n_threads
        p.no_perf = True
        if exact:
            set_exact_arithmetic(p)
        apply_to_context_params(p, hook)
        self._abort_cb = lc.ggml_abort_callback(lambda _data: self._abort.is_set())
        p.abort_callback = self._abort_cb
        self._ctx = lc.llama_init_from_model(model.handle, p)
        if not self._ctx:
            raise BackendUnavailableError(
                f"llama.cpp could not create a context of {n_ctx} tokens (out of memory?)"
            )
        self.n_ctx = lc.llama_n_ctx(self._ctx)
        self._mem = lc.llama_get_memory(self._ctx)
        self._batch = lc.llama_batch_init(max(p.n_batch, 1), 0, 1)
        self._batch_cap = max(p.n_batch, 1)

    def request_abort(self) -> None:
        """Make the running (or next) ``llama_decode`` stop early; it then raises ``InterruptedError``."""
        self._abort.set()

    def clear(self, seq_id: int = -1, keep: int = 0) -> None:
        """Forget KV cells: all of them, or those of ``seq_id`` from position ``keep`` on."""
        if seq_id < 0 and keep == 0:
            self._lc.llama_memory_clear(self._mem, True)
        elif not self._lc.llama_memory_seq_rm(self._mem, seq_id, keep, -1):
            raise MullamaError(f"llama.cpp could not drop positions >= {keep} of sequence {seq_id}")

    def decode(
        self,
        tokens: Sequence[int],
        positions: Sequence[int],
        seq_ids: Sequence[int],
        want_logits: Sequence[bool],
        row_clips: Sequence[int] | None = None,
    ) -> list[np.ndarray]:
        """Run ``tokens`` (any number: split into ``n_batch`` chunks) through the model.

        Args:
            row_clips: Clip number per token for the music hook (-1 = none); ``None`` leaves the hook's
                single-clip setting in force.

        Returns:
            Logits (float32 copies, ``n_vocab``) of every token with ``want_logits``, in order.

        Raises:
            ContextLengthError: no KV space left for them.
            InterruptedError: :meth:`request_abort` was called.
        """
        n = len(tokens)
        out: list[np.ndarray] = []
        for start in range(0, n, self._batch_cap):
            end = min(n, start + self._batch_cap)
            b = self._batch
            for j, i in enumerate(range(start, end)):
                b.token[j] = tokens[i]
                b.pos[j] = positions[i]
                b.n_seq_id[j] = 1
                b.seq_id[j][0] = seq_ids[i]
                b.logits[j] = bool(want_logits[i])
            b.n_tokens = end - start
            if row_clips is not None:
                self.hook.set_row_clips(row_clips[start:end])
            rc = self._lc.llama_decode(self._ctx, b)
            if rc == 2:
                self._abort.clear()
                raise InterruptedError("generation cancelled")
            if rc == 1:
                raise ContextLengthError(
                    f"the KV cache ({self.n_ctx} tokens) is full; create the Captioner with a larger n_ctx"
                )
            if rc != 0:
                raise MullamaError(f"llama_decode failed with code {rc}")
            out.extend(self._logits(j) for j, i in enumerate(range(start, end)) if want_logits[i])
        return out

    def _logits(self, batch_row: int) -> np.ndarray:
        ptr = self._lc.llama_get_logits_ith(self._ctx, batch_row)
        if not ptr:
            raise MullamaError(f"llama.cpp has no logits for batch row {batch_row}")
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,)).copy()

    def close(self) -> None:
        if getattr(self, "_ctx", None):
            self._lc.llama_batch_free(self._batch)
            self._lc.llama_free(self._ctx)
            self._ctx = None

    def __del__(self) -> None:
        self.close()
