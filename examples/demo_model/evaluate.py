"""``make demo-eval``: how well the demo bundle describes held-out music, against honest baselines.

    python -m examples.demo_model.evaluate [--bundle examples/demo_bundle] [--data DIR] [--limit N]

Runs the SDK exactly as a user would (ONNX Runtime encoder, llama.cpp with the music hook, greedy) on every
held-out clip of the demo data (pieces never seen in training; rendered first if ``--data`` has none):

* **instrument family**: the caption for "Describe the audio" names a family when it contains one of that
  family's words (:data:`examples.demo_model.facts.FAMILIES`); the first family named counts
  (:func:`examples.demo_model.facts.first_mentioned`). Chance = 1 / number
  of families; the target is at least 3x chance.
* **tempo**: the answer to "What is the tempo of this music?" names a tempo class (its first class word
  counts). The baseline is the majority-class guess: always answering the training split's most frequent
  tempo class, scored on the same held-out clips; the target is to beat it.

Each accuracy is printed with the chance of reaching it by luck (one-sided binomial p-value against the
baseline's rate): 98 clips are few, and a couple of lucky answers can carry a small margin.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BUNDLE = ROOT / "examples" / "demo_bundle"
DEFAULT_DATA = ROOT / ".demo_work" / "data"
CAPTION_QUESTION = "Describe the audio"
TEMPO_QUESTION = "What is the tempo of this music?"


def confusion_table(pairs: list[tuple[str, str | None]], labels: list[str]) -> str:
    width = max(len(x) for x in [*labels, "(none)", "truth \\ said"]) + 1
    cols = [*labels, "(none)"]
    lines = ["truth \\ said".ljust(width) + "".join(c[:8].rjust(9) for c in cols)]
    for truth in labels:
        counts = Counter(said for t, said in pairs if t == truth)
        lines.append(truth.ljust(width) + "".join(str(counts.get(c if c != "(none)" else None, 0)).rjust(9)
                                                   for c in cols))
    return "\n".join(lines)


def p_at_least(hits: int, n: int, rate: float) -> float:
    """P(X >= hits) for X ~ Binomial(n, rate): how likely a guesser right at ``rate`` scores this well."""
    return min(1.0, sum(math.comb(n, k) * rate**k * (1 - rate) ** (n - k) for k in range(hits, n + 1)))


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m examples.demo_model.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="demo data folder (rendered if missing)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N held-out clips")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--show", type=int, default=6, help="print this many example captions")
    args = ap.parse_args(argv)

    from examples.demo_model.dataset import build_demo_data
    from examples.demo_model.facts import FAMILIES, TEMPO_CLASSES, TEMPO_WORDS, first_mentioned
    from mullama_sdk import Captioner

    if not (args.bundle / "mullama.json").is_file():       # before minutes of rendering
        print(f"error: no bundle at {args.bundle}; rebuild the demo model with `make demo-model`", file=sys.stderr)
        return 2
    if not (args.data / "clips.json").is_file():
        print(f"rendering the demo data into {args.data} (a few minutes) ...", flush=True)
        build_demo_data(args.data)
    clips = json.loads((args.data / "clips.json").read_text())
    train = [c for c in clips if c["split"] == "train"]
    heldout = sorted((c for c in clips if c["split"] != "train"), key=lambda c: c["clip_id"])[: args.limit]

    fam_pairs: list[tuple[str, str | None]] = []
    tempo_pairs: list[tuple[str, str | None]] = []
    shown = 0
    t0 = time.perf_counter()
    with Captioner.from_pretrained(args.bundle, n_threads=args.threads) as cap:
        print(f"bundle {args.bundle}: encoder {cap.manifest.default_encoder_precision}, "
              f"LLM {cap.manifest.default_quant}; {len(heldout)} held-out clips from "
              f"{len({c['piece'] for c in heldout})} pieces never seen in training\n", flush=True)
        for c in heldout:
            vec = cap.encode(args.data / "audio" / f"{c['clip_id']}.wav")
            caption = cap.ask(vec, CAPTION_QUESTION, max_new_tokens=48, temperature=0).text
            tempo = cap.ask(vec, TEMPO_QUESTION, max_new_tokens=16, temperature=0).text
            fam_pairs.append((c["family"], first_mentioned(caption, FAMILIES)))
            tempo_pairs.append((c["tempo_class"], first_mentioned(tempo, TEMPO_WORDS)))
            if shown < args.show:
                shown += 1
                print(f"{c['clip_id']} (truth: {c['family']}, {c['tempo_class']} {c['bpm']} BPM)\n"
                      f"    caption: {caption!r}\n    tempo:   {tempo!r}")
    seconds = time.perf_counter() - t0

    families = sorted(FAMILIES)
    n = len(heldout)
    fam_acc = sum(t == s for t, s in fam_pairs) / n
    chance = 1 / len(families)
    majority_tempo, _ = Counter(c["tempo_class"] for c in train).most_common(1)[0]
    tempo_acc = sum(t == s for t, s in tempo_pairs) / n
    majority_acc = sum(c["tempo_class"] == majority_tempo for c in heldout) / n

    print(f"\ninstrument family named in the caption ({n} clips):\n{confusion_table(fam_pairs, families)}")
    print(f"\ntempo class in the answer ({n} clips):\n{confusion_table(tempo_pairs, list(TEMPO_CLASSES))}")
    fam_ok = fam_acc >= 3 * chance
    tempo_ok = tempo_acc > majority_acc
    fam_hits, tempo_hits = sum(t == s for t, s in fam_pairs), sum(t == s for t, s in tempo_pairs)
    print(f"\nfamily accuracy {fam_acc:.1%} ({fam_hits}/{n}) vs chance {chance:.1%} ({len(families)} families): "
          f"{fam_acc / chance:.2f}x chance  [target >= 3x: {'met' if fam_ok else 'NOT met'}]"
          f"  (p = {p_at_least(fam_hits, n, chance):.1e} by luck)")
    print(f"tempo accuracy {tempo_acc:.1%} ({tempo_hits}/{n}) vs majority-class guess {majority_acc:.1%} (always "
          f"{majority_tempo!r})  [target: beat it: {'met' if tempo_ok else 'NOT met'}]"
          f"  (p = {p_at_least(tempo_hits, n, majority_acc):.1e} at the majority rate)")
    print(f"({seconds:.0f} s for {n} clips, {2 * n} generations)")
    return 0 if fam_ok and tempo_ok else 1


def main(argv: list[str] | None = None) -> int:
    from examples.demo_model.cli import run_main

    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
