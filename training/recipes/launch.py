"""``mullama-train pretrain|finetune --config CFG [key=value ...]``: run one training stage.

Overrides use the config's dotted keys, e.g. ``train.max_steps=100 optim.lr=3e-4 resume=auto``.
On several GPUs: ``torchrun --nproc_per_node N -m training pretrain --config CFG`` (rank 0 logs and
writes checkpoints). Errors are reported by :mod:`mullama_sdk.commandline` (``mullama-train``).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path


def build_parser(stage: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"mullama-train {stage}",
        description=f"Train MU-LLaMA's {stage} stage (see training/configs/{stage}.yaml).",
        epilog="Overrides: dotted config keys, e.g. train.max_steps=100 optim.lr=3e-4 resume=auto.",
    )
    p.add_argument("--config", type=Path, required=True, help="YAML recipe config")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--no-progress", action="store_true", help="no progress bar while caching features")
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    return p


def run_stage(stage: str, argv: list[str]) -> int:
    """Parse ``argv``, load the config (with overrides) and run the stage's recipe to the end."""
    args = build_parser(stage).parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    level = logging.WARNING if args.quiet or rank != 0 else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from training.recipes.config import load_recipe_config
    from training.recipes.stages import RECIPES

    cfg = load_recipe_config(args.config, args.overrides, stage=stage)
    with RECIPES[stage](cfg, progress=not args.no_progress) as recipe:
        recipe.setup()
        summary = recipe.train()
    if rank == 0:
        print(f"{stage}: {summary.steps} steps, final loss {summary.losses[-1]:.4f}, checkpoint {summary.checkpoint}")
    return 0


def pretrain(argv: list[str]) -> int:
    """``mullama-train pretrain``."""
    return run_stage("pretrain", argv)


def finetune(argv: list[str]) -> int:
    """``mullama-train finetune``."""
    return run_stage("finetune", argv)
