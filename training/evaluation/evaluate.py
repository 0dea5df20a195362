"""``mullama-train eval``: answer the questions of a MusicQA-format JSON and score the answers.

Answers come from the torch reference (``--checkpoint`` + ``--llama-dir`` + ``--mert-dir``), from an
exported bundle through the SDK (``--bundle``), or from a file of earlier answers
(``--predictions``). Scores are reported in two labelled modes (see :mod:`training.evaluation.metrics`):
``compat`` (the published scorer's conventions) and ``standard``, each next to a random-audio
control (the same answers against the references of other clips) so that one sees whether the
model listens. Text-only items are answered with one second of silence, as in training.

    mullama-train eval --data eval.json --audio-dir DIR --checkpoint CKPT --llama-dir DIR --mert-dir DIR
    mullama-train eval --data eval.json --audio-dir DIR --bundle BUNDLE --out report.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mullama_sdk.commandline import run_command
from mullama_sdk.constants import SAMPLE_RATE_HZ
from mullama_sdk.errors import ConfigError, MullamaError
from training.recipes.data import QAPair, clip_paths, load_qa_json, silence

log = logging.getLogger(__name__)

PROG = "mullama-train eval"

#: An answerer: (audio file or None for silence, question) -> answer text.
Answerer = Callable[[Path | None, str], str]


def reference_answerer(model, *, max_new_tokens: int, temperature: float, top_p: float,
                       seed: int | None) -> Answerer:
    """Answers from a :class:`training.reference.model.MullamaModel` (the torch reference)."""

    def answer(audio: Path | None, question: str) -> str:
        kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        if audio is None:
            return model.generate(silence(), question, sample_rate=SAMPLE_RATE_HZ, **kw).text
        return model.generate(audio, question, **kw).text

    return answer


def bundle_answerer(captioner, *, max_new_tokens: int, temperature: float, top_p: float,
                    seed: int | None) -> Answerer:
    """Answers from an SDK :class:`mullama_sdk.Captioner` on an exported bundle."""

    def answer(audio: Path | None, question: str) -> str:
        kw = dict(question=question, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        if audio is None:
            return captioner.caption(silence(), sample_rate=SAMPLE_RATE_HZ, **kw).text
        return captioner.caption(audio, **kw).text

    return answer


def generate_answers(pairs: Sequence[QAPair], audio_dir: Path, answer: Answerer, *,
                     progress: bool = True) -> list[dict[str, Any]]:
    """One record per pair: audio, question, reference, answer (in the order of ``pairs``)."""
    from tqdm import tqdm

    paths = clip_paths(pairs, audio_dir)
    out = []
    for pair in tqdm(pairs, desc="answering", unit="pair", disable=not progress):
        out.append({"audio_name": pair.audio_name, "question": pair.question, "reference": pair.answer,
                    "prediction": answer(paths[pair.clip_key], pair.question)})
    return out


def read_predictions(path: Path, pairs: Sequence[QAPair]) -> list[dict[str, Any]]:
    """Records written by an earlier run (JSON lines), checked against the eval pairs."""
    try:
        records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read predictions {path}: {e}") from e
    if len(records) != len(pairs):
        raise ConfigError(f"{path} has {len(records)} predictions for {len(pairs)} QA pairs")
    for i, (rec, pair) in enumerate(zip(records, pairs)):
        if rec.get("question") != pair.question or "prediction" not in rec:
            raise ConfigError(f"{path} line {i + 1} does not answer QA pair {i} ({pair.question!r})")
        rec["reference"] = pair.answer
    return records


def evaluate(records: Sequence[dict[str, Any]], *, control_seed: int = 0, bertscore_model: str | None = None,
             bertscore_layers: int | None = None) -> dict[str, Any]:
    """Score prediction records (both modes + random-audio control)."""
    from training.evaluation.metrics import score_with_control

    return score_with_control([r["prediction"] for r in records], [r["reference"] for r in records],
                              seed=control_seed, bertscore_model=bertscore_model, bertscore_layers=bertscore_layers)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, type=Path, help="MusicQA-format eval JSON")
    p.add_argument("--audio-dir", type=Path, help="folder audio_name is relative to (default: the JSON's folder)")
    src = p.add_argument_group("where the answers come from (one of)")
    src.add_argument("--checkpoint", type=Path, help="checkpoint for the torch reference (with --llama-dir, --mert-dir)")
    src.add_argument("--llama-dir", type=Path)
    src.add_argument("--mert-dir", type=Path)
    src.add_argument("--bundle", type=Path, help="exported bundle, run through the SDK")
    src.add_argument("--predictions", type=Path, help="JSON lines of an earlier run (score only)")
    p.add_argument("--out", type=Path, help="write the report JSON here (answers go to OUT.predictions.jsonl)")
    p.add_argument("--limit", type=int, help="only the first N QA pairs")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default, reproducible)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampler seed (with --temperature > 0)")
    p.add_argument("--control-seed", type=int, default=0, help="seed of the shuffled references of the control")
    p.add_argument("--bertscore-model", help="local model folder or hub name found in the local cache "
                   "(default roberta-large; never downloaded)")
    p.add_argument("--bertscore-layers", type=int, help="layer of --bertscore-model to use")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow arbitrary unpickling of --checkpoint")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    """``mullama-train eval``: errors raised here are reported by :mod:`mullama_sdk.commandline`."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        chosen = [x for x in ("checkpoint", "bundle", "predictions") if getattr(args, x) is not None]
        if len(chosen) != 1:
            raise ConfigError("give exactly one of --checkpoint (with --llama-dir, --mert-dir), --bundle, --predictions")
        if args.checkpoint and not (args.llama_dir and args.mert_dir):
            raise ConfigError("--checkpoint needs --llama-dir and --mert-dir")
        pairs = load_qa_json(args.data)
        if args.limit is not None:
            pairs = pairs[: args.limit]
        audio_dir = args.audio_dir or args.data.parent
        t0 = time.perf_counter()
        kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
        if args.predictions:
            records, source = read_predictions(args.predictions, pairs), f"predictions {args.predictions}"
        elif args.bundle:
            from mullama_sdk import Captioner

            with Captioner.from_pretrained(args.bundle) as cap:
                records = generate_answers(pairs, audio_dir, bundle_answerer(cap, **kw), progress=not args.no_progress)
            source = f"bundle {args.bundle}"
        else:
            from training.reference.build import load_reference

            model = load_reference(args.checkpoint, args.llama_dir, args.mert_dir, trust_pickle=args.trust_checkpoint)
            records = generate_answers(pairs, audio_dir, reference_answerer(model, **kw), progress=not args.no_progress)
            source = f"torch reference {args.checkpoint}"
        gen_s = time.perf_counter() - t0
        report = evaluate(records, control_seed=args.control_seed, bertscore_model=args.bertscore_model,
                          bertscore_layers=args.bertscore_layers)
    except MullamaError:
        raise
    except ValueError as e:  # bad generation settings or a malformed file: a usage error, not a bug
        raise ConfigError(str(e)) from e
    report.update({"data": str(args.data), "answers_from": source, "generation": kw,
                   "generation_seconds": round(gen_s, 2)})
    from training.evaluation.metrics import format_report

    print(f"{len(records)} QA pairs from {args.data}; answers from {source}")
    print(format_report(report))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        if not args.predictions:
            preds = args.out.with_name(args.out.name + ".predictions.jsonl")
            preds.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        print(f"report: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(PROG, main, sys.argv[1:]))
