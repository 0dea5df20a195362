"""Caption / answer metrics in two labelled modes, kept apart (docs/model.md section 6).

``compat`` follows the conventions of the scorer behind MU-LLaMA's published numbers:

* BLEU: NLTK ``sentence_bleu`` on the *raw strings*, so the n-grams are character n-grams; BLEU-n
  with uniform cumulative weights ``(1/n, ..., 1/n)``, no smoothing, averaged over pairs; the reported
  "BLEU" is the mean of BLEU-1..4;
* METEOR: NLTK ``meteor_score`` on whitespace-split words (what NLTK did with raw strings when the
  scorer was written), needs the WordNet corpus;
* ROUGE-L: *recall* (``rouge-score``, its default tokenizer, no stemming), averaged over pairs;
* BERTScore: *recall* (``bert-score``, roberta-large layer 17 by default), averaged over pairs.

``standard`` is what the captioning literature usually means:

* BLEU-1..4: NLTK ``corpus_bleu`` on lower-cased word tokens (``\\w+`` and single punctuation marks);
* ROUGE-L: F-measure (same tokenizer as compat);
* BERTScore: F1.

Nothing is downloaded at run time. METEOR needs NLTK's WordNet data and BERTScore needs the
roberta-large weights (or another local model); when they are not on this machine the metric is
reported as ``skipped: <reason>``, never estimated.

BLEU and ROUGE-L use the field's libraries (``nltk``, ``rouge-score``; the ``train`` extra installs them).
"""

from __future__ import annotations

import logging
import random
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MODES = ("compat", "standard")
DEFAULT_BERTSCORE_MODEL = "roberta-large"
_WORD = re.compile(r"\w+|[^\w\s]")


@dataclass(frozen=True)
class Metric:
    """One score, or why it was not computed."""

    name: str
    value: float | None
    skipped: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value} if self.skipped is None else {"value": None, "skipped": self.skipped}

    def __str__(self) -> str:
        return f"{self.value:.4f}" if self.skipped is None else f"skipped: {self.skipped}"


def word_tokens(text: str) -> list[str]:
    """Lower-cased words and single punctuation marks (the ``standard`` mode's tokenizer)."""
    return _WORD.findall(text.lower())


# ------------------------------------------------------------------------------------------- BLEU
def _bleu_weights(n: int) -> tuple[float, ...]:
    return tuple([1.0 / n] * n)


def compat_bleu(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """Mean over pairs of NLTK sentence BLEU-1..4 on raw strings (character n-grams)."""
    from nltk.translate.bleu_score import sentence_bleu

    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NLTK warns for every pair without some n-gram overlap
        for n in range(1, 5):
            scores = [sentence_bleu([r], p, weights=_bleu_weights(n)) if p else 0.0 for p, r in zip(preds, refs)]
            out[f"bleu{n}"] = float(sum(scores) / len(scores))
    return out


def standard_bleu(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """NLTK corpus BLEU-1..4 on word tokens."""
    from nltk.translate.bleu_score import corpus_bleu

    hyps = [word_tokens(p) for p in preds]
    refs_tok = [[word_tokens(r)] for r in refs]
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for n in range(1, 5):
            out[f"bleu{n}"] = float(corpus_bleu(refs_tok, hyps, weights=_bleu_weights(n)))
    return out


# ----------------------------------------------------------------------------------------- ROUGE-L
def rouge_l(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-L precision, recall and F over pairs (``rouge-score``, no stemming)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    p = r = f = 0.0
    for pred, ref in zip(preds, refs):
        s = scorer.score(ref, pred)["rougeL"]
        p, r, f = p + s.precision, r + s.recall, f + s.fmeasure
    n = len(preds)
    return {"precision": p / n, "recall": r / n, "fmeasure": f / n}


# ------------------------------------------------------------------------------------------ METEOR
def wordnet_status() -> tuple[Any, str | None]:
    """(the WordNet reader, None) when NLTK's WordNet data is installed, else (None, reason)."""
    try:
        import nltk
        from nltk.corpus import wordnet
    except ImportError:
        return None, "nltk is not installed (pip install 'mullama-sdk[train]')"
    try:
        wordnet.ensure_loaded()
    except LookupError:
        return None, ("METEOR needs NLTK's WordNet corpus, which is not on this machine and is not downloaded "
                      f"at run time (install it with nltk.download('wordnet') where a network is available; "
                      f"searched: {', '.join(nltk.data.path[:3])} ...)")
    return wordnet, None


def compat_meteor(preds: Sequence[str], refs: Sequence[str]) -> Metric:
    wordnet, reason = wordnet_status()
    if reason is not None:
        return Metric("meteor", None, reason)
    from nltk.translate.meteor_score import meteor_score

    scores = [meteor_score([r.split()], p.split(), wordnet=wordnet) for p, r in zip(preds, refs)]
    return Metric("meteor", float(sum(scores) / len(scores)))


# --------------------------------------------------------------------------------------- BERTScore
@dataclass(frozen=True)
class BertScoreModel:
    """A BERTScore model that is on this machine: a local folder and the layer to read."""

    path: str
    num_layers: int
    name: str


def resolve_bertscore(model: str | None = None, num_layers: int | None = None) -> tuple[BertScoreModel | None, str | None]:
    """Find a BERTScore model without any network access: (model, None) or (None, reason).

    Args:
        model: A local folder (then ``num_layers`` is required) or a hub name looked up in the local
            Hugging Face cache only; default roberta-large (bert-score's English default).
        num_layers: Hidden layer to use; default bert-score's table entry for a known hub name.
    """
    try:
        import bert_score.utils
    except ImportError:
        return None, "bert-score is not installed (pip install 'mullama-sdk[train]')"
    name = model or DEFAULT_BERTSCORE_MODEL
    if Path(name).is_dir():
        if num_layers is None:
            return None, f"a local BERTScore model ({name}) needs its layer count (--bertscore-layers N)"
        return BertScoreModel(str(name), int(num_layers), Path(name).name), None
    layers = num_layers or bert_score.utils.model2layers.get(name)
    if layers is None:
        return None, f"bert-score has no default layer for {name!r}; pass --bertscore-layers N"
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(name, local_files_only=True)
    except Exception:  # LocalEntryNotFoundError and friends: not cached
        return None, (f"the {name} weights BERTScore needs are not in the local Hugging Face cache, and nothing "
                      "is downloaded at run time; pass --bertscore-model DIR (a local copy) to score BERTScore")
    return BertScoreModel(path, int(layers), name), None


def bertscore(preds: Sequence[str], refs: Sequence[str], model: BertScoreModel) -> dict[str, float]:
    """Mean BERTScore precision, recall and F1 over pairs (no idf, no baseline rescaling)."""
    import bert_score

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p, r, f = bert_score.score(list(preds), list(refs), model_type=model.path, num_layers=model.num_layers,
                                   verbose=False, device="cpu", batch_size=16)
    return {"precision": float(p.mean()), "recall": float(r.mean()), "f1": float(f.mean())}


# ------------------------------------------------------------------------------------------- modes
def score(
    preds: Sequence[str],
    refs: Sequence[str],
    *,
    bert: BertScoreModel | None = None,
    bert_skipped: str | None = None,
) -> dict[str, dict[str, Metric]]:
    """Both modes for aligned ``preds`` / ``refs``: ``{"compat": {...}, "standard": {...}}``."""
    if len(preds) != len(refs) or not preds:
        raise ValueError(f"need as many predictions as references, at least one (got {len(preds)}, {len(refs)})")
    cb = compat_bleu(preds, refs)
    sb = standard_bleu(preds, refs)
    rl = rouge_l(preds, refs)
    if bert is not None:
        bs = bertscore(preds, refs, bert)
        bert_r, bert_f = Metric("bertscore_recall", bs["recall"]), Metric("bertscore_f1", bs["f1"])
    else:
        reason = bert_skipped or "no BERTScore model"
        bert_r, bert_f = Metric("bertscore_recall", None, reason), Metric("bertscore_f1", None, reason)
    compat = {
        "bleu": Metric("bleu", sum(cb.values()) / 4),
        **{k: Metric(k, v) for k, v in cb.items()},
        "meteor": compat_meteor(preds, refs),
        "rougeL_recall": Metric("rougeL_recall", rl["recall"]),
        "bertscore_recall": bert_r,
    }
    standard = {
        **{k: Metric(k, v) for k, v in sb.items()},
        "rougeL_f": Metric("rougeL_f", rl["fmeasure"]),
        "bertscore_f1": bert_f,
    }
    return {"compat": compat, "standard": standard}


def derangement(n: int, seed: int) -> list[int]:
    """A seeded random permutation with no fixed point (Sattolo's cycle), ``n >= 2``."""
    if n < 2:
        raise ValueError("a derangement needs at least two items")
    perm = list(range(n))
    rng = random.Random(seed)
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def score_with_control(
    preds: Sequence[str],
    refs: Sequence[str],
    *,
    seed: int = 0,
    bertscore_model: str | None = None,
    bertscore_layers: int | None = None,
) -> dict[str, Any]:
    """Scores of the answers against their references and, as a control, against shuffled references.

    The random-audio control pairs answer ``i`` with the reference of another clip (a seeded
    derangement). A model that listens scores clearly higher on the real pairs; a model that writes
    the same generic text whatever the audio scores about the same on both.

    Returns:
        ``{"n", "compat", "standard", "control": {"compat", "standard", "permutation_seed"}, "gap", "skipped"}``
        with plain floats (``None`` for skipped metrics).
    """
    bert, bert_reason = resolve_bertscore(bertscore_model, bertscore_layers)
    real = score(preds, refs, bert=bert, bert_skipped=bert_reason)
    out: dict[str, Any] = {"n": len(preds), "bertscore_model": None if bert is None else bert.name}
    for mode in MODES:
        out[mode] = {k: m.to_dict() for k, m in real[mode].items()}
    if len(preds) >= 2:
        perm = derangement(len(preds), seed)
        ctrl = score(preds, [refs[j] for j in perm], bert=bert, bert_skipped=bert_reason)
        out["control"] = {"permutation_seed": seed, **{m: {k: v.to_dict() for k, v in ctrl[m].items()} for m in MODES}}
        out["gap"] = {m: {k: (None if real[m][k].value is None else real[m][k].value - ctrl[m][k].value)
                          for k in real[m]} for m in MODES}
    else:
        out["control"] = {"skipped": "the random-audio control needs at least two QA pairs"}
        out["gap"] = {}
    out["skipped"] = sorted({m.skipped for mode in MODES for m in real[mode].values() if m.skipped})
    return out


_LABELS = {
    "compat": [("bleu", "BLEU (avg 1-4, char n-grams)"), ("bleu1", "BLEU-1 (char)"), ("bleu4", "BLEU-4 (char)"),
               ("meteor", "METEOR"), ("rougeL_recall", "ROUGE-L recall"), ("bertscore_recall", "BERTScore recall")],
    "standard": [("bleu1", "BLEU-1 (corpus, words)"), ("bleu2", "BLEU-2"), ("bleu3", "BLEU-3"), ("bleu4", "BLEU-4"),
                 ("rougeL_f", "ROUGE-L F"), ("bertscore_f1", "BERTScore F1")],
}


def format_report(report: dict[str, Any]) -> str:
    """A plain-text table: mode, metric, model, random-audio control, gap."""
    ctrl = report.get("control", {})
    lines = [f"{'mode':<9} {'metric':<30} {'model':>8} {'control':>8} {'gap':>8}"]
    for mode in MODES:
        for key, label in _LABELS[mode]:
            m = report[mode][key]
            if m["value"] is None:
                lines.append(f"{mode:<9} {label:<30} skipped: {m['skipped']}")
                continue
            c = ctrl.get(mode, {}).get(key, {}).get("value")
            gap = report.get("gap", {}).get(mode, {}).get(key)
            cs = f"{c:8.4f}" if c is not None else f"{'-':>8}"
            gs = f"{gap:+8.4f}" if gap is not None else f"{'-':>8}"
            lines.append(f"{mode:<9} {label:<30} {m['value']:8.4f} {cs} {gs}")
    if "skipped" in ctrl:
        lines.append(f"control: skipped: {ctrl['skipped']}")
    lines.append("compat = the published MU-LLaMA scorer's conventions (char-level sentence BLEU, ROUGE-L and BERTScore "
                 "recall); standard = corpus BLEU on words, ROUGE-L F, BERTScore F1. control = the same answers scored "
                 "against the references of other clips: a model that listens scores clearly above it.")
    return "\n".join(lines)
