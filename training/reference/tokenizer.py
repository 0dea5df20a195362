"""SentencePiece tokenizer of the reference model (the runtime uses llama.cpp's own, tested equal)."""

from __future__ import annotations

import io
from collections.abc import Iterable
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
        """``[BOS] + SentencePiece(prompt)``, exactly as docs/model.md section 4 builds it."""
        return [self.bos_id, *self.encode(format_prompt(question))]

    def decode(self, ids: list[int]) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])


def train_llama_tokenizer(lines: Iterable[str], vocab_size: int, *, hard_vocab_limit: bool = True) -> bytes:
    """Train a BPE SentencePiece model with LLaMA's conventions; returns the ``tokenizer.model`` bytes.

    Identity normalisation, kept whitespace and byte fallback are what make SentencePiece and llama.cpp
    tokenize the prompt the same way (docs/model.md section 2); ids 0/1/2 are unk/BOS/EOS as in LLaMA. One thread
    and unshuffled input keep the output byte-identical across runs. ``lines`` must not contain newlines
    (a newline is never a character piece; it is encoded as the byte piece ``<0x0A>``). With
    ``hard_vocab_limit=False``, ``vocab_size`` is an upper bound: a small corpus gets fewer pieces.
    """
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        num_threads=1,
        shuffle_input_sentence=False,
        hard_vocab_limit=hard_vocab_limit,
        minloglevel=2,
    )
    return model.getvalue()
