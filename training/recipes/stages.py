"""MU-LLaMA's two training stages as recipes: ``setup()`` -> ``train()`` -> ``save_checkpoint()`` -> ``cleanup()``.

* :class:`PretrainRecipe` trains the music adapter, the prefix queries and the gates of the injected
  layers; LLaMA and MERT are frozen and the model has no bias/LoRA deltas (docs/model.md section 5).
* :class:`FinetuneRecipe` trains LLaMA's RMSNorm weights, biases (wq, wo, w1, w2, w3) and LoRA
  (wq, wk, wv, wo, w1, w2, w3); the adapter, prefix queries and gates stay as the init checkpoint has them.

Common to both (the published recipe): batch of ``batch_size`` examples per micro-step, gradient
accumulation, AdamW (0.9, 0.95) with weight decay on matrices only, linear warm-up then half-cycle
cosine, loss = next-token cross-entropy on answer tokens + EOS only, optional bf16/fp16 autocast and
gradient clipping. MERT never runs in the loop: features come from :mod:`training.recipes.features`.

Checkpoints (``<output_dir>/checkpoint-<step>.pth``) are our self-describing format
(:func:`training.reference.loading.save_checkpoint`): the trained tensors under the published names, the model
config, stage, step, optimizer, scheduler and loss-scaler state, RNG states, the data position, the
loss history and the recipe config. Resuming from one reproduces the uninterrupted run bit for bit
on CPU in fp32. Each is also a complete model on top of the LLaMA and MERT folders, so
``training.reference.build.load_reference`` and ``export.build.build_bundle`` take it as is.
``checkpoint-last.pth`` (a symlink) names the newest; ``resume=auto`` continues from it.

Several GPUs: launch with ``torchrun --nproc_per_node N -m training pretrain --config ...``; the loop
then uses DistributedDataParallel and a DistributedSampler, and only rank 0 logs and writes files.

This module holds what differs between the stages (how each builds its model); the shared loop is
:mod:`training.recipes.recipe`, the parameter sets :mod:`training.recipes.parameters`, the loss
:mod:`training.recipes.objective`, the run folder's files :mod:`training.recipes.run_folder`.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from mullama_sdk.errors import CheckpointError
from training.recipes.initial_weights import fresh_deltas, fresh_pretrain_checkpoint
from training.recipes.recipe import Recipe
from training.reference.dims import DeltaDims
from training.reference.model import MullamaModel

log = logging.getLogger(__name__)


class PretrainRecipe(Recipe):
    """Stage 1: adapter + prefix queries + injected gates on a frozen LLaMA without deltas."""

    stage = "pretrain"

    def _build_model(self, resume: Path | None) -> MullamaModel:
        source = resume or (Path(self.cfg.model.init_checkpoint) if self.cfg.model.init_checkpoint else None)
        src = self._sources(source if source is not None else fresh_pretrain_checkpoint(self.cfg))
        if src.config.deltas != DeltaDims(bias=False, lora_rank=0):
            raise CheckpointError(
                f"{src.checkpoint.path} has finetune deltas ({src.config.deltas}); the pretrain stage trains a "
                "model without biases or LoRA: start from a pretrain-stage checkpoint or from scratch")
        return self._materialise(src)


class FinetuneRecipe(Recipe):
    """Stage 2: LLaMA norms, biases and LoRA on top of a pretrained music adapter (frozen)."""

    stage = "finetune"

    def _build_model(self, resume: Path | None) -> MullamaModel:
        m = self.cfg.model
        src = self._sources(resume or Path(m.init_checkpoint))
        have = src.config.deltas
        want = DeltaDims(bias=have.bias or m.bias, lora_rank=have.lora_rank or m.lora_rank)
        if have.lora_rank and m.lora_rank and have.lora_rank != m.lora_rank:
            log.warning("%s has LoRA rank %d; model.lora_rank=%d is ignored", src.checkpoint.path, have.lora_rank,
                        m.lora_rank)
        if want != have:
            new = fresh_deltas(src, want, self.cfg.train.seed)
            log.info("finetune: adding %d fresh delta tensors (bias=%s, LoRA rank %d)", len(new), want.bias,
                     want.lora_rank)
            src = dataclasses.replace(src, config=dataclasses.replace(src.config, deltas=want),
                                      llama={**src.llama, **new})
        return self._materialise(src)


RECIPES: dict[str, type[Recipe]] = {"pretrain": PretrainRecipe, "finetune": FinetuneRecipe}
