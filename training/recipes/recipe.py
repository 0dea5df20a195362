"""The training loop both stages share: ``setup()`` -> ``train()`` -> ``save_checkpoint()`` -> ``cleanup()``.

:class:`Recipe` builds the model (each stage says how: :mod:`training.recipes.stages`), the data and
feature cache, the optimizer (AdamW, weight decay on matrices only), the schedule
(:class:`~training.recipes.schedule.WarmupCosine`), optional autocast and loss scaling, and
DistributedDataParallel under ``torchrun``; it runs gradient-accumulated optimizer steps, writes
self-describing checkpoints and resumes from them exactly (optimizer, scheduler, scaler, RNG and
data position are all saved).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn

from mullama_sdk.errors import CheckpointError, ClosedError, ConfigError
from training.recipes.config import RecipeConfig, dump_yaml
from training.recipes.data import QADataset, clip_paths, collate, encode_pairs, load_qa_json
from training.recipes.distributed import barrier, init_distributed, resolve_device
from training.recipes.features import FeatureCache, update_feature_cache
from training.recipes.objective import TrainForward
from training.recipes.parameters import decays, saved_names, trainable_names
from training.recipes.random_state import rng_state, seed_everything, set_rng_state
from training.recipes.run_folder import (
    latest_checkpoint,
    point_last,
    prune_checkpoints,
    save_published_layout,
    write_run_log,
)
from training.recipes.schedule import WarmupCosine
from training.reference.build import build_model
from training.reference.checkpoint_layout import module_to_published
from training.reference.loading import Checkpoint, save_checkpoint, torch_load
from training.reference.model import MullamaModel
from training.reference.model_sources import ModelSources, open_sources

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class TrainSummary:
    """What :meth:`Recipe.train` did."""

    steps: int
    losses: list[float]
    checkpoint: Path | None
    seconds: float


class Recipe:
    """Shared machinery of both stages; use :class:`PretrainRecipe` or :class:`FinetuneRecipe`.

    Call order is enforced: ``setup()`` once, then ``train()`` and/or ``save_checkpoint()``, then
    ``cleanup()`` (also via ``with``).
    """

    stage: ClassVar[str] = ""

    def __init__(self, config: RecipeConfig, *, progress: bool = True) -> None:
        if config.stage != self.stage:
            raise ConfigError(f"{type(self).__name__} runs stage {self.stage!r}, the config says {config.stage!r}")
        self.cfg = config
        self.progress = progress
        self._state = "new"
        self.model: MullamaModel | None = None
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.checkpoints: list[str] = []

    def __enter__(self) -> Recipe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def _require(self, *states: str) -> None:
        if self._state not in states:
            hint = {"new": "call setup() first", "closed": "the recipe was cleaned up"}.get(self._state, "")
            error = ClosedError if self._state == "closed" else RuntimeError
            raise error(f"{type(self).__name__} is {self._state}: {hint}")

    # ---- setup ----------------------------------------------------------------------------------
    def setup(self) -> None:
        """Build the model, data, feature cache, optimizer and schedule; resume when asked."""
        self._require("new")
        cfg, t = self.cfg, self.cfg.train
        self.dist = init_distributed(t.device)
        self.device = self._device()
        seed_everything(t.seed)
        self.out = Path(cfg.output_dir)
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        resume = self._resume_path()
        payload = torch_load(resume) if resume else None
        if payload is not None and payload.get("stage") != self.stage:
            raise CheckpointError(f"{resume} is a {payload.get('stage')!r} checkpoint, not {self.stage!r}; "
                                  "to start finetuning from a pretrain checkpoint use model.init_checkpoint")

        model = self._build_model(resume)
        model.requires_grad_(False)
        self.trainable = trainable_names(model, self.stage)
        params = dict(model.named_parameters())
        for name in self.trainable:
            params[name].requires_grad_(True)
        self.model = model

        # Data and features (rank 0 computes what the cache lacks; the others wait and read).
        d = cfg.data
        pairs = load_qa_json(Path(d.train_json))
        clips = clip_paths(pairs, Path(d.audio_dir) if d.audio_dir else Path(d.train_json).parent)
        assert model.tokenizer is not None
        examples, self.data_report = encode_pairs(pairs, model.tokenizer, d.max_words)
        self.cache_dir = Path(d.feature_cache) if d.feature_cache else self.out / "features"
        if self.dist.is_main:
            log.info("data: %s", self.data_report)
            model.mert.to(self.device)
            update_feature_cache(self.cache_dir, model.mert, clips, max_window_seconds=d.max_window_seconds,
                                 progress=self.progress)
            model.mert.to("cpu")
        barrier(self.dist)
        self.dataset = QADataset(examples, FeatureCache(self.cache_dir))
        self.pad_id = model.tokenizer.eos_id
        self.sampler = torch.utils.data.DistributedSampler(
            self.dataset, num_replicas=self.dist.world_size, rank=self.dist.rank, shuffle=True, seed=t.seed,
            drop_last=False)
        self.micro_per_epoch = math.ceil(len(self.sampler) / t.batch_size)
        if t.max_steps is not None:
            self.total_steps = t.max_steps
        else:
            assert t.epochs is not None
            self.total_steps = max(1, math.ceil(t.epochs * self.micro_per_epoch / t.grad_accum))

        # Model on the device, DDP, optimizer, schedule, precision.
        model.adapter.to(self.device)
        model.prefix_query.to(self.device)
        model.llama.to(self.device)
        model.train()
        model.mert.eval()
        self.forward = TrainForward(model)
        self.ddp = None
        if self.dist.world_size > 1:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.forward, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.optimizer = self._optimizer()
        o = cfg.optim
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, WarmupCosine(o.warmup_steps, self.total_steps, o.min_lr / o.lr))
        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[t.precision]
        if t.precision == "fp16" and self.device.type != "cuda":
            raise ConfigError("train.precision=fp16 needs CUDA (loss scaling); on CPU use bf16 or fp32")
        if t.precision == "bf16" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("this GPU does not support bf16; use train.precision=fp16")
        self.scaler = torch.amp.GradScaler("cuda") if t.precision == "fp16" else None
        self.micro_index = 0
        if payload is not None:
            self._restore(payload, resume)
        if self.dist.is_main:
            dump_yaml(cfg, self.out / "config.yaml", f"mullama-train {self.stage} --config {self.out / 'config.yaml'}")
            n_train = sum(params[n].numel() for n in self.trainable)
            log.info("%s: %d trainable tensors (%s parameters), %d examples, %d steps of %d x %d x %d examples, "
                     "device %s, precision %s", self.stage, len(self.trainable), f"{n_train:,}", len(self.dataset),
                     self.total_steps, t.grad_accum, t.batch_size, self.dist.world_size, self.device, t.precision)
        self._state = "ready"

    def _device(self) -> torch.device:
        dev = resolve_device(self.cfg.train.device, local_rank=self.dist.local_rank, setting="train.device")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return dev

    def _resume_path(self) -> Path | None:
        r = self.cfg.resume
        if not r:
            return None
        if r == "auto":
            found = latest_checkpoint(Path(self.cfg.output_dir))
            if found is None:
                log.info("resume=auto: no checkpoint in %s, starting fresh", self.cfg.output_dir)
            return found
        path = Path(r)
        if not path.is_file():
            raise CheckpointError(f"resume checkpoint not found: {path}")
        return path

    def _sources(self, checkpoint: Path | Checkpoint) -> ModelSources:
        m = self.cfg.model
        return open_sources(checkpoint, Path(m.llama_dir), Path(m.mert_dir), trust_pickle=m.trust_pickle)

    def _build_model(self, resume: Path | None) -> MullamaModel:
        raise NotImplementedError

    def _materialise(self, src: ModelSources) -> MullamaModel:
        """Build the model with frozen LLaMA matrices in ``base_dtype`` and every trainable tensor in float32."""
        model = build_model(src, dtype=_DTYPES[self.cfg.model.base_dtype])
        own = dict(model.named_parameters())
        # Trained tensors get their own float32 memory, loaded from the source at full precision (the
        # build may have cast them to base_dtype, and memory-mapped tensors must not be trained in place).
        for name in trainable_names(model, self.stage):
            if name.startswith("llama."):
                value = src.llama[name[len("llama."):]]
            else:
                value = own[name].data
            own[name].data = value.detach().to(torch.float32, copy=True)
        return model

    def _optimizer(self) -> torch.optim.Optimizer:
        o = self.cfg.optim
        params = dict(self.model.named_parameters())
        decay = [params[n] for n in self.trainable if decays(params[n])]
        no_decay = [params[n] for n in self.trainable if not decays(params[n])]
        groups = [g for g in ({"params": decay, "weight_decay": o.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)

    def _restore(self, payload: dict[str, Any], path: Path) -> None:
        t = self.cfg.train
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        if self.scaler is not None and payload.get("scaler"):
            self.scaler.load_state_dict(payload["scaler"])
        set_rng_state(payload["rng"])
        self.step = int(payload["step"])
        self.history = list(payload.get("history", []))
        data = payload["data"]
        self.micro_index = int(data["micro_index"])
        same = (data.get("world_size"), data.get("batch_size"), data.get("n_examples"), data.get("seed")) == (
            self.dist.world_size, t.batch_size, len(self.dataset), t.seed)
        if not same:
            log.warning("resuming %s with another world size, batch size, seed or data set: the data order "
                        "continues at micro-batch %d but is not the one the interrupted run would have seen",
                        path, self.micro_index)
        if self.dist.is_main:
            log.info("resumed from %s at step %d", path, self.step)

    # ---- training -------------------------------------------------------------------------------
    def _micro_batches(self):
        """Micro-batches from ``self.micro_index`` on, across epochs; the sampler reshuffles per epoch."""
        bs = self.cfg.train.batch_size
        m = self.micro_index
        while True:
            epoch, offset = divmod(m, self.micro_per_epoch)
            self.sampler.set_epoch(epoch)
            order = list(self.sampler)
            batches = [order[i: i + bs] for i in range(0, len(order), bs)][offset:]
            loader = torch.utils.data.DataLoader(
                self.dataset, batch_sampler=batches, collate_fn=partial(collate, pad_id=self.pad_id),
                num_workers=self.cfg.data.num_workers)
            for batch in loader:
                m += 1
                yield batch

    def train(self) -> TrainSummary:
        """Run optimizer steps until ``total_steps``; checkpoint every ``save_every`` and at the end."""
        self._require("ready")
        t0 = time.perf_counter()
        t = self.cfg.train
        accum = t.grad_accum
        stream = self._micro_batches()
        step_module = self.ddp or self.forward
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        autocast = (partial(torch.autocast, self.device.type, dtype=self.autocast_dtype)
                    if self.autocast_dtype is not None else nullcontext)
        last_time = time.perf_counter()
        while self.step < self.total_steps:
            lr = self.optimizer.param_groups[0]["lr"]
            losses, n_tokens = [], 0
            for k in range(accum):
                batch = {name: v.to(self.device) for name, v in next(stream).items()}
                sync = self.ddp is None or k == accum - 1
                with nullcontext() if sync else self.ddp.no_sync():
                    with autocast():
                        loss_sum, count = step_module(batch["state_means"], batch["tokens"], batch["labels"])
                    loss = loss_sum / count.clamp(min=1)
                    scaled = loss / accum
                    (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
                losses.append(loss.detach())
                n_tokens += int(count)
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            max_norm = self.cfg.optim.clip_grad_norm
            grad_norm = nn.utils.clip_grad_norm_(trainable, max_norm if max_norm is not None else float("inf"))
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            self.step += 1
            self.micro_index += accum
            step_loss = torch.stack(losses).mean()
            if self.dist.world_size > 1:
                dist.all_reduce(step_loss)
                step_loss /= self.dist.world_size
            now = time.perf_counter()
            record = {"step": self.step, "loss": float(step_loss), "lr": lr, "grad_norm": float(grad_norm),
                      "tokens": n_tokens, "seconds": round(now - last_time, 4)}
            last_time = now
            self.history.append(record)
            if self.dist.is_main and (self.step % t.log_every == 0 or self.step == self.total_steps):
                log.info("step %d/%d  loss %.4f  lr %.3g  grad-norm %.3g  %.2f s", self.step, self.total_steps,
                         record["loss"], lr, record["grad_norm"], record["seconds"])
            if t.save_every and self.step % t.save_every == 0 and self.step < self.total_steps:
                self.save_checkpoint()
        path = self.save_checkpoint()
        return TrainSummary(self.step, [h["loss"] for h in self.history], path, time.perf_counter() - t0)

    # ---- checkpoints ----------------------------------------------------------------------------
    def trained_state(self) -> dict[str, torch.Tensor]:
        """The stage's trained tensors under the published names, copied to CPU."""
        params = dict(self.model.named_parameters())
        return module_to_published({n: params[n].detach().to("cpu", copy=True)
                                    for n in saved_names(self.model, self.stage)})

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoint-<step>.pth`` (rank 0; the others wait), ``log.json`` and ``loss.png``.

        Returns:
            The checkpoint path (on every rank).
        """
        self._require("ready")
        path = self.out / f"checkpoint-{self.step:06d}.pth"
        if self.dist.is_main:
            t = self.cfg.train
            state = self.trained_state()
            save_checkpoint(
                path, state, self.model.config,
                stage=self.stage, step=self.step,
                optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                scaler=self.scaler.state_dict() if self.scaler is not None else None,
                rng=rng_state(),
                data={"micro_index": self.micro_index, "micro_per_epoch": self.micro_per_epoch,
                      "n_examples": len(self.dataset), "batch_size": t.batch_size, "grad_accum": t.grad_accum,
                      "world_size": self.dist.world_size, "seed": t.seed},
                history=self.history, recipe=self.cfg.to_dict(), torch_version=str(torch.__version__),
            )
            if self.cfg.save_published:
                save_published_layout(path.with_suffix(".published.pth"), state, self.model.config,
                                      stage=self.stage, step=self.step, recipe=self.cfg)
            self.checkpoints.append(path.name)
            point_last(path)
            prune_checkpoints(self.out, self.cfg.train.keep_last)
            self._write_log()
            log.info("checkpoint %s", path)
        barrier(self.dist)
        return path

    def _write_log(self) -> None:
        payload = {"stage": self.stage, "step": self.step, "total_steps": self.total_steps,
                   "data": dataclasses.asdict(self.data_report), "checkpoints": self.checkpoints,
                   "config": self.cfg.to_dict(), "steps": self.history}
        write_run_log(self.out, payload)

    def cleanup(self) -> None:
        """Leave the process group (if this recipe joined it) and free the model."""
        if self._state == "closed":
            return
        if getattr(self, "dist", None) is not None and self.dist.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.model = None
        self.ddp = None
        self._state = "closed"
