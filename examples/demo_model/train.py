"""Rebuild the demo model from nothing: data -> encoder -> LM -> MU-LLaMA pretrain -> finetune -> bundle.

    python -m examples.demo_model.train [--work DIR] [--bundle examples/demo_bundle] [--from STAGE]

Stages (each writes the files the next one reads, in the formats of the real model):

1. ``data``: :mod:`examples.demo_model.data` renders clips from music21's corpus through fluidsynth and writes
   MusicQA JSON (train / held-out split by piece).
2. ``encoder``: :mod:`examples.demo_model.encoder`, a small HuBERT (= MERT architecture) trained supervised on the
   training split's facts, written as an HF MERT folder. *Differs from MU-LLaMA*, whose MERT-v1-330M was
   pretrained self-supervised on 160k hours and is downloaded, not trained.
3. ``lm``: :mod:`examples.demo_model.lm`, a SentencePiece tokenizer and a 4-layer LLaMA trained from scratch on
   the training answers *together with* the music path (adapter, prefix queries, gates), written as a Meta
   LLaMA folder + a pretrain-stage checkpoint. *Differs from MU-LLaMA*, which starts from LLaMA-2-7B and
   trains the music path only on the frozen LLaMA (the module's docstring says why, with the measurement).
4. ``pretrain``: MU-LLaMA's pretrain stage with :class:`training.recipes.stages.PretrainRecipe`
   (``examples/demo_configs/pretrain.yaml``), starting from stage 3's music path: adapter, prefix queries
   and gates; encoder and LM frozen.
5. ``finetune``: MU-LLaMA's finetune stage with :class:`training.recipes.stages.FinetuneRecipe`
   (``examples/demo_configs/finetune.yaml``): LM norms, biases and LoRA; adapter frozen.
6. ``export``: :func:`export.build.build_bundle`, verified against torch, into ``--bundle``.

Reproducible: the same seed gives byte-identical bundle files on the same CPU type and torch / onnx /
llama.cpp versions (2 torch threads are fixed because the summation order of a matrix product depends on
the thread count; ``SOURCE_DATE_EPOCH`` pins the manifest's date). ``--check`` compares the rebuilt bundle
with the committed one, file by file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BUNDLE = ROOT / "examples" / "demo_bundle"
DEFAULT_WORK = ROOT / ".demo_work"
CONFIGS = ROOT / "examples" / "demo_configs"
STAGES = ("data", "encoder", "lm", "pretrain", "finetune", "export")
#: 2026-01-01T00:00:00Z: the demo bundle's manifest date (reproducible builds).
SOURCE_DATE_EPOCH = "1767225600"
TORCH_THREADS = 2
#: What ships: int8 encoder (the CPU default) + fp32 (exact), q8_0 LLM (default) + f16.
BUNDLE_QUANTS = ("q8_0", "f16")
BUNDLE_PRECISIONS = ("int8", "fp32")
MAX_BUNDLE_MB = 30


@dataclass(frozen=True)
class Budget:
    """How much of everything: the defaults build the committed demo model; :meth:`smoke` runs every stage
    on a handful of clips for a few steps (the tests' check that the pipeline holds together)."""

    data: dict = field(default_factory=dict)  # build_demo_data keyword arguments
    encoder_steps: int | None = None
    lm_epochs: float | None = None
    recipe_overrides: tuple[str, ...] = ()

    @classmethod
    def smoke(cls) -> Budget:
        return cls(data={"pieces": 5, "renderings": 7}, encoder_steps=4, lm_epochs=0.2,
                   recipe_overrides=("train.epochs=null", "train.max_steps=2"))


def _recipe(stage: str, work: Path, overrides: list[str]):
    from training.recipes.config import load_recipe_config
    from training.recipes.stages import FinetuneRecipe, PretrainRecipe

    cfg = load_recipe_config(CONFIGS / f"{stage}.yaml", [
        f"output_dir={work / 'runs' / stage}",
        f"model.llama_dir={work / 'llama'}",
        f"model.mert_dir={work / 'mert'}",
        f"data.train_json={work / 'data' / 'train.json'}",
        f"data.audio_dir={work / 'data' / 'audio'}",
        f"data.feature_cache={work / 'features'}",
        *overrides,
    ], stage=stage)
    recipe_cls = PretrainRecipe if stage == "pretrain" else FinetuneRecipe
    with recipe_cls(cfg, progress=False) as recipe:
        recipe.setup()
        summary = recipe.train()
    losses = summary.losses
    print(f"  {stage}: {summary.steps} steps, loss {losses[0]:.3f} -> {sum(losses[-10:]) / len(losses[-10:]):.3f} "
          f"(last 10 mean), {summary.seconds:.0f} s")
    return summary.checkpoint


def run(work: Path, bundle: Path, first: str = "data", seed: int = 0, budget: Budget = Budget()) -> dict[str, float]:
    import torch

    torch.set_num_threads(TORCH_THREADS)
    os.environ.setdefault("SOURCE_DATE_EPOCH", SOURCE_DATE_EPOCH)
    todo = STAGES[STAGES.index(first):]
    seconds: dict[str, float] = {}
    work.mkdir(parents=True, exist_ok=True)

    def stage(name: str) -> bool:
        if name in todo:
            print(f"\n[{name}]", flush=True)
            seconds[name] = time.perf_counter()
            return True
        return False

    def done(name: str) -> None:
        seconds[name] = time.perf_counter() - seconds[name]

    if stage("data"):
        from examples.demo_model.dataset import build_demo_data

        shutil.rmtree(work / "data", ignore_errors=True)
        build_demo_data(work / "data", seed=seed, progress=lambda m: print("  " + m, flush=True), **budget.data)
        done("data")
    if stage("encoder"):
        from examples.demo_model.encoder import EncoderTraining, train_encoder

        shutil.rmtree(work / "mert", ignore_errors=True)
        enc_cfg = EncoderTraining(seed=seed)
        if budget.encoder_steps is not None:
            enc_cfg = dataclasses.replace(enc_cfg, steps=budget.encoder_steps)
        res = train_encoder(work / "data", work / "mert", enc_cfg,
                            progress=lambda m: print(m, flush=True))
        print("  encoder heads, training batches (last 50 steps): "
              + ", ".join(f"{k} {v:.2f}" for k, v in res.train_accuracy.items()))
        print("  encoder heads, held-out clips (scored only):     "
              + ", ".join(f"{k} {v:.2f}" for k, v in res.heldout_accuracy.items()))
        done("encoder")
    if stage("lm"):
        from examples.demo_model.lm import LmTraining, train_lm

        for stale in ("llama", "features", "runs"):
            shutil.rmtree(work / stale, ignore_errors=True)
        lm_cfg = LmTraining(seed=seed)
        if budget.lm_epochs is not None:
            lm_cfg = dataclasses.replace(lm_cfg, epochs=budget.lm_epochs)
        train_lm(work / "data", work / "mert", work / "llama", work / "music_init.pth", work / "features", lm_cfg,
                 progress=lambda m: print(m, flush=True))
        done("lm")
    if stage("pretrain"):
        shutil.rmtree(work / "runs", ignore_errors=True)
        _recipe("pretrain", work, [f"train.seed={seed}", f"model.init_checkpoint={work / 'music_init.pth'}",
                                   *budget.recipe_overrides])
        done("pretrain")
    if stage("finetune"):
        shutil.rmtree(work / "runs" / "finetune", ignore_errors=True)
        init = work / "runs" / "pretrain" / "checkpoint-last.pth"
        _recipe("finetune", work, [f"train.seed={seed}", f"model.init_checkpoint={init.resolve()}",
                                   *budget.recipe_overrides])
        done("finetune")
    if stage("export"):
        from export.build import BundleOptions, build_bundle

        checkpoint = (work / "runs" / "finetune" / "checkpoint-last.pth").resolve()
        options = BundleOptions(quants=BUNDLE_QUANTS, encoder_precisions=BUNDLE_PRECISIONS, overwrite=True)
        clips = sorted((work / "data" / "audio").glob("*.wav"))[:2]
        build_bundle(checkpoint, work / "llama", work / "mert", bundle, options=options, audio=clips,
                     threads=TORCH_THREADS, progress=lambda m: print("\n".join(
                         "  " + line for line in m.strip("\n").splitlines()), flush=True))
        size = sum(f.stat().st_size for f in bundle.iterdir()) / 2**20
        print(f"  bundle {bundle}: {size:.1f} MiB")
        if size > MAX_BUNDLE_MB:
            raise SystemExit(f"error: the demo bundle is {size:.1f} MiB, over the {MAX_BUNDLE_MB} MiB budget")
        done("export")
    return seconds


def file_digests(folder: Path) -> dict[str, str]:
    """File name -> sha256 of every file in ``folder`` (what ``--check`` compares)."""
    from mullama_sdk.files import sha256_file

    return {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m examples.demo_model.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK, help="scratch folder for the stages' outputs")
    ap.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    ap.add_argument("--from", dest="first", choices=STAGES, default="data",
                    help="start at this stage, re-using the earlier stages' outputs in --work")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true",
                    help="build into a temporary folder and compare every file with --bundle (bit for bit)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("training").setLevel(logging.INFO)
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)

    t0 = time.perf_counter()
    target = args.bundle
    if args.check:
        if not (args.bundle / "mullama.json").is_file():
            print(f"error: --check needs an existing bundle at {args.bundle}", file=sys.stderr)
            return 2
        target = args.work / "rebuilt_bundle"
    seconds = run(args.work, target, args.first, args.seed)
    total = time.perf_counter() - t0
    print("\nstage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()) + f"; total {total:.0f} s")
    if args.check:
        want, got = file_digests(args.bundle), file_digests(target)
        differ = sorted(n for n in set(want) | set(got) if want.get(n) != got.get(n))
        for name in sorted(set(want) | set(got)):
            print(f"  {'same  ' if name not in differ else 'DIFFER'} {name}")
        if differ:
            print(f"error: the rebuilt bundle differs in {differ}", file=sys.stderr)
            return 1
        print(f"the rebuilt bundle is identical to {args.bundle} ({len(want)} files)")
    summary = {"seconds": {k: round(v, 1) for k, v in seconds.items()}, "total_seconds": round(total, 1)}
    (args.work / "last_run.json").write_text(json.dumps(summary, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    from examples.demo_model.cli import run_main

    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
