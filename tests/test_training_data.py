"""MusicQA-format data: parsing, the token sequence and its labels, truncation, batching."""

from __future__ import annotations

import json

import pytest
import torch

from mullama_sdk.errors import ConfigError
from training.recipes.data import (
    IGNORE_INDEX,
    SILENCE_KEY,
    clip_paths,
    collate,
    encode_pair,
    encode_pairs,
    load_qa_json,
    silence,
)
from training.reference.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tiny_assets):
    return Tokenizer(tiny_assets.tokenizer)


def _write(tmp_path, items):
    path = tmp_path / "qa.json"
    path.write_text(json.dumps(items))
    return path


def test_pairs_from_items(tmp_path):
    path = _write(tmp_path, [
        {"audio_name": "a.wav", "conversation": [{"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A1"},
                                                 {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "A2"}]},
        {"audio_name": None, "conversation": [{"from": "human", "value": "Q3"}, {"from": "gpt", "value": "A3"}]},
        {"conversation": [{"from": "human", "value": "Q4"}, {"from": "gpt", "value": "A4"}]},
    ])
    pairs = load_qa_json(path)
    assert [(p.audio_name, p.question, p.answer, p.item) for p in pairs] == [
        ("a.wav", "Q1", "A1", 0), ("a.wav", "Q2", "A2", 0), (None, "Q3", "A3", 1), (None, "Q4", "A4", 2)]
    assert pairs[2].clip_key == SILENCE_KEY
    assert silence().shape == (24000,) and not silence().any()


@pytest.mark.parametrize("items, message", [
    ({"audio_name": "a.wav"}, "expected a JSON list"),
    ([{"audio_name": "a.wav", "conversation": [{"from": "gpt", "value": "A"}]}], "item 0 turn 0: a gpt turn without"),
    ([{"audio_name": "a.wav", "conversation": [{"from": "user", "value": "Q"}]}], "'from' is 'user'"),
    ([{"audio_name": "a.wav", "conversation": [{"from": "human", "value": "Q"}]}], "item 0: the last human turn"),
    ([{"audio_name": 3, "conversation": []}], "audio_name must be a string"),
    ([], "no question/answer pairs"),
])
def test_malformed_data_is_named(tmp_path, items, message):
    with pytest.raises(ConfigError, match=message):
        load_qa_json(_write(tmp_path, items))


def test_missing_audio_files_are_listed(tmp_path):
    path = _write(tmp_path, [{"audio_name": f"x{i}.wav", "conversation": [
        {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]} for i in range(7)])
    with pytest.raises(ConfigError, match=r"7 audio file\(s\) not found under .*x0.wav, x1.wav.* \.\.\."):
        clip_paths(load_qa_json(path), tmp_path)


def test_sequence_and_labels(tok):
    enc = encode_pair(tok, "Describe the audio", "A slow piece.", 512)
    prompt = tok.encode_prompt("Describe the audio")  # [BOS] + SentencePiece(prompt), as at inference
    answer = tok.encode("A slow piece.")
    assert enc.tokens == [*prompt, *answer, tok.eos_id]
    assert enc.labels == [IGNORE_INDEX] * len(prompt) + [*answer, tok.eos_id]
    assert not enc.truncated


def test_truncation_keeps_the_prompt(tok):
    prompt = tok.encode_prompt("Describe the audio")
    answer = tok.encode("A slow and dark piece in a minor key with soft drums.")
    enc = encode_pair(tok, "Describe the audio", "A slow and dark piece in a minor key with soft drums.", len(prompt) + 3)
    assert enc.truncated and enc.tokens == [*prompt, *answer[:3]]  # cut answer: no EOS taught there
    assert enc.labels[len(prompt):] == answer[:3]
    assert encode_pair(tok, "Describe the audio", "x", len(prompt)) is None  # no room for one answer token

    from training.recipes.data import QAPair

    short = "Slow."
    limit = len(prompt) + len(tok.encode(short)) + 1  # the short answer and its EOS just fit
    qa = [QAPair("a.wav", "Describe the audio", "A slow and dark piece in a minor key.", 0),
          QAPair("a.wav", "Describe the audio", short, 1),
          QAPair(None, "Describe the audio " * 40, "x", 2)]
    examples, report = encode_pairs(qa, tok, limit)
    assert (report.n_pairs, report.n_truncated, report.n_dropped) == (3, 1, 1) and len(examples) == 2
    assert examples[1].tokens[-1] == tok.eos_id and len(examples[1].tokens) == limit
    assert "1 truncated" in str(report) and "1 dropped" in str(report)
    with pytest.raises(ConfigError, match="every example was dropped"):
        encode_pairs(qa[2:], tok, limit)


def test_collate_pads_right(tok):
    a = encode_pair(tok, "Describe the audio", "Slow.", 512)
    b = encode_pair(tok, "Describe the audio", "A much longer answer about drums.", 512)
    batch = collate([{"state_means": torch.zeros(3, 2), "tokens": torch.tensor(e.tokens),
                      "labels": torch.tensor(e.labels)} for e in (a, b)], pad_id=7)
    n = len(a.tokens)
    assert batch["tokens"].shape == (2, len(b.tokens)) and batch["state_means"].shape == (2, 3, 2)
    assert batch["tokens"][0, :n].tolist() == a.tokens and (batch["tokens"][0, n:] == 7).all()
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all() and batch["labels"][1].tolist() == b.labels
