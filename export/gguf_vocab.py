"""The SentencePiece vocabulary of ``tokenizer.model`` as the GGUF tokenizer fields (``tokenizer.ggml.*``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mullama_sdk.errors import ConfigError

log = logging.getLogger(__name__)


def sentencepiece_vocab(path: Path) -> dict[str, Any]:
    """Read a SentencePiece model into the GGUF tokenizer fields (``tokenizer.ggml.*``).

    Token types come from ``is_unknown / is_control / is_byte / is_unused`` (plus ``USER_DEFINED`` from
    the model proto), which number like ``gguf.TokenType``.

    Returns:
        ``{"tokens", "scores", "types", "bos", "eos", "unk", "pad", "add_space_prefix"}``
        (``pad`` is ``None`` when the model has none).

    Raises:
        ConfigError: unreadable model.
    """
    import gguf
    import sentencepiece as spm

    path = Path(path)
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (OSError, RuntimeError) as e:
        raise ConfigError(f"{path} is not a SentencePiece model: {e}") from e
    user_defined: set[int] = set()
    add_space_prefix = True
    try:
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(path.read_bytes())
        ud = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
        user_defined = {i for i, p in enumerate(proto.pieces) if p.type == ud}
        add_space_prefix = bool(proto.normalizer_spec.add_dummy_prefix)
    except ImportError:  # protobuf missing: user-defined pieces become NORMAL, prefix stays the default
        log.warning("protobuf unavailable: cannot read user-defined pieces / add_dummy_prefix of %s", path)

    tokens, scores, types = [], [], []
    for i in range(sp.GetPieceSize()):
        tokens.append(sp.IdToPiece(i))
        scores.append(float(sp.GetScore(i)))
        if sp.IsUnknown(i):
            t = gguf.TokenType.UNKNOWN
        elif sp.IsControl(i):
            t = gguf.TokenType.CONTROL
        elif sp.IsByte(i):
            t = gguf.TokenType.BYTE
        elif sp.IsUnused(i):
            t = gguf.TokenType.UNUSED
        elif i in user_defined:
            t = gguf.TokenType.USER_DEFINED
        else:
            t = gguf.TokenType.NORMAL
        types.append(int(t))
    pad = sp.pad_id()
    return {
        "tokens": tokens, "scores": scores, "types": types, "bos": sp.bos_id(), "eos": sp.eos_id(),
        "unk": sp.unk_id(), "pad": pad if pad >= 0 else None, "add_space_prefix": add_space_prefix,
    }
