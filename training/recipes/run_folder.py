"""What a training run writes to its output folder, besides the checkpoints' content.

* ``checkpoint-<step>.pth`` (see :func:`training.reference.loading.save_checkpoint`), optionally a
  ``checkpoint-<step>.published.pth`` copy in the published envelope, pruned to the newest few;
* ``checkpoint-last.pth``: a symlink naming the newest, so the next stage's config can point at it;
* ``log.json``: stage, step, data report, checkpoints, config and every step's loss/lr/grad-norm;
* ``loss.png``: the loss curve.

Every file is written whole or not at all (:mod:`mullama_sdk.files`): a run killed mid-write leaves
the previous version in place.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from mullama_sdk.files import atomic_path, atomic_write_text
from training.recipes.config import RecipeConfig
from training.reference.dims import MullamaConfig

log = logging.getLogger(__name__)

CHECKPOINT_GLOB = "checkpoint-*.pth"
#: Always names the newest checkpoint of a run (a symlink), so the next stage's config can point at it.
LAST_LINK = "checkpoint-last.pth"
LOG_FILE = "log.json"
PLOT_FILE = "loss.png"


def step_of(path: Path) -> int:
    """The step in ``checkpoint-<step>.pth``; -1 for any other name (``checkpoint-last.pth``)."""
    try:
        return int(path.name.split("-")[1].split(".")[0])
    except (IndexError, ValueError):
        return -1


def point_last(path: Path) -> None:
    """Make ``checkpoint-last.pth`` (a relative symlink) name ``path``; skipped where symlinks are not allowed."""
    link = path.with_name(LAST_LINK)
    try:
        with atomic_path(link) as tmp:
            os.symlink(path.name, tmp)
    except OSError as e:
        log.warning("could not point %s at %s: %s", link, path.name, e)


def latest_checkpoint(folder: Path) -> Path | None:
    """The highest-step ``checkpoint-<step>.pth`` in ``folder`` (published-layout copies excluded)."""
    found = [p for p in Path(folder).glob(CHECKPOINT_GLOB) if not p.name.endswith(".published.pth")
             and step_of(p) >= 0]
    return max(found, key=step_of) if found else None


def prune_checkpoints(folder: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints (and their published-layout copies); 0 keeps all."""
    if not keep:
        return
    found = sorted((p for p in folder.glob(CHECKPOINT_GLOB) if step_of(p) >= 0), key=step_of)
    for old in [p for p in found if not p.name.endswith(".published.pth")][:-keep]:
        old.unlink()
        old.with_suffix(".published.pth").unlink(missing_ok=True)


def save_published_layout(path: Path, state: dict[str, torch.Tensor], config: MullamaConfig, *, stage: str,
                          step: int, recipe: RecipeConfig) -> None:
    """The same tensors in the published MU-LLaMA envelope ``{'model', 'optimizer', 'epoch', 'scaler', 'args'}``.

    Only the trained parts are written (as in a published "deltas" checkpoint): tools that read the
    published layout take the base weights from the LLaMA and MERT folders. Values stay float32.
    """
    import argparse

    args = argparse.Namespace(stage=stage, step=step, query_len=config.injection.query_len,
                              max_words=recipe.data.max_words, batch_size=recipe.train.batch_size,
                              accum_iter=recipe.train.grad_accum, weight_decay=recipe.optim.weight_decay,
                              lr=recipe.optim.lr, mullama_format="published-layout copy of a mullama-checkpoint")
    with atomic_path(path) as tmp:
        torch.save({"model": state, "optimizer": {}, "epoch": step, "scaler": {}, "args": args}, tmp)


def write_run_log(folder: Path, payload: dict[str, Any]) -> None:
    """``log.json`` (``payload``, with the per-step records under ``steps``) and its ``loss.png``."""
    atomic_write_text(folder / LOG_FILE, json.dumps(payload, indent=1))
    plot_losses(payload["steps"], folder / PLOT_FILE, title=f"MU-LLaMA {payload['stage']}: {folder.name}")


def plot_losses(history: list[dict[str, Any]], path: Path, *, title: str = "") -> None:
    """Loss per optimizer step as a PNG (matplotlib's Agg canvas; no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["loss"] for h in history], marker="." if len(steps) < 60 else None, lw=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("answer-token cross-entropy")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp)
