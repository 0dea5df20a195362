"""MusicQA-format training data: question/answer pairs about clips, tokenised the way MU-LLaMA trains.

The JSON file is a list of items (docs/model.md section 5)::

    [{"audio_name": "x.wav",
      "conversation": [{"from": "human", "value": Q}, {"from": "gpt", "value": A}, ...]}]

``audio_name`` is relative to an audio folder. An item without one (missing, ``null`` or ``""``) is
text-only: it is paired with one second of silence, as the published recipe does. Every
human -> gpt turn of a conversation becomes one example with the single-instruction prompt of
docs/model.md section 4 (the prompt has no place for earlier turns).

One example is ``[BOS] + tokens(prompt(Q)) + tokens(A) + [EOS]``; its labels are the answer tokens
and the EOS, ``-100`` (ignored) everywhere else. Examples longer than ``max_words`` tokens lose the
end of their answer (and then their EOS: the cut answer did not end there); the prompt is kept whole.
An example whose prompt alone leaves no room for one answer token teaches nothing and is dropped.
Both counts are reported.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mullama_sdk.constants import SAMPLE_RATE_HZ
from mullama_sdk.errors import ConfigError
from mullama_sdk.prompt import format_prompt
from training.reference.tokenizer import Tokenizer

log = logging.getLogger(__name__)

#: Label of positions that carry no loss (torch's ``cross_entropy`` default ``ignore_index``).
IGNORE_INDEX = -100
#: Text-only items are paired with this much silence (docs/model.md section 5).
SILENCE_SECONDS = 1.0
#: Feature-cache name of the silence clip; no audio file can be called this (``<`` is not a path start).
SILENCE_KEY = "<silence:1s>"
#: The published recipe's sequence limits.
MAX_WORDS_PRETRAIN = 96
MAX_WORDS_FINETUNE = 512


def silence() -> np.ndarray:
    """The waveform text-only items use: :data:`SILENCE_SECONDS` of zeros at 24 kHz, float32."""
    return np.zeros(round(SILENCE_SECONDS * SAMPLE_RATE_HZ), dtype=np.float32)


@dataclass(frozen=True)
class QAPair:
    """One human -> gpt turn of a MusicQA item.

    Attributes:
        audio_name: The clip, relative to the audio folder; ``None`` for text-only items.
        question: The human turn.
        answer: The gpt turn.
        item: Index of the item in the JSON list (for error messages).
    """

    audio_name: str | None
    question: str
    answer: str
    item: int

    @property
    def clip_key(self) -> str:
        """The feature-cache key: the audio name, or :data:`SILENCE_KEY` for text-only pairs."""
        return self.audio_name or SILENCE_KEY


def load_qa_json(path: Path) -> list[QAPair]:
    """Read a MusicQA-format JSON file into question/answer pairs, checking its structure.

    Raises:
        ConfigError: unreadable file or an item that is not in the format; the message names the item.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read QA data {path}: {e}") from e
    if not isinstance(raw, list):
        raise ConfigError(f"{path}: expected a JSON list of items, got {type(raw).__name__}")
    pairs: list[QAPair] = []
    for i, item in enumerate(raw):
        where = f"{path} item {i}"
        if not isinstance(item, dict) or not isinstance(item.get("conversation"), list):
            raise ConfigError(f"{where}: expected {{'audio_name': ..., 'conversation': [...]}}")
        audio = item.get("audio_name") or None
        if audio is not None and not isinstance(audio, str):
            raise ConfigError(f"{where}: audio_name must be a string or null, got {audio!r}")
        turns = item["conversation"]
        question: str | None = None
        for j, turn in enumerate(turns):
            if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
                raise ConfigError(f"{where} turn {j}: expected {{'from': 'human'|'gpt', 'value': str}}")
            who = turn.get("from")
            if who == "human":
                if question is not None:
                    raise ConfigError(f"{where} turn {j}: two human turns in a row")
                question = turn["value"]
            elif who == "gpt":
                if question is None:
                    raise ConfigError(f"{where} turn {j}: a gpt turn without a human turn before it")
                if not question.strip():
                    raise ConfigError(f"{where}: empty question")
                pairs.append(QAPair(audio, question, turn["value"], i))
                question = None
            else:
                raise ConfigError(f"{where} turn {j}: 'from' is {who!r}; expected 'human' or 'gpt'")
        if question is not None:
            raise ConfigError(f"{where}: the last human turn has no gpt answer")
    if not pairs:
        raise ConfigError(f"{path}: no question/answer pairs")
    return pairs


def clip_paths(pairs: Sequence[QAPair], audio_dir: Path) -> dict[str, Path | None]:
    """Feature-cache key -> audio file (``None``: silence), checking that every file exists.

    Raises:
        ConfigError: missing audio files (the first few are named, with the total).
    """
    audio_dir = Path(audio_dir)
    out: dict[str, Path | None] = {}
    missing = []
    for pair in pairs:
        if pair.clip_key in out:
            continue
        if pair.audio_name is None:
            out[SILENCE_KEY] = None
            continue
        path = audio_dir / pair.audio_name
        if not path.is_file():
            missing.append(pair.audio_name)
        out[pair.clip_key] = path
    if missing:
        shown = ", ".join(missing[:5])
        raise ConfigError(f"{len(missing)} audio file(s) not found under {audio_dir}: {shown}"
                          f"{' ...' if len(missing) > 5 else ''}")
    return out


@dataclass(frozen=True)
class Encoded:
    """A tokenised example. ``labels[t]`` is the target of position ``t`` (predicted from ``t - 1``)."""

    tokens: list[int]
    labels: list[int]
    truncated: bool


def encode_pair(tokenizer: Tokenizer, question: str, answer: str, max_words: int) -> Encoded | None:
    """``[BOS] + prompt(Q) + A + [EOS]`` with labels on ``A`` and EOS; ``None`` if the prompt fills ``max_words``."""
    prompt = [tokenizer.bos_id, *tokenizer.encode(format_prompt(question))]
    target = [*tokenizer.encode(answer), tokenizer.eos_id]
    if len(prompt) >= max_words:
        return None
    truncated = len(prompt) + len(target) > max_words
    target = target[: max_words - len(prompt)]
    return Encoded(prompt + target, [IGNORE_INDEX] * len(prompt) + target, truncated)


@dataclass(frozen=True)
class Example:
    """An encoded pair and the clip whose features it uses."""

    clip_key: str
    tokens: list[int]
    labels: list[int]


@dataclass(frozen=True)
class EncodeReport:
    n_pairs: int
    n_truncated: int
    n_dropped: int

    def __str__(self) -> str:
        return (f"{self.n_pairs} QA pairs: {self.n_truncated} truncated (answer cut to max_words), "
                f"{self.n_dropped} dropped (prompt alone reaches max_words)")


def encode_pairs(
    pairs: Sequence[QAPair], tokenizer: Tokenizer, max_words: int
) -> tuple[list[Example], EncodeReport]:
    """Tokenise every pair; report how many were truncated or dropped.

    Raises:
        ConfigError: ``max_words`` < 2, or every pair dropped.
    """
    if max_words < 2:
        raise ConfigError(f"max_words must be >= 2, got {max_words}")
    examples, truncated, dropped = [], 0, 0
    for pair in pairs:
        enc = encode_pair(tokenizer, pair.question, pair.answer, max_words)
        if enc is None:
            dropped += 1
            continue
        truncated += enc.truncated
        examples.append(Example(pair.clip_key, enc.tokens, enc.labels))
    report = EncodeReport(len(pairs), truncated, dropped)
    if not examples:
        raise ConfigError(f"every example was dropped: {report}; raise max_words")
    return examples, report


class QADataset(torch.utils.data.Dataset):
    """Examples with their cached MERT state means (see :mod:`training.recipes.features`)."""

    def __init__(self, examples: Sequence[Example], features) -> None:
        self.examples = list(examples)
        self.features = features
        missing = sorted({e.clip_key for e in self.examples} - set(features.keys()))
        if missing:
            raise ConfigError(f"the feature cache lacks {len(missing)} clip(s), e.g. {missing[:3]}; "
                              "run `mullama-train features` (or let the recipe build them)")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ex = self.examples[i]
        return {
            "state_means": torch.from_numpy(np.array(self.features.get(ex.clip_key), dtype=np.float32)),
            "tokens": torch.tensor(ex.tokens, dtype=torch.long),
            "labels": torch.tensor(ex.labels, dtype=torch.long),
        }


def collate(batch: Sequence[dict[str, torch.Tensor]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Stack a batch, right-padding tokens with ``pad_id`` and labels with :data:`IGNORE_INDEX`.

    Right padding changes nothing for the real positions: attention is causal.
    """
    longest = max(len(b["tokens"]) for b in batch)
    tokens = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), longest), IGNORE_INDEX, dtype=torch.long)
    for i, b in enumerate(batch):
        tokens[i, : len(b["tokens"])] = b["tokens"]
        labels[i, : len(b["labels"])] = b["labels"]
    return {"state_means": torch.stack([b["state_means"] for b in batch]), "tokens": tokens, "labels": labels}
