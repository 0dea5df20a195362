"""llama.cpp through llama-cpp-python's low-level C API: one class per handle, every return code checked.

The high-level ``llama_cpp.Llama`` class is not used: it has no ``cb_eval`` argument (needed for the
music hook), no ``kv_unified`` switch (needed for batches of clips) and samples in its own way. Our
runner takes logits and leaves sampling to :class:`mullama_sdk.sampling.Sampler`.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from mullama_sdk.errors import (
    BackendUnavailableError,
    BundleError,
    ClosedError,
    ContextLengthError,
    MullamaError,
)
from native_bridge.errors import NativeBridgeError

log = logging.getLogger(__name__)

# enum ggml_type: GGML_TYPE_F32 = 0, GGML_TYPE_F16 = 1
_GGML_TYPE_F32 = 0
# enum llama_flash_attn_type { AUTO = -1, DISABLED = 0, ENABLED = 1 }
_FLASH_ATTN_DISABLED = 0

# enum ggml_log_level: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (continues the previous line)
_LOG_LEVELS = {0: logging.DEBUG, 1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
native_log = logging.getLogger("llama_cpp.native")

_init_lock = threading.Lock()
_cb_lock = threading.Lock()
_backend_ready = False
# llama.cpp's log sink is process-wide; the ctypes callback must outlive every model (a collected
# callback crashes the next log line), so it lives here for the life of the process.
_log_state: dict = {"callback": None, "level": logging.DEBUG, "buffer": ""}


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:  # pragma: no cover - a hard dependency, but give the reason if it broke
        raise BackendUnavailableError(f"llama-cpp-python cannot be imported: {e}") from e
    return llama_cpp


def route_llama_logs() -> None:
    """Send llama.cpp's log output to the ``llama_cpp.native`` logger instead of stderr (idempotent).

    llama.cpp's INFO chatter becomes DEBUG; its warnings and errors keep their level.
    """
    lc = _llama_cpp()
    with _init_lock:
        if _log_state["callback"] is not None:
            return

        def sink(level: int, text: bytes, _user) -> None:
            # Called from llama.cpp's worker threads too (the quantizer's): keep lines whole.
            with _cb_lock:
                if level != 5:
                    _log_state["level"] = _LOG_LEVELS.get(level, logging.DEBUG)
                chunk = _log_state["buffer"] + (text or b"").decode("utf-8", "replace")
                *lines, _log_state["buffer"] = chunk.split("\n")
                lvl = _log_state["level"]
            for line in lines:
                if line.strip():
                    native_log.log(lvl, "%s", line)

        _log_state["callback"] = lc.llama_log_callback(sink)
        lc.llama_log_set(_log_state["callback"], ctypes.c_void_p(None))


@contextlib.contextmanager
def native_bridge_errors() -> Iterator[None]:
    """Around calls into :mod:`native_bridge` (which knows nothing of the SDK): its
    :class:`~native_bridge.errors.NativeBridgeError` reaches the SDK's callers as
    :class:`~mullama_sdk.errors.BackendUnavailableError`, the type they catch for "cannot run here"."""
    try:
        yield
    except NativeBridgeError as e:
        raise BackendUnavailableError(str(e)) from e


def ensure_backend() -> None:
    """``llama_backend_init`` once per process, with llama.cpp's logging routed to :mod:`logging`."""
    global _backend_ready
    route_llama_logs()
    with _init_lock:
        if not _backend_ready:
            _llama_cpp().llama_backend_init()
            _backend_ready = True


class LlamaModel:
    """A loaded GGUF (weights + vocabulary). Shareable by several :class:`LlamaContext` objects."""

    def __init__(self, path: Path, *, n_gpu_layers: int = 0, load_mode: int | None = None,
                 repack_weights: bool = True) -> None:
        """``repack_weights=False`` turns off llama.cpp's CPU weight repacking (``use_extra_bufts``): Q4_K
        weights are then not copied into the interleaved layout of its AVX2 kernels, which saves a second
        copy of them in memory (+0.39 GB for 0.67 GB of q4_k_m at 4 layers of 7B) but decodes slower
        (bench/RESULTS.md, memory section). Other quantizations are not repacked either way."""
        ensure_backend()
        self._lc = lc = _llama_cpp()
        self._model = None
        self.path = Path(path)
        if not self.path.is_file():
            raise BundleError(f"GGUF not found: {self.path}")
        params = lc.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        params.use_extra_bufts = repack_weights
        self.repack_weights = repack_weights
        if load_mode is not None:
            params.load_mode = load_mode
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
        """The raw ``llama_model *``; using a closed model is a programming error, not a native crash."""
        if self._model is None:
            raise ClosedError(f"the model {self.path.name} is closed")
        return self._model

    @property
    def vocab(self):
        self.handle  # noqa: B018 - raises when closed
        return self._vocab

    def tokenize(self, text: str, *, add_bos: bool = True, parse_special: bool = False) -> list[int]:
        """llama.cpp's SentencePiece-compatible tokenization (special-token text stays text by default)."""
        raw = text.encode("utf-8")
        cap = len(raw) + 8
        for _ in range(2):
            buf = (self._lc.llama_token * cap)()
            n = self._lc.llama_tokenize(self.vocab, raw, len(raw), buf, cap, add_bos, parse_special)
            if n >= 0:
                return list(buf[:n])
            if n == -(2**31):
                break
            cap = -n  # the buffer was too small: -n tokens are needed
        raise MullamaError(f"llama.cpp failed to tokenize a text of {len(raw)} bytes")

    def detokenize_bytes(self, tokens: Sequence[int], *, remove_special: bool = True,
                         unparse_special: bool = False) -> bytes:
        """Bytes of ``tokens`` as SentencePiece decodes them (leading space of the first piece removed)."""
        if not tokens:
            return b""
        arr = (self._lc.llama_token * len(tokens))(*[int(t) for t in tokens])
        cap = 16 * len(tokens) + 16
        for _ in range(2):
            buf = ctypes.create_string_buffer(cap)
            n = self._lc.llama_detokenize(self.vocab, arr, len(tokens), buf, cap, remove_special, unparse_special)
            if n >= 0:
                return buf.raw[:n]
            cap = -n + 1
        raise MullamaError(f"llama.cpp failed to detokenize {len(tokens)} tokens")

    def detokenize(self, tokens: Sequence[int], **kw) -> str:
        """Text of ``tokens``; invalid UTF-8 (split byte pieces) becomes U+FFFD."""
        return self.detokenize_bytes(tokens, **kw).decode("utf-8", "replace")

    def token_to_piece(self, token: int, *, special: bool = False) -> bytes:
        """The bytes one token contributes to text."""
        buf = ctypes.create_string_buffer(64)
        n = self._lc.llama_token_to_piece(self.vocab, int(token), buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._lc.llama_token_to_piece(self.vocab, int(token), buf, len(buf), 0, special)
        return buf.raw[: max(n, 0)]

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value as llama.cpp renders it (arrays are skipped), or ``None``."""
        buf = ctypes.create_string_buffer(4096)
        n = self._lc.llama_model_meta_val_str(self.handle, key.encode(), buf, len(buf))
        return None if n < 0 else buf.value.decode("utf-8", "replace")

    def is_eog(self, token: int) -> bool:
        return bool(self._lc.llama_vocab_is_eog(self.vocab, token))

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
        hook: A :class:`native_bridge.InjectionHook` (installed as ``cb_eval``; must outlive the
            context), or ``None`` for plain llama.cpp.
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
        with native_bridge_errors():
            if exact:
                set_exact_arithmetic(p)
            if hook is not None:
                apply_to_context_params(p, hook)
        # The callback must not reference self: a cycle would leave the context to the cyclic GC, which
        # may then free the model before this context (llama_free after llama_model_free).
        abort = self._abort
        self._abort_cb = lc.ggml_abort_callback(lambda _data: abort.is_set())
        p.abort_callback = self._abort_cb
        self._ctx = lc.llama_init_from_model(model.handle, p)
        if not self._ctx:
            raise BackendUnavailableError(
                f"llama.cpp could not create a context of {n_ctx} tokens (out of memory?)"
            )
        self.n_ctx = lc.llama_n_ctx(self._ctx)
        self._mem = lc.llama_get_memory(self._ctx)
        self._batch = lc.llama_batch_init(max(p.n_batch, 1), 0, 1)
        #: Most tokens one ``llama_decode`` takes; :meth:`decode` splits longer inputs into such chunks.
        self.n_batch = max(p.n_batch, 1)

    def request_abort(self) -> None:
        """Make the running (or next) ``llama_decode`` stop early; it then raises ``InterruptedError``."""
        self._abort.set()

    def reset_abort(self) -> None:
        """Withdraw an abort request that no ``llama_decode`` has consumed (call before a new generation)."""
        self._abort.clear()

    def _check_open(self) -> None:
        if self._ctx is None:
            raise ClosedError("the llama.cpp context is closed")

    def clear(self, seq_id: int = -1, keep: int = 0) -> None:
        """Forget KV cells: all of them, or those of ``seq_id`` from position ``keep`` on."""
        self._check_open()
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
    ) -> list[np.ndarray]:
        """Run ``tokens`` (any number: split into :attr:`n_batch` chunks) through the model.

        The music hook's state (vectors, which clip each row belongs to) is programmed by
        :mod:`mullama_sdk.generation`, not here: with several clips in one batch it calls this with at
        most :attr:`n_batch` tokens at a time, so that each call is one ``llama_decode``.

        Returns:
            Logits (float32 copies, ``n_vocab``) of every token with ``want_logits``, in order.

        Raises:
            ContextLengthError: no KV space left for them.
            InterruptedError: :meth:`request_abort` was called.
        """
        self._check_open()
        n = len(tokens)
        bad = [t for t in tokens if not 0 <= int(t) < self.model.n_vocab]
        if bad:
            raise ValueError(f"token ids outside 0..{self.model.n_vocab - 1}: {bad[:5]}")
        out: list[np.ndarray] = []
        for start in range(0, n, self.n_batch):
            end = min(n, start + self.n_batch)
            b = self._batch
            for j, i in enumerate(range(start, end)):
                b.token[j] = tokens[i]
                b.pos[j] = positions[i]
                b.n_seq_id[j] = 1
                b.seq_id[j][0] = seq_ids[i]
                b.logits[j] = bool(want_logits[i])
            b.n_tokens = end - start
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
