"""Stage 2 of the demo model: a tiny LLaMA-architecture LM, its tokenizer, and a warm start of the music path.

Stand-in for LLaMA-2-7B, which cannot be downloaded here. The tokenizer is a SentencePiece BPE model with
LLaMA's conventions (:func:`training.reference.tokenizer.train_llama_tokenizer`) trained on the prompt and the
training split's answers. The LM (:data:`LM_DIMS`, Meta's architecture: RMSNorm, SwiGLU, interleaved RoPE)
is trained from scratch on every training-split question/answer pair as ``[BOS] + prompt(Q) + A + [EOS]``
with the loss on ``A + EOS`` (MU-LLaMA's sequences), **together with the music path**: MU-LLaMA's adapter,
prefix queries and gates (:class:`training.reference.model.MullamaModel`, :class:`training.recipes.objective.TrainForward`) on
the frozen demo encoder's cached features.

Why together (the main difference from MU-LLaMA's recipe): LLaMA-2 arrives with rich representations that a
zero-gated adapter can learn to steer; a 4-layer LM trained on a few thousand templated answers has none.
Trained text-only first, it learns the answers' priors (every caption says "piano"), and MU-LLaMA's
pretrain stage on top of it - gates starting at 0, so the adapter receives no gradient until they grow -
did not move its loss in 441 steps (measured: loss 0.506 -> 0.520; held-out captions named the right family
1.2x chance). Here the gates start at :data:`GATE_INIT` and the prefix queries at a tenth of their usual
scale (so that they do not drown the music vector), and the LM learns to read the injected vectors while it
learns the language. The stages after this one are MU-LLaMA's own recipes, unchanged in kind.

Outputs: a Meta LLaMA folder (``params.json``, ``consolidated.00.pth``, ``tokenizer.model``) that every later
stage reads exactly as it would read LLaMA-2, and ``music_init.pth`` (our checkpoint format, stage
"pretrain": adapter, prefix queries, gates) that the pretrain recipe starts from.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mullama_sdk.prompt import format_prompt
from training.recipes.data import QADataset, clip_paths, collate, encode_pairs, load_qa_json
from training.recipes.features import FeatureCache, load_mert, update_feature_cache
from training.recipes.objective import TrainForward
from training.recipes.parameters import decays, saved_names
from training.recipes.schedule import WarmupCosine
from training.reference.checkpoint_layout import module_to_published
from training.reference.dims import (
    AdapterDims,
    DeltaDims,
    InjectionDims,
    LlamaParams,
    MullamaConfig,
    ffn_hidden_dim,
)
from training.reference.loading import save_checkpoint
from training.reference.mert import read_mert_folder
from training.reference.model import MullamaModel
from training.reference.tokenizer import Tokenizer, train_llama_tokenizer

#: The demo LM's shape, in the words of Meta's params.json (LLaMA-2-7B: 4096, 32 layers, 32 heads, 256).
LM_DIMS = {"dim": 128, "n_layers": 4, "n_heads": 4, "multiple_of": 128, "norm_eps": 1e-5}
#: The last N_INJECT of the LM's layers receive music (MU-LLaMA: the last 20 of 32); adapter as MU-LLaMA's.
N_INJECT = 3
ADAPTER_BLOCKS = 3
#: tanh(0.5) = 0.46 per head; MU-LLaMA starts at 0 (see the module docstring).
GATE_INIT = 0.5
#: Prefix queries start as N(0, 0.1^2) instead of N(0, 1), comparable in size to the music vector.
PREFIX_INIT_SCALE = 0.1
#: Upper bound of the tokenizer's size (a small corpus yields fewer pieces).
VOCAB_SIZE = 1024


@dataclass(frozen=True)
class LmTraining:
    epochs: float = 3.0
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup: int = 20
    max_words: int = 128
    seed: int = 0


@dataclass(frozen=True)
class LmResult:
    llama_dir: Path
    losses: list[float]
    seconds: float


def tokenizer_lines(train_json: Path) -> list[str]:
    """The tokenizer's training text: the prompt of every question (weighted) and every answer, by line."""
    pairs = load_qa_json(train_json)
    questions = sorted({p.question for p in pairs})
    prompt_lines = [line for q in questions for line in format_prompt(q).split("\n") if line]
    return prompt_lines * 20 + [p.answer for p in pairs]


def build_tokenizer(train_json: Path, out: Path) -> Tokenizer:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(train_llama_tokenizer(tokenizer_lines(train_json), VOCAB_SIZE, hard_vocab_limit=False))
    return Tokenizer(out)


def train_lm(
    data_dir: Path, mert_dir: Path, out_dir: Path, music_init: Path, features: Path,
    config: LmTraining = LmTraining(), progress: Callable[[str], None] = print,
) -> LmResult:
    """Train tokenizer, LM and music path on ``data_dir``'s training split; write the LLaMA folder + ``music_init``."""
    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    train_json = data_dir / "train.json"
    tokenizer = build_tokenizer(train_json, out_dir / "tokenizer.model")
    params = LlamaParams(
        dim=LM_DIMS["dim"], n_layers=LM_DIMS["n_layers"], n_heads=LM_DIMS["n_heads"], vocab_size=tokenizer.n_vocab,
        hidden_dim=ffn_hidden_dim(LM_DIMS["dim"], LM_DIMS["multiple_of"]), norm_eps=LM_DIMS["norm_eps"])
    mert = load_mert(mert_dir)
    mert_raw, do_normalize = read_mert_folder(mert_dir)
    model_config = MullamaConfig(
        llama=params, mert=mert_raw,
        adapter=AdapterDims(n_states=mert.n_states, mert_dim=mert.dim, dim=params.dim, n_blocks=ADAPTER_BLOCKS,
                            block_hidden=4 * params.dim),
        injection=InjectionDims(n_layers=N_INJECT), deltas=DeltaDims(bias=False, lora_rank=0),
        mert_do_normalize=do_normalize)

    pairs = load_qa_json(train_json)
    update_feature_cache(features, mert, clip_paths(pairs, data_dir / "audio"), progress=False)
    examples, report = encode_pairs(pairs, tokenizer, config.max_words)
    progress(f"  LM data: {report}; vocab {tokenizer.n_vocab}")
    dataset = QADataset(examples, FeatureCache(features))

    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    model = MullamaModel(model_config)
    model.mert = mert
    with torch.no_grad():
        model.prefix_query.weight.mul_(PREFIX_INIT_SCALE)
        for layer in model.inject_layers:
            model.llama.layers[layer].attention.gate.fill_(GATE_INIT)
    forward = TrainForward(model)
    injected_gates = {f"llama.layers.{l}.attention.gate" for l in model.inject_layers}
    trained = {n: p for n, p in model.named_parameters()
               if not n.startswith("mert.") and (not n.endswith(".attention.gate") or n in injected_gates)}
    for n, p in model.named_parameters():
        p.requires_grad_(n in trained)
    decay = [p for p in trained.values() if decays(p)]
    no_decay = [p for p in trained.values() if not decays(p)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.95))
    steps = max(1, math.ceil(config.epochs * len(dataset) / config.batch_size))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(config.warmup, steps, 0.0))
    losses: list[float] = []
    order: list[int] = []
    forward.train()
    for step in range(steps):
        if len(order) < config.batch_size:
            order += torch.randperm(len(dataset), generator=gen).tolist()
        batch = collate([dataset[i] for i in order[: config.batch_size]], pad_id=tokenizer.eos_id)
        del order[: config.batch_size]
        loss_sum, count = forward(batch["state_means"], batch["tokens"], batch["labels"])
        loss = loss_sum / count.clamp(min=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(list(trained.values()), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 25 == 0 or step + 1 == steps:
            progress(f"  LM step {step + 1}/{steps}  loss {np.mean(losses[-25:]):.3f}  "
                     f"({time.perf_counter() - t0:.0f} s)")
    base = {n[len("llama."):]: p.detach() for n, p in trained.items()
            if n.startswith("llama.") and not n.endswith(".attention.gate")}
    write_meta_folder(out_dir, params, LM_DIMS["multiple_of"], base)
    params_by_name = dict(model.named_parameters())
    music = module_to_published({n: params_by_name[n].detach().clone() for n in saved_names(model, "pretrain")})
    save_checkpoint(music_init, music, model_config, stage="pretrain", step=steps,
                    history=[{"step": i + 1, "loss": v} for i, v in enumerate(losses)])
    return LmResult(out_dir, losses, time.perf_counter() - t0)


def write_meta_folder(out_dir: Path, params: LlamaParams, multiple_of: int, state: dict[str, torch.Tensor]) -> None:
    """``params.json`` (Meta's keys) and ``consolidated.00.pth`` (float32, Meta's tensor names)."""
    meta = {"dim": params.dim, "multiple_of": multiple_of, "n_heads": params.n_heads, "n_layers": params.n_layers,
            "norm_eps": params.norm_eps, "vocab_size": params.vocab_size}
    (out_dir / "params.json").write_text(json.dumps(meta))
    torch.save({k: v.contiguous() for k, v in sorted(state.items())}, out_dir / "consolidated.00.pth")
