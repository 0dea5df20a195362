"""``make demo``: build the demo bundle if it is missing, then caption the example clips.

Until a trained demo model exists (it cannot be downloaded here: the real weights are neither
reachable nor redistributable), the bundle is made from the tiny RANDOM model of the test factory.
Its captions are gibberish by construction; what the demo shows is the whole pipeline running:
export -> bundle -> ONNX Runtime encoder -> llama.cpp with the music hook, with timings.

    python -m examples.demo [--bundle DIR] [--rebuild] [AUDIO ...]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = ROOT / "demo_bundle"
ASSETS = ROOT / ".demo_assets"


def build_demo_bundle(bundle: Path) -> None:
    from export.bundle import BundleOptions, build_bundle
    from tests.assets.make_assets import build_tiny_assets

    print(f"building the demo bundle in {bundle} (tiny random model; about a minute) ...", flush=True)
    assets = build_tiny_assets(ASSETS)
    options = BundleOptions(quants=("q8_0", "f32"), encoder_precisions=("fp32", "int8"), overwrite=True)
    build_bundle(assets.checkpoint, assets.llama_dir, assets.mert_dir, bundle, options=options,
                 progress=lambda msg: print("\n".join("  " + line for line in msg.strip("\n").splitlines()),
                                            flush=True))


def example_clips() -> list[Path]:
    from tests.assets.make_assets import write_test_audio

    folder = ASSETS / "audio"
    if not folder.is_dir():
        write_test_audio(ASSETS)
    return sorted(p for p in folder.iterdir() if p.suffix in (".wav", ".flac", ".ogg"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m examples.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("audio", nargs="*", type=Path, help="clips to caption (default: the example clips)")
    ap.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    ap.add_argument("--rebuild", action="store_true", help="rebuild the demo bundle even if it exists")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("llama_cpp.native").setLevel(logging.ERROR)
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)

    if args.rebuild or not (args.bundle / "mullama.json").is_file():
        build_demo_bundle(args.bundle)
    from mullama_sdk import Captioner

    clips = args.audio or example_clips()
    print("\nNOTE: this demo bundle holds a tiny RANDOM model (no trained demo model exists yet), so the")
    print("      captions below are gibberish; the timings and the pipeline are real.\n")
    t0 = time.perf_counter()
    with Captioner.from_pretrained(args.bundle) as cap:
        print(f"loaded {args.bundle} in {1000 * (time.perf_counter() - t0):.0f} ms "
              f"(encoder {cap.manifest.default_encoder_precision}, LLM {cap.manifest.default_quant})\n")
        for clip in clips:
            res = cap.caption(clip, max_new_tokens=32, temperature=0)
            t = res.timings
            print(f"{clip.name}: {res.text!r}")
            print(f"    {t.audio_s:.1f} s audio | encode {t.encode_ms:.0f} ms + adapter {t.adapter_ms:.1f} ms | "
                  f"prefill {t.prefill_ms:.0f} ms | {t.n_tokens} tokens at {t.tokens_per_s:.0f} tok/s")
        vec = cap.encode(clips[0])
        answer = cap.ask(vec, "What is the tempo of this music?", max_new_tokens=16, temperature=0)
        print(f"\nQ: What is the tempo of this music?  ({clips[0].name})\nA: {answer.text!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
