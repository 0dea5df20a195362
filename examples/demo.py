"""``make demo``: caption the example clips with the demo model and answer a question, with timings.

The demo bundle (``examples/demo_bundle``, 9.8 MiB, committed) is a small MU-LLaMA-architecture model
trained on this kind of machine by ``python -m examples.demo_model.train`` (``make demo-model`` rebuilds it bit
for bit): a 4-layer LLaMA-architecture LM and a 4-layer HuBERT (= MERT) encoder trained on a few hundred
clips rendered from music21's scores with fluidsynth. It knows instrument families, tempo, key, era
and solo/ensemble of General MIDI renderings - nothing like real MU-LLaMA's knowledge of music, but
every step is the real pipeline: ONNX Runtime encoder -> adapter -> llama.cpp with the music hook.
``make demo-eval`` measures it on held-out pieces.

    python -m examples.demo [--bundle DIR] [--question TEXT] [AUDIO ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = ROOT / "examples" / "demo_bundle"
CLIPS = ROOT / "examples" / "clips"
DEFAULT_QUESTION = "What is the tempo of this music?"


def example_clips() -> list[Path]:
    return sorted(CLIPS.glob("*.wav"))


def truth_of(clip: Path) -> str:
    """What the example clip really is (from ``examples/clips/clips.json``), for printing beside the caption."""
    facts_file = CLIPS / "clips.json"
    if not facts_file.is_file():
        return ""
    for f in json.loads(facts_file.read_text()):
        if f.get("clip_id") == clip.stem:
            return (f"{f['family']}, {f['tempo_class']} ({f['bpm']} BPM), {f['key']}, {f['era']}, "
                    f"{'solo' if f['solo'] else 'ensemble'}{', drums' if f['drums'] else ''}")
    return ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m examples.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("audio", nargs="*", type=Path, help="clips to caption (default: examples/clips/*.wav)")
    ap.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    ap.add_argument("--question", default=DEFAULT_QUESTION, help="asked about the first clip")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("llama_cpp.native").setLevel(logging.ERROR)

    if not (args.bundle / "mullama.json").is_file():
        print(f"error: no bundle at {args.bundle}; rebuild the demo model with `make demo-model`", file=sys.stderr)
        return 2
    from mullama_sdk import Captioner

    clips = args.audio or example_clips()
    if not clips:
        print(f"error: no clips given and none in {CLIPS}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    with Captioner.from_pretrained(args.bundle, n_threads=args.threads) as cap:
        print(f"loaded {args.bundle.name} in {1000 * (time.perf_counter() - t0):.0f} ms "
              f"(encoder {cap.manifest.default_encoder_precision}, LLM {cap.manifest.default_quant})\n")
        for clip in clips:
            res = cap.caption(clip, max_new_tokens=48, temperature=0)
            t = res.timings
            truth = truth_of(clip)
            print(f"{clip.name}{f'  [truth: {truth}]' if truth else ''}\n    {res.text}")
            print(f"    {t.audio_s:.1f} s audio | encode {t.encode_ms:.0f} ms + adapter {t.adapter_ms:.1f} ms | "
                  f"prefill {t.prefill_ms:.0f} ms | {t.n_tokens} tokens at {t.tokens_per_s:.0f} tok/s")
        vec = cap.encode(clips[0])
        answer = cap.ask(vec, args.question, max_new_tokens=24, temperature=0)
        print(f"\nQ ({clips[0].name}): {args.question}\nA: {answer.text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
