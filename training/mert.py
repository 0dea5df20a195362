"""MERT as transformers' ``HubertModel``, and the per-state time-means MU-LLaMA feeds its adapter.

MERT-v1 checkpoints ship their own ``MERTModel`` code; with the CQT branch and deepnorm off (as in
MERT-v1-330M) it is exactly ``HubertModel(do_stable_layer_norm=True, feat_extract_norm="group",
conv_bias=False, feat_proj_layer_norm=True)``, so we map the config and never run remote code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import HubertConfig, HubertModel

from mullama_sdk.constants import SAMPLE_RATE_HZ
from mullama_sdk.errors import CheckpointError, ConfigError

# Fields only MERT's own code knows; each must hold the value under which MERT == HubertModel.
_MERT_ONLY_FIELDS = {
    "feature_extractor_cqt": False,
    "deepnorm": False,
}
# Fields of MERT's config that HubertConfig does not take and that change nothing when ignored.
_MERT_IGNORED_FIELDS = {
    "feature_extractor_cqt_bins", "attention_relax", "sample_rate", "auto_map", "architectures",
    "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path", "tokenizer_class",
}
# What the spec's MERT is; a config that says otherwise is not the model this SDK runs.
_REQUIRED_HUBERT = {"do_stable_layer_norm": True}

# transformers >= 4.45 registers the positional-conv weight norm as a parametrization; 2023 files
# (and the published MU-LLaMA checkpoint) name its two halves weight_g / weight_v.
_WEIGHT_NORM_OLD_TO_NEW = {
    "encoder.pos_conv_embed.conv.weight_g": "encoder.pos_conv_embed.conv.parametrizations.weight.original0",
    "encoder.pos_conv_embed.conv.weight_v": "encoder.pos_conv_embed.conv.parametrizations.weight.original1",
}


def hubert_config_from_mert(raw: dict[str, Any], *, source: str = "MERT config") -> HubertConfig:
    """Map a MERT-style ``config.json`` dict onto an equivalent ``HubertConfig``.

    Raises:
        ConfigError: CQT branch or deepnorm enabled, attention relaxation on, a sample rate other than
            24 kHz, or a layout the spec's MERT does not have.
    """
    for key, allowed in _MERT_ONLY_FIELDS.items():
        if bool(raw.get(key, allowed)) != allowed:
            raise ConfigError(
                f"{source}: {key}={raw[key]!r} is not supported; only MERT with {key}={allowed} "
                "(as MERT-v1-330M) equals transformers' HubertModel"
            )
    relax = raw.get("attention_relax", -1.0)
    if relax is not None and float(relax) > 0:
        raise ConfigError(f"{source}: attention_relax={relax} is not supported (must be <= 0, i.e. off)")
    sr = raw.get("sample_rate", SAMPLE_RATE_HZ)
    if int(sr) != SAMPLE_RATE_HZ:
        raise ConfigError(f"{source}: sample_rate={sr}; MU-LLaMA's MERT runs at {SAMPLE_RATE_HZ} Hz")
    for key, want in _REQUIRED_HUBERT.items():
        if raw.get(key) != want:
            raise ConfigError(f"{source}: {key}={raw.get(key)!r}, expected {want!r} for a MERT-v1 model")
    known = set(HubertConfig().to_dict())
    kwargs = {k: v for k, v in raw.items() if k in known and k not in _MERT_IGNORED_FIELDS}
    unknown = sorted(set(raw) - known - _MERT_IGNORED_FIELDS - set(_MERT_ONLY_FIELDS))
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {unknown}; refusing to guess what they change")
    cfg = HubertConfig(**kwargs)
    # Eager attention: the plain math, identical on every device and exportable to ONNX as is.
    cfg._attn_implementation = "eager"
    return cfg


def read_mert_folder(mert_dir: Path) -> tuple[dict[str, Any], bool]:
    """Return (raw config.json dict, do_normalize of preprocessor_config.json) of a MERT folder."""
    mert_dir = Path(mert_dir)
    cfg_path = mert_dir / "config.json"
    try:
        raw = json.loads(cfg_path.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"MERT folder {mert_dir} has no config.json") from e
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {cfg_path}: {e}") from e
    do_normalize = False
    pre = mert_dir / "preprocessor_config.json"
    if pre.exists():
        try:
            pre_raw = json.loads(pre.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read {pre}: {e}") from e
        do_normalize = bool(pre_raw.get("do_normalize", False))
        sr = int(pre_raw.get("sampling_rate", SAMPLE_RATE_HZ))
        if sr != SAMPLE_RATE_HZ:
            raise ConfigError(f"{pre}: sampling_rate={sr}; MU-LLaMA's MERT runs at {SAMPLE_RATE_HZ} Hz")
    return raw, do_normalize


def to_hubert_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename 2023-style weight-norm keys (weight_g/weight_v) to the parametrization names.

    Raises:
        CheckpointError: both spellings present at once (which one is real would be a guess).
    """
    out = dict(sd)
    for old, new in _WEIGHT_NORM_OLD_TO_NEW.items():
        if old in out:
            if new in out:
                raise CheckpointError(f"MERT weights hold both {old} and {new}; expected one spelling")
            out[new] = out.pop(old)
    return out


class MertEncoder(nn.Module):
    """A ``HubertModel`` plus the reduction MU-LLaMA applies: each hidden state averaged over time.

    The hidden states are gathered by walking the model's own submodules rather than through
    ``output_hidden_states``: transformers 4.x and 5.x disagree on whether the last state is taken
    before or after the final LayerNorm, and the spec fixes it (state N = LayerNorm(layer N output)).
    """

    def __init__(self, config: HubertConfig, *, do_normalize: bool = False) -> None:
        super().__init__()
        self.hubert = HubertModel(config)
        self.do_normalize = do_normalize

    @property
    def n_states(self) -> int:
        return self.hubert.config.num_hidden_layers + 1

    @property
    def dim(self) -> int:
        return self.hubert.config.hidden_size

    def hidden_states(self, waveform: torch.Tensor) -> list[torch.Tensor]:
        """All ``n_states`` hidden states, each ``(batch, frames, dim)``, for a ``(batch, samples)`` waveform."""
        x = waveform
        if self.do_normalize:
            # Wav2Vec2FeatureExtractor's per-utterance normalisation (off for MERT-v1-330M).
            x = (x - x.mean(dim=-1, keepdim=True)) / torch.sqrt(x.var(dim=-1, keepdim=True, unbiased=False) + 1e-7)
        h = self.hubert.feature_extractor(x).transpose(1, 2)
        h = self.hubert.feature_projection(h)
        if isinstance(h, tuple):  # transformers 4.x also returned the un-projected features
            h = h[0]
        encoder = self.hubert.encoder
        h = h + encoder.pos_conv_embed(h)
        states = [h]
        for layer in encoder.layers:
            h = layer(h, attention_mask=None)
            if isinstance(h, tuple):
                h = h[0]
            states.append(h)
        states[-1] = encoder.layer_norm(states[-1])
        return states

    def forward(self, waveform: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Time-mean of every hidden state: ``(batch, n_states, dim)``, and the number of frames."""
        states = self.hidden_states(waveform)
        n_frames = states[0].shape[1]
        return torch.stack([s.mean(dim=1) for s in states], dim=1), n_frames

    def load_weights(self, sd: dict[str, torch.Tensor]) -> None:
        """Strictly load HubertModel weights (either weight-norm spelling), naming every mismatch."""
        from training.state_dict import load_strict

        load_strict(self.hubert, to_hubert_state_dict(sd), what="MERT")
