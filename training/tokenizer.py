"""SentencePiece tokenizer of the reference model (the runtime uses llama.cpp's own, tested equal)."""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm

from mullama_sdk.errors import ConfigError
from mullama_sdk.prompt import format_prompt


class Tokenizer:
    """LLaMA's ``tokenizer.model``: ids for the MU-LLaMA prompt, text for generated ids."""

    def __init__(self, path: Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"tokenizer not found: {path} (a LLaMA folder has tokenizer.model)")
        self.path = path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise ConfigError(f"{path} is not a SentencePiece model: {e}") from e
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ConfigError(f"{path} defines no BOS/EOS pieces (LLaMA's are ids 1 and 2)")

    @property
    def n_vocab(self) -> int:
        return self.sp.GetPieceSize()

    def encode(self, text: str) -> list[int]:
        return list(self.sp.EncodeAsIds(text))

    def encode_prompt(self, question: str | None = None) -> list[int]:
        """``[BOS] + SentencePiece(prompt)``, exactly as the spec's section 4 builds it."""
        return [self.bos_id, *self.encode(format_prompt(question))]

    def decode(self, ids: list[int]) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])
