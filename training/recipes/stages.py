"""MU-LLaMA's two training stages as recipes: ``setup()`` -> ``train()`` -> ``save_checkpoint()`` -> ``cleanup()``.

* :class:`PretrainRecipe` trains the music adapter, the prefix queries and the gates of the injected
  layers; LLaMA and MERT are frozen and the model has no bias/LoRA deltas (spec section 5).
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
``training.reference.loading.load_reference`` and ``export.build.build_bundle`` take it as is.
``checkpoint-last.pth`` (a symlink) names the newest; ``resume=auto`` continues from it.

Several GPUs: launch with ``torchrun --nproc_per_node N -m training pretrain --config ...``; the loop
then uses DistributedDataParallel and a DistributedSampler, and only rank 0 logs and writes files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mullama_sdk.errors import CheckpointError, ConfigError
from training.recipes.config import RecipeConfig, dump_yaml
from training.recipes.data import IGNORE_INDEX, QADataset, clip_paths, collate, encode_pairs, load_qa_json
from training.recipes.features import FeatureCache, update_feature_cache
from training.reference.checkpoint_layout import module_to_published
from training.reference.dims import AdapterDims, DeltaDims, InjectionDims, LlamaParams, MullamaConfig
from training.reference.loading import (
    Checkpoint,
    ModelSources,
    build_model,
    open_sources,
    resolve_llama_dir,
    save_checkpoint,
    torch_load,
)
from training.reference.mert import read_mert_folder
from training.reference.model import MullamaModel
from training.reference.tokenizer import Tokenizer

log = logging.getLogger(__name__)

CHECKPOINT_GLOB = "checkpoint-*.pth"
#: Always names the newest checkpoint of a run (a symlink), so the next stage's config can point at it.
LAST_LINK = "checkpoint-last.pth"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ------------------------------------------------------------------------------------ parameter sets
def trainable_names(model: MullamaModel, stage: str) -> list[str]:
    """Parameter names (of ``model``) that a stage trains, in ``named_parameters`` order."""
    gates = {f"llama.layers.{l}.attention.gate" for l in model.inject_layers}
    out = []
    for name, _ in model.named_parameters():
        if stage == "pretrain":
            ok = name.startswith(("adapter.", "prefix_query.")) or name in gates
        elif stage == "finetune":
            ok = name.startswith("llama.") and (name.endswith(("norm.weight", ".bias")) or ".lora_" in name)
        else:
            raise ConfigError(f"unknown stage {stage!r}")
        if ok:
            out.append(name)
    return out


def saved_names(model: MullamaModel, stage: str) -> list[str]:
    """What a stage's checkpoint holds: everything that is not in the LLaMA and MERT folders.

    Pretrain: adapter, prefix queries, every layer's gate (the model has a gate in every layer; the
    ones outside the injected layers stay zero). Finetune: the same plus norms, biases and LoRA.
    """
    out = []
    for name, _ in model.named_parameters():
        if name.startswith("mert."):
            continue
        music = name.startswith(("adapter.", "prefix_query.")) or name.endswith(".attention.gate")
        delta = name.startswith("llama.") and (name.endswith(("norm.weight", ".bias")) or ".lora_" in name)
        if music or (stage == "finetune" and delta):
            out.append(name)
    return out


def decays(param: torch.Tensor) -> bool:
    """Weight decay applies to matrices: tensors with at least two dimensions larger than one.

    This leaves out norms, biases, the per-head gates ``(1, heads, 1, 1)`` and the layer-mix weights
    ``(1, n_states, 1)``, which are vectors stored in higher-rank shapes.
    """
    return sum(s > 1 for s in param.shape) >= 2


class WarmupCosine:
    """LR factor for optimizer step ``s`` (0-based): linear warm-up, then half-cycle cosine to ``min_ratio``.

    ``s < warmup``: ``(s + 1) / warmup`` (the first step already moves). Then
    ``min_ratio + (1 - min_ratio) * (1 + cos(pi * (s - warmup) / (total - warmup))) / 2``.
    """

    def __init__(self, warmup: int, total: int, min_ratio: float) -> None:
        self.warmup, self.total, self.min_ratio = int(warmup), int(total), float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------- forward + loss
def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropies over labelled positions, and their count.

    ``logits[:, t]`` predicts ``labels[:, t + 1]``; positions labelled :data:`IGNORE_INDEX` carry no loss.
    """
    vocab = logits.shape[-1]
    target = labels[:, 1:].reshape(-1)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), target, ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return loss, (target != IGNORE_INDEX).sum()


class TrainForward(nn.Module):
    """Cached MERT state means + tokens -> answer loss; the module DistributedDataParallel wraps.

    Holds the adapter, the prefix queries and LLaMA of a :class:`MullamaModel` (not MERT: features
    are cached), and computes exactly what :meth:`MullamaModel.music_query`,
    :meth:`MullamaModel.adapter_tokens` and :meth:`MullamaModel.logits` compute, batched.
    """

    def __init__(self, model: MullamaModel) -> None:
        super().__init__()
        self.adapter = model.adapter
        self.prefix_query = model.prefix_query
        self.llama = model.llama
        self.inject_layers = list(model.inject_layers)
        self.query_len = model.config.injection.query_len

    def forward(self, state_means: torch.Tensor, tokens: torch.Tensor, labels: torch.Tensor):
        a = self.adapter(state_means.float())
        prefix = self.prefix_query.weight.view(len(self.inject_layers), self.query_len, -1)
        adapters = {l: prefix[i][None] + a[:, None, :] for i, l in enumerate(self.inject_layers)}
        return answer_loss(self.llama(tokens, adapters=adapters), labels)


# ------------------------------------------------------------------------------------ model building
def fresh_pretrain_checkpoint(cfg: RecipeConfig) -> Checkpoint:
    """An in-memory checkpoint with a newly initialised adapter, prefix queries and zero gates.

    Initialisation is torch's default for each module (under the recipe's seed): Conv1d/Linear
    Kaiming-uniform, RMSNorm weights 1, prefix queries N(0, 1); gates 0 so that the untrained music
    path injects nothing (tanh 0 = 0) and step 0 is the base LLaMA.
    """
    from training.reference.adapter import MusicAdapter
    from training.reference.checkpoint_layout import adapter_key_to_published

    m = cfg.model
    folder = resolve_llama_dir(Path(m.llama_dir))
    tokenizer = Tokenizer(folder.tokenizer)
    params = LlamaParams.from_params_json(folder.params, vocab_size=tokenizer.n_vocab)
    mert_raw, do_normalize = read_mert_folder(Path(m.mert_dir))
    dims = AdapterDims(n_states=int(mert_raw["num_hidden_layers"]) + 1, mert_dim=int(mert_raw["hidden_size"]),
                       dim=params.dim, n_blocks=m.adapter_blocks, block_hidden=m.adapter_hidden or 4 * params.dim)
    injection = InjectionDims(n_layers=m.n_inject, query_len=m.query_len)
    injection.layer_ids(params.n_layers)
    config = MullamaConfig(llama=params, mert=mert_raw, adapter=dims, injection=injection,
                           deltas=DeltaDims(bias=False, lora_rank=0), mert_do_normalize=do_normalize)
    adapter = MusicAdapter(dims)
    prefix = nn.Embedding(injection.n_layers * injection.query_len, params.dim)
    sd = {adapter_key_to_published(k): v.detach() for k, v in adapter.state_dict().items()}
    sd["prefix_query.weight"] = prefix.weight.detach()
    for l in range(params.n_layers):
        sd[f"llama.layers.{l}.attention.gate"] = torch.zeros(1, params.n_heads, 1, 1)
    return Checkpoint(Path("<fresh pretrain init>"), sd, config.to_dict(), None, {"stage": "init"})


def fresh_deltas(src: ModelSources, want: DeltaDims, seed: int) -> dict[str, torch.Tensor]:
    """Initial finetune deltas missing from ``src``: zero biases, LoRA ``L1`` Kaiming-uniform and ``L2`` zero.

    ``L2 = 0`` and zero biases make the finetune start exactly at the pretrained model.
    """
    from training.reference.llama import Llama

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Llama(src.config.llama, want).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(set(shapes) - set(src.llama)):
        shape = shapes[key]
        if key.endswith(".bias") or key.endswith("_l2.weight"):
            out[key] = torch.zeros(shape)
        elif key.endswith("_l1.weight"):
            bound = 1.0 / math.sqrt(shape[1])  # nn.Linear's default (kaiming_uniform_, a=sqrt(5))
            out[key] = torch.empty(shape).uniform_(-bound, bound, generator=gen)
        else:
            raise CheckpointError(f"LLaMA weight {key} is missing and is not a finetune delta")
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and python RNG states, as tensors and plain containers."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out = {"torch": torch.get_rng_state(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                     cached), "python": random.getstate()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------- distributed
@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> DistInfo:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); a no-op for one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    owns = False
    if not dist.is_initialized():
        use_nccl = torch.cuda.is_available() and device != "cpu"
        dist.init_process_group("nccl" if use_nccl else "gloo")
        owns = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns)


def _barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier()


# --------------------------------------------------------------------------------------------- recipes
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
            raise RuntimeError(f"{type(self).__name__} is {self._state}: {hint}")

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
        _barrier(self.dist)
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
        want = self.cfg.train.device
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if want == "cuda":
            want = f"cuda:{self.dist.local_rank}"
        try:
            dev = torch.device(want)
        except RuntimeError as e:
            raise ConfigError(f"train.device={want!r}; valid: auto, cpu, cuda, cuda:N") from e
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ConfigError(f"train.device={want!r} but CUDA is not available; use cpu")
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
            _point_last(path)
            self._prune()
            self._write_log()
            log.info("checkpoint %s", path)
        _barrier(self.dist)
        return path

    def _prune(self) -> None:
        keep = self.cfg.train.keep_last
        if not keep:
            return
        found = sorted((p for p in self.out.glob(CHECKPOINT_GLOB) if _step_of(p) >= 0), key=_step_of)
        for old in [p for p in found if not p.name.endswith(".published.pth")][:-keep]:
            old.unlink()
            old.with_suffix(".published.pth").unlink(missing_ok=True)

    def _write_log(self) -> None:
        payload = {"stage": self.stage, "step": self.step, "total_steps": self.total_steps,
                   "data": dataclasses.asdict(self.data_report), "checkpoints": self.checkpoints,
                   "config": self.cfg.to_dict(), "steps": self.history}
        tmp = self.out / "log.json.tmp"
        tmp.write_text(json.dumps(payload, indent=1))
        tmp.replace(self.out / "log.json")
        plot_losses(self.history, self.out / "loss.png", title=f"MU-LLaMA {self.stage}: {self.out.name}")

    def cleanup(self) -> None:
        """Leave the process group (if this recipe joined it) and free the model."""
        if self._state == "closed":
            return
        if getattr(self, "dist", None) is not None and self.dist.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.model = None
        self.ddp = None
        self._state = "closed"


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


# ------------------------------------------------------------------------------------------ file helpers
def _step_of(path: Path) -> int:
    try:
        return int(path.name.split("-")[1].split(".")[0])
    except (IndexError, ValueError):
        return -1


def _point_last(path: Path) -> None:
    """Make ``checkpoint-last.pth`` (a relative symlink) name ``path``; skipped where symlinks are not allowed."""
    link = path.with_name(LAST_LINK)
    tmp = path.with_name(LAST_LINK + ".tmp")
    try:
        tmp.unlink(missing_ok=True)
        os.symlink(path.name, tmp)
        os.replace(tmp, link)
    except OSError as e:
        log.warning("could not point %s at %s: %s", link, path.name, e)


def latest_checkpoint(folder: Path) -> Path | None:
    """The highest-step ``checkpoint-<step>.pth`` in ``folder`` (published-layout copies excluded)."""
    found = [p for p in Path(folder).glob(CHECKPOINT_GLOB) if not p.name.endswith(".published.pth")
             and _step_of(p) >= 0]
    return max(found, key=_step_of) if found else None


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
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": state, "optimizer": {}, "epoch": step, "scaler": {}, "args": args}, tmp)
    tmp.replace(path)


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
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, path)
