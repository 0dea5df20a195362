"""``mullama-train eval`` and the metrics: both labelled modes, the random-audio control, honest skips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.evaluation.metrics import (
    compat_bleu,
    derangement,
    resolve_bertscore,
    rouge_l,
    score_with_control,
    standard_bleu,
    wordnet_status,
)

ROOT = Path(__file__).parents[1]
TINY_JSON = ROOT / "training" / "configs" / "tiny_musicqa.json"


def test_compat_bleu_counts_characters_and_standard_counts_words():
    # "abc" vs "abd": 2 of 3 character unigrams match, equal lengths (no brevity penalty).
    assert compat_bleu(["abc"], ["abd"])["bleu1"] == pytest.approx(2 / 3)
    # "the cat sat" vs "the cat ran": 2 of 3 words; as characters 10 of 11 match.
    assert standard_bleu(["the cat sat"], ["the cat ran"])["bleu1"] == pytest.approx(2 / 3)
    assert compat_bleu(["the cat sat"], ["the cat ran"])["bleu1"] == pytest.approx(9 / 11)
    assert compat_bleu([""], ["abc"])["bleu1"] == 0.0
    r = rouge_l(["a b c d"], ["a b x"])  # LCS 2: recall 2/3, precision 2/4
    assert (r["recall"], r["precision"]) == (pytest.approx(2 / 3), pytest.approx(0.5))


def test_derangement_moves_every_item():
    for n in (2, 3, 10):
        perm = derangement(n, seed=n)
        assert sorted(perm) == list(range(n)) and all(perm[i] != i for i in range(n))
    assert derangement(10, seed=1) == derangement(10, seed=1)


def test_offline_metrics_are_skipped_with_a_reason():
    report = score_with_control(["a slow piece", "a fast song"], ["a slow dark piece", "a bright fast song"])
    wordnet, why = wordnet_status()
    meteor = report["compat"]["meteor"]
    if wordnet is None:
        assert meteor["value"] is None and "WordNet" in meteor["skipped"] and "not downloaded" in why
    else:
        assert 0 <= meteor["value"] <= 1
    bert, reason = resolve_bertscore()
    if bert is None:
        assert report["compat"]["bertscore_recall"] == {"value": None, "skipped": reason}
        assert report["standard"]["bertscore_f1"]["skipped"] == reason and reason in report["skipped"]
    assert report["gap"]["standard"]["rougeL_f"] > 0


def test_bertscore_with_a_local_model(tmp_path):
    """The BERTScore path on a tiny local BERT (random weights): identical texts score 1."""
    pytest.importorskip("bert_score")
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    words = "[PAD] [UNK] [CLS] [SEP] [MASK] a slow dark piece bright fast song with drums .".split()
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(tmp_path / "vocab.txt"), model_max_length=64).save_pretrained(tmp_path)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(tmp_path)
    assert resolve_bertscore(str(tmp_path))[0] is None  # a folder needs its layer count
    report = score_with_control(["a slow dark piece", "a bright fast song"], ["a slow dark piece", "a bright fast song"],
                                bertscore_model=str(tmp_path), bertscore_layers=2)
    assert report["compat"]["bertscore_recall"]["value"] == pytest.approx(1.0, abs=1e-5)
    assert report["standard"]["bertscore_f1"]["value"] == pytest.approx(1.0, abs=1e-5)
    assert report["control"]["standard"]["bertscore_f1"]["value"] < 1.0
    assert report["compat"]["rougeL_recall"]["value"] == 1.0 and report["standard"]["bleu4"]["value"] == 1.0


def test_eval_command_reports_both_modes_and_the_control(tiny_assets, tmp_path, capsys):
    from training.cli import main

    out = tmp_path / "report.json"
    args = ["eval", "--data", str(TINY_JSON), "--audio-dir", str(tiny_assets.root / "audio"),
            "--checkpoint", str(tiny_assets.checkpoint), "--llama-dir", str(tiny_assets.llama_dir),
            "--mert-dir", str(tiny_assets.mert_dir), "--max-new-tokens", "12", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    text = capsys.readouterr().out
    for label in ("compat", "standard", "BLEU (avg 1-4, char n-grams)", "ROUGE-L recall", "ROUGE-L F",
                  "BLEU-4", "control"):
        assert label in text
    report = json.loads(out.read_text())
    assert report["n"] == 4 and report["answers_from"].startswith("torch reference")
    for mode, keys in (("compat", ("bleu", "bleu1", "bleu4", "rougeL_recall")), ("standard", ("bleu1", "rougeL_f"))):
        for key in keys:
            assert 0 <= report[mode][key]["value"] <= 1
            assert 0 <= report["control"][mode][key]["value"] <= 1
    records = [json.loads(line) for line in out.with_name("report.json.predictions.jsonl").read_text().splitlines()]
    assert [r["question"] for r in records] == ["Describe the audio", "What do you hear in the audio?",
                                                "Describe the audio in detail", "What is a tempo?"]
    # Re-scoring saved answers gives the same report without generating again.
    assert main(["eval", "--data", str(TINY_JSON), "--predictions", str(out.with_name("report.json.predictions.jsonl")),
                 "--out", str(tmp_path / "again.json")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["compat"] == report["compat"] and again["control"] == report["control"]
    capsys.readouterr()
    assert main(["eval", "--data", str(TINY_JSON), "--bundle", "x", "--predictions", "y"]) == 2
    assert "exactly one of" in capsys.readouterr().err
