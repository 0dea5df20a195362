"""Stage 1 of the demo model: a small HuBERT-architecture music encoder, trained from scratch.

MU-LLaMA's encoder, MERT-v1-330M, was pretrained self-supervised on 160k hours of music; nothing like it
can be downloaded or trained here. The demo's stand-in is the same architecture at small widths
(:data:`ENCODER_DIMS`), trained *supervised* on the training split's known facts: linear heads on the
per-state time-means (exactly what the adapter will read) predict instrument family, tempo class, drums,
solo/ensemble, mode and era. The heads are thrown away; the encoder is written as an HF MERT folder and
frozen from then on, as MERT is in MU-LLaMA. Only training-split clips are seen here.

What is trained: the feature projection, the positional convolution and the transformer layers. The
7-layer conv feature encoder keeps its (seeded) random initialisation and is frozen - a fixed random
filterbank: back-propagating through it on raw 24 kHz audio costs ~2 s per step on 2 cores, which the
20-minute rebuild budget cannot pay, while its output for every clip can be computed once and cached.
Tempo gets frame-level help: a linear head on the last layer's states predicts, frame by frame, where
notes start (the data's ``onsets``, a Gaussian bump of 1 frame per onset). Tempo classes are defined by how
often notes start (:func:`examples.demo_model.scores.excerpt_beat`), and a feature that fires on onsets makes that
rate a plain time-average - the thing the adapter reads. Measured on the 98 held-out clips (single runs,
tempo head on the state means, chance 33 %): 800 steps without the onset head 44 %, with it 48 %; 2400
steps with it 54 % (family 78 %). The onset loss itself falls only from 0.23 (predicting the mean) to
0.19: a frozen random filterbank hears attacks, hardly the pitch changes of a legato line.

Augmentation: each step sees random crops (``CROP_SECONDS``) of the clips' cached conv features, each
time-stretched by a random rate (:data:`STRETCH`) with its BPM label scaled to match, so the encoder cannot
memorise clips and has to hear tempo rather than recognise the clip.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from torch import nn

from examples.demo_model.facts import TEMPO_CLASSES
from mullama_sdk.constants import SAMPLE_RATE_HZ
from training.recipes.schedule import WarmupCosine
from training.reference.mert import (
    MertEncoder,
    hubert_config_from_mert,
    mert_folder_config,
    write_mert_folder,
)

#: The demo encoder's widths (MERT-v1-330M: 1024 wide, 24 layers, 16 heads, FFN 4096, 512 conv channels).
ENCODER_DIMS = {
    "hidden_size": 96,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "intermediate_size": 384,
    "conv_dim": 48,
    "num_conv_pos_embeddings": 128,  # as MERT: 1.7 s of frames, a beat at 35 BPM (tempo needs the span)
    "num_conv_pos_embedding_groups": 8,
}
#: The facts of ``clips.json`` the encoder learns to classify.
TASKS = ("family", "tempo_class", "drums", "solo", "mode", "era")
#: ... and the one it regresses: log BPM, standardised. The graded target teaches a tempo feature faster than
#: the 3-way tempo class alone (neighbouring tempi get neighbouring targets).
BPM = "bpm"
#: Tempo is the hardest fact to hear from time-averaged states (timbre is easy): it gets double weight.
TASK_WEIGHTS = {"tempo_class": 2.0, BPM: 2.0}
#: ... and the frame-level onset curve (see the module docstring).
ONSETS = "onsets"
ONSET_WEIGHT = 1.0
#: Width (standard deviation, frames) of the soft bump each onset puts on the target curve: timing of
#: the rendering (fluidsynth's 64-sample blocks) and attack shapes blur an onset over a few frames.
ONSET_SIGMA_FRAMES = 1.0
CROP_SECONDS = 3.0
#: Tempo augmentation: crops are time-stretched by a rate in this range (log-uniform) and their BPM label
#: scaled with it. Without it the encoder learns each training clip's tempo class by heart (74 % on training
#: crops) and nothing that carries over to new pieces (33-35 % on held-out clips, chance 33 %): every clip
#: has one fixed tempo, so timbre and texture identify it. Stretched, the same clip appears at many tempi.
STRETCH = (0.75, 1.33)
FRAMES_PER_SECOND = 75  # MERT's conv strides: 24000 / 320


@dataclass(frozen=True)
class EncoderTraining:
    steps: int = 2400
    batch_size: int = 12
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: int = 30
    seed: int = 0


@dataclass(frozen=True)
class EncoderResult:
    mert_dir: Path
    losses: list[float]
    train_accuracy: dict[str, float]
    heldout_accuracy: dict[str, float]
    seconds: float


class _Heads(nn.Module):
    """One linear classifier per task on the LayerNorm'ed, flattened state means."""

    def __init__(self, n_states: int, dim: int, classes: dict[str, list[str]]) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.heads = nn.ModuleDict({t: nn.Linear(n_states * dim, len(c)) for t, c in classes.items()})
        self.heads[BPM] = nn.Linear(n_states * dim, 1)
        self.onset = nn.Linear(dim, 1)

    def forward(self, state_means: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.norm(state_means).flatten(1)
        return {t: head(x) for t, head in self.heads.items()}

    def onset_logits(self, last_state: torch.Tensor) -> torch.Tensor:
        """``(batch, frames)`` onset logits from the last layer's states ``(batch, frames, dim)``."""
        return self.onset(last_state)[..., 0]


def _label(fact: object) -> str:
    return str(fact).lower() if not isinstance(fact, bool) else ("yes" if fact else "no")


def load_clips(
    data_dir: Path, split: str, classes: dict[str, list[str]] | None = None
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, list[str]]]:
    """Waveforms ``(n, samples)`` of one split, integer labels per task, and class names per task
    (taken from this split unless given)."""
    facts = [c for c in json.loads((data_dir / "clips.json").read_text()) if (c["split"] == "train") == (split == "train")]
    facts.sort(key=lambda c: c["clip_id"])
    waves = []
    for c in facts:
        wave, sr = sf.read(data_dir / "audio" / f"{c['clip_id']}.wav", dtype="float32", always_2d=True)
        if sr != SAMPLE_RATE_HZ:
            raise ValueError(f"{c['clip_id']}: {sr} Hz, the demo data is rendered at {SAMPLE_RATE_HZ} Hz")
        waves.append(wave.mean(axis=1))
    length = min(len(w) for w in waves)
    classes = classes or {t: sorted({_label(c[t]) for c in facts}) for t in TASKS}
    # A held-out class the training split lacks is -1: never predicted, so scored as wrong.
    labels = {t: np.array([classes[t].index(_label(c[t])) if _label(c[t]) in classes[t] else -1 for c in facts])
              for t in TASKS}
    labels[BPM] = np.log(np.array([float(c["bpm"]) for c in facts], dtype=np.float32))
    labels[ONSETS] = np.array([np.asarray(c["onsets"], dtype=np.float32) for c in facts], dtype=object)
    return np.stack([w[:length] for w in waves]), labels, classes


def onset_curves(onsets: np.ndarray, frames: int) -> torch.Tensor:
    """Soft onset targets ``(n, 1, frames)`` in [0, 1] from each clip's onset times (seconds): a Gaussian
    bump of :data:`ONSET_SIGMA_FRAMES` per onset, the maximum where bumps overlap."""
    grid = np.arange(frames, dtype=np.float32)
    out = np.zeros((len(onsets), 1, frames), dtype=np.float32)
    for i, times in enumerate(onsets):
        if len(times):
            centres = np.asarray(times, dtype=np.float32)[:, None] * FRAMES_PER_SECOND
            out[i, 0] = np.exp(-0.5 * ((grid[None] - centres) / ONSET_SIGMA_FRAMES) ** 2).max(axis=0)
    return torch.from_numpy(out)


def tempo_class_of(bpm: torch.Tensor, names: list[str]) -> torch.Tensor:
    """Index (into ``names``) of the tempo class of each BPM; the gaps between the data's class ranges are
    split at their midpoints (a stretched clip can land in a gap)."""
    ranges = sorted(TEMPO_CLASSES.items(), key=lambda kv: kv[1][0])
    bounds = torch.tensor([(a[1][1] + b[1][0]) / 2 for a, b in zip(ranges, ranges[1:])])
    order = torch.tensor([names.index(name) for name, _ in ranges])
    return order[torch.bucketize(bpm, bounds)]


def stretched_crops(
    features: torch.Tensor, idx: torch.Tensor, crop: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crops of ``crop`` frames, each time-stretched by a random rate in :data:`STRETCH` (a window
    of ``rate * crop`` frames resampled to ``crop``): the music plays ``rate`` times faster, so its BPM is
    ``rate`` times higher. Returns the crops ``(batch, conv_dim, crop)`` and the rates actually applied."""
    lo, hi = math.log(STRETCH[0]), math.log(STRETCH[1])
    out, rates = [], []
    for i in idx.tolist():
        rate = math.exp(lo + (hi - lo) * float(torch.rand((), generator=gen)))
        length = min(features.shape[2], max(2, round(rate * crop)))
        start = int(torch.randint(features.shape[2] - length + 1, (), generator=gen))
        window = features[i: i + 1, :, start: start + length]
        out.append(F.interpolate(window, size=crop, mode="linear", align_corners=False)[0])
        rates.append(length / crop)
    return torch.stack(out), torch.tensor(rates)


def conv_features(encoder: MertEncoder, waves: np.ndarray, chunk: int = 16) -> torch.Tensor:
    """The frozen conv front end's output for every clip, ``(n, conv_dim, frames)``."""
    out = []
    with torch.no_grad():
        for i in range(0, len(waves), chunk):
            out.append(encoder.hubert.feature_extractor(torch.from_numpy(waves[i: i + chunk])))
    return torch.cat(out)


def train_encoder(
    data_dir: Path, out_dir: Path, config: EncoderTraining = EncoderTraining(),
    progress: Callable[[str], None] = print,
) -> EncoderResult:
    """Train the encoder on ``data_dir``'s training split and write it as a MERT folder in ``out_dir``."""
    t0 = time.perf_counter()
    waves, labels, classes = load_clips(data_dir, "train")
    raw = mert_folder_config(**ENCODER_DIMS)
    gen = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    encoder = MertEncoder(hubert_config_from_mert(raw, source="demo encoder"))
    heads = _Heads(encoder.n_states, encoder.dim, classes)
    encoder.hubert.feature_extractor.requires_grad_(False)
    params = [p for p in (*encoder.parameters(), *heads.parameters()) if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.98))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(config.warmup, config.steps, 0.0))
    features = conv_features(encoder, waves)
    n_conv = features.shape[1]
    # The onset curve rides along as one more channel, so crops and stretches keep it aligned.
    features = torch.cat([features, onset_curves(labels.pop(ONSETS), features.shape[2])], dim=1)
    crop = int(CROP_SECONDS * FRAMES_PER_SECOND)
    label_t = {t: torch.from_numpy(v) for t, v in labels.items()}
    labels_bpm = label_t.pop(BPM)
    bpm_mean, bpm_std = labels_bpm.mean(), labels_bpm.std()
    encoder.train()
    losses: list[float] = []
    onset_losses: list[float] = []
    correct = {t: [] for t in TASKS}
    for step in range(config.steps):
        idx = torch.randint(len(features), (config.batch_size,), generator=gen)
        batch, rates = stretched_crops(features, idx, crop, gen)
        batch, onset_target = batch[:, :n_conv], batch[:, n_conv]
        targets = {t: label_t[t][idx] for t in TASKS}
        log_bpm = labels_bpm[idx] + torch.log(rates)
        targets["tempo_class"] = tempo_class_of(log_bpm.exp(), classes["tempo_class"])
        states = encoder.states_from_features(batch)
        logits = heads(torch.stack([h.mean(dim=1) for h in states], dim=1))
        loss = sum(TASK_WEIGHTS.get(t, 1.0) * F.cross_entropy(logits[t], targets[t]) for t in TASKS)
        loss = loss + TASK_WEIGHTS[BPM] * F.mse_loss(logits[BPM][:, 0], (log_bpm - bpm_mean) / bpm_std)
        onset_loss = F.binary_cross_entropy_with_logits(heads.onset_logits(states[-1]), onset_target)
        loss = loss + ONSET_WEIGHT * onset_loss
        onset_losses.append(float(onset_loss.detach()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        for t in TASKS:
            correct[t].append(float((logits[t].argmax(-1) == targets[t]).float().mean()))
        if (step + 1) % 50 == 0 or step + 1 == config.steps:
            recent = {t: np.mean(v[-50:]) for t, v in correct.items()}
            progress(f"  encoder step {step + 1}/{config.steps}  loss {np.mean(losses[-50:]):.3f}  "
                     f"onsets {np.mean(onset_losses[-50:]):.3f}  "
                     + "  ".join(f"{t} {a:.2f}" for t, a in recent.items())
                     + f"  ({time.perf_counter() - t0:.0f} s)")
    encoder.eval()
    write_mert_folder(out_dir, raw, encoder.hubert.state_dict())
    accuracy = {t: float(np.mean(v[-50:])) for t, v in correct.items()}
    # Held-out clips are only scored (whole clips, as the runtime sees them), never trained on or selected by.
    held_waves, held_labels, _ = load_clips(data_dir, "heldout", classes)
    held_labels.pop(ONSETS)
    with torch.no_grad():
        states = encoder.states_from_features(conv_features(encoder, held_waves))
        held_logits = heads(torch.stack([h.mean(dim=1) for h in states], dim=1))
    heldout = {t: float((held_logits[t].argmax(-1).numpy() == held_labels[t]).mean()) for t in TASKS}
    return EncoderResult(out_dir, losses, accuracy, heldout, time.perf_counter() - t0)
