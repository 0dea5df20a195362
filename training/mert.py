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


#: ``preprocessor_config.json`` of a MERT-v1 folder: raw 24 kHz waveform in, no normalisation.
MERT_PREPROCESSOR = {
    "do_normalize": False,
    "feature_extractor_type": "Wav2Vec2FeatureExtractor",
    "feature_size": 1,
    "padding_side": "right",
    "padding_value": 0.0,
    "return_attention_mask": True,
    "sampling_rate": SAMPLE_RATE_HZ,
}


def mert_folder_config(
    *,
    hidden_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    intermediate_size: int,
    conv_dim: int,
    num_conv_pos_embeddings: int,
    num_conv_pos_embedding_groups: int,
) -> dict[str, Any]:
    """A MERT-v1 style ``config.json`` (HuBERT fields plus MERT's own, CQT and deepnorm off) at any widths.

    The conv feature encoder keeps MERT's kernels and strides (75 frames per second at 24 kHz); only its
    channel count, the transformer widths and the positional convolution vary.
    """
    return {
        "model_type": "mert_model",
        "architectures": ["MERTModel"],
        "hidden_size": hidden_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "intermediate_size": intermediate_size,
        "conv_dim": [conv_dim] * 7,
        "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
        "conv_stride": [5, 2, 2, 2, 2, 2, 2],
        "conv_bias": False,
        "num_feat_extract_layers": 7,
        "feat_extract_norm": "group",
        "feat_extract_activation": "gelu",
        "do_stable_layer_norm": True,
        "feat_proj_layer_norm": True,
        "num_conv_pos_embeddings": num_conv_pos_embeddings,
        "num_conv_pos_embedding_groups": num_conv_pos_embedding_groups,
        "layer_norm_eps": 1e-5,
        "hidden_act": "gelu",
        "hidden_dropout": 0.0,
        "activation_dropout": 0.0,
        "attention_dropout": 0.0,
        "feat_proj_dropout": 0.0,
        "final_dropout": 0.0,
        "layerdrop": 0.0,
        "mask_time_prob": 0.05,
        "initializer_range": 0.02,
        "feature_extractor_cqt": False,
        "feature_extractor_cqt_bins": 336,
        "deepnorm": False,
        "attention_relax": -1.0,
        "sample_rate": SAMPLE_RATE_HZ,
    }


def write_mert_folder(folder: Path, config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> None:
    """Write a MERT folder (``config.json``, ``preprocessor_config.json``, ``pytorch_model.bin``).

    Weight-norm keys are written in the 2023 spelling (``weight_g``/``weight_v``) that released MERT files
    use; :func:`to_hubert_state_dict` reads either.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (folder / "preprocessor_config.json").write_text(json.dumps(MERT_PREPROCESSOR, indent=2, sort_keys=True) + "\n")
    new_to_old = {new: old for old, new in _WEIGHT_NORM_OLD_TO_NEW.items()}
    sd = {new_to_old.get(k, k): v.detach().contiguous() for k, v in state_dict.items()}
    torch.save(sd, folder / "pytorch_model.bin")


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
        return self.states_from_features(self.hubert.feature_extractor(x))

    def states_from_features(self, features: torch.Tensor) -> list[torch.Tensor]:
        """The hidden states from the conv feature encoder's output ``(batch, conv_dim, frames)``.

        Split from :meth:`hidden_states` so that a frozen conv front end can run once per clip and the
        transformer be trained on its cached output.
        """
        h = self.hubert.feature_projection(features.transpose(1, 2))
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
