"""MERT as transformers' ``HubertModel``, and the per-state time-means MU-LLaMA feeds its adapter.

MERT-v1 checkpoints ship their own ``MERTModel`` code; with the CQT branch and deepnorm off (as in
MERT-v1-330M) it is exactly ``HubertModel(do_stable_layer_norm=True, feat_extract_norm="group",
conv_bias=False, feat_proj_layer_norm=True)``, so we map the config and never run remote code.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import HubertConfig, HubertModel

from mullama_sdk.constants import SAMPLE_RATE_HZ
from mullama_sdk.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

# ---- the fields of a MERT-v1 config.json -----------------------------------------------------------------
# The published MERT-v1-330M config.json is MERT's own MERTConfig (model_type "mert_model", auto_map to its
# remote code): HubertConfig's fields plus MERT's and a few left over from fairseq. Every field is sorted into
# one class below, and the class decides what the loader does with it.

#: MERT-only fields that change the computation: each must hold the value under which MERT == HubertModel.
_MERT_MATH_FIELDS = {
    "feature_extractor_cqt": False,
    "deepnorm": False,
}
#: HubertConfig fields whose other value is another model than the spec's (False = post-LN encoder).
_REQUIRED_HUBERT = {"do_stable_layer_norm": True}
#: MERT-only fields that change nothing while CQT and deepnorm are off: ``attention_relax`` is read only by
#: MERT's deepnorm encoder (and is a softmax shift that cancels out anyway; MERT-v1-330M says 32.0),
#: ``feature_extractor_cqt_bins`` sizes the CQT branch. ``sample_rate`` is checked against 24 kHz on its own.
_MERT_INERT_FIELDS = {"attention_relax", "feature_extractor_cqt_bins", "sample_rate"}
#: Training-only switches HubertConfig does not know (fairseq's masking options, the old checkpointing flag,
#: BERT's dropout name). The ones HubertConfig knows (dropouts, layerdrop, mask_time_*, ...) are passed on:
#: they act only in train mode, and MERT here only runs frozen in eval mode without SpecAugment (but
#: ``mask_time_prob > 0`` gives HubertModel its ``masked_spec_embed`` parameter, which checkpoints carry).
_TRAINING_ONLY_FIELDS = {
    "gradient_checkpointing", "hidden_dropout_prob", "feat_extract_dropout", "layerdrop",
    "mask_channel_length", "mask_channel_min_space", "mask_channel_other", "mask_channel_prob",
    "mask_channel_selection", "mask_time_min_space", "mask_time_other", "mask_time_selection",
    "mask_time_length", "mask_time_min_masks", "mask_time_prob", "mask_feature_length",
    "mask_feature_min_masks", "mask_feature_prob", "apply_spec_augment",
}
#: About the file, not the model; never passed to HubertConfig.
_METADATA_FIELDS = {
    "model_type", "architectures", "auto_map", "transformers_version", "torch_dtype", "dtype",
    "_name_or_path", "_commit_hash", "tokenizer_class",
}

# transformers >= 4.45 registers the positional-conv weight norm as a parametrization; 2023 files
# (and the published MU-LLaMA checkpoint) name its two halves weight_g / weight_v.
_WEIGHT_NORM_OLD_TO_NEW = {
    "encoder.pos_conv_embed.conv.weight_g": "encoder.pos_conv_embed.conv.parametrizations.weight.original0",
    "encoder.pos_conv_embed.conv.weight_v": "encoder.pos_conv_embed.conv.parametrizations.weight.original1",
}


#: ``preprocessor_config.json`` of MERT-v1-330M, field for field (the published file's Wav2Vec2FeatureExtractor
#: settings): raw 24 kHz mono waveform in, no normalisation.
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
    """MERT-v1-330M's ``config.json``, field for field, at any widths.

    The field list is the published file's (``m-a-p/MERT-v1-330M/config.json``, 93 lines: MERTConfig's
    fields, MERT's own ``attention_relax`` 32.0, ``deepnorm``/``feature_extractor_cqt`` off, fairseq's
    ``mask_channel_*``/``mask_time_*`` leftovers, the training-only switches). Values other than the widths
    are the published ones where this code's authors read them (up to ``mask_channel_selection``); the rest
    are MERTConfig's defaults, and ``transformers_version`` is only a plausible one. The conv feature encoder
    keeps MERT's kernels and strides (75 frames per second at 24 kHz); only its channel count, the transformer
    widths and the positional convolution vary.
    """
    return {
        "_name_or_path": "m-a-p/MERT-v1-330M",
        "activation_dropout": 0.0,
        "apply_spec_augment": True,
        "architectures": ["MERTModel"],
        "attention_dropout": 0.0,
        "attention_relax": 32.0,
        "auto_map": {
            "AutoConfig": "configuration_MERT.MERTConfig",
            "AutoModel": "modeling_MERT.MERTModel",
        },
        "bos_token_id": 1,
        "classifier_proj_size": 256,
        "conv_bias": False,
        "conv_dim": [conv_dim] * 7,
        "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
        "conv_stride": [5, 2, 2, 2, 2, 2, 2],
        "ctc_loss_reduction": "sum",
        "ctc_zero_infinity": False,
        "deepnorm": False,
        "do_stable_layer_norm": True,
        "eos_token_id": 2,
        "feat_extract_activation": "gelu",
        "feat_extract_dropout": 0.0,
        "feat_extract_norm": "group",
        "feat_proj_dropout": 0.0,
        "feat_proj_layer_norm": True,
        "feature_extractor_cqt": False,
        "feature_extractor_cqt_bins": 336,
        "final_dropout": 0.0,
        "gradient_checkpointing": False,
        "hidden_act": "gelu",
        "hidden_dropout": 0.0,
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": intermediate_size,
        "layer_norm_eps": 1e-5,
        "layerdrop": 0.0,
        "mask_channel_length": 10,
        "mask_channel_min_space": 1,
        "mask_channel_other": 0.0,
        "mask_channel_prob": 0.0,
        "mask_channel_selection": "static",
        "mask_feature_length": 10,
        "mask_feature_min_masks": 0,
        "mask_feature_prob": 0.0,
        "mask_time_length": 10,
        "mask_time_min_masks": 2,
        "mask_time_min_space": 1,
        "mask_time_other": 0.0,
        "mask_time_prob": 0.05,
        "mask_time_selection": "static",
        "model_type": "mert_model",
        "num_attention_heads": num_attention_heads,
        "num_conv_pos_embedding_groups": num_conv_pos_embedding_groups,
        "num_conv_pos_embeddings": num_conv_pos_embeddings,
        "num_feat_extract_layers": 7,
        "num_hidden_layers": num_hidden_layers,
        "pad_token_id": 0,
        "sample_rate": SAMPLE_RATE_HZ,
        "tokenizer_class": "Wav2Vec2CTCTokenizer",
        "torch_dtype": "float32",
        "transformers_version": "4.24.0",
        "use_weighted_layer_sum": False,
        "vocab_size": 32,
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


def check_mert_config(raw: Any, *, source: str = "MERT config", log_level: int = logging.DEBUG) -> dict[str, Any]:
    """Check a MERT-style ``config.json`` dict and return the ``HubertConfig`` arguments it amounts to.

    Refused are only fields that change the computation: the CQT branch or deepnorm on, the post-LN
    layout (``do_stable_layer_norm`` false), a sample rate other than 24 kHz. Training-only switches and
    metadata are accepted; fields this loader does not know are logged (one line at ``log_level``) and
    left out.

    Raises:
        ConfigError: naming ``source`` and the field.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    for key, allowed in _MERT_MATH_FIELDS.items():
        if key in raw and bool(raw[key]) != allowed:
            raise ConfigError(
                f"{source}: {key}={raw[key]!r} is not supported; only MERT with {key}={allowed} "
                "(as MERT-v1-330M) equals transformers' HubertModel"
            )
    for key, want in _REQUIRED_HUBERT.items():
        if raw.get(key) != want:
            raise ConfigError(f"{source}: {key}={raw.get(key)!r}, expected {want!r} for a MERT-v1 model")
    sr = raw.get("sample_rate", SAMPLE_RATE_HZ)
    try:
        sr_ok = int(sr) == SAMPLE_RATE_HZ
    except (TypeError, ValueError):
        sr_ok = False
    if not sr_ok:
        raise ConfigError(f"{source}: sample_rate={sr!r}; MU-LLaMA's MERT runs at {SAMPLE_RATE_HZ} Hz")
    known = set(HubertConfig().to_dict())
    skipped = _METADATA_FIELDS | _MERT_INERT_FIELDS | set(_MERT_MATH_FIELDS)
    unknown = sorted(set(raw) - known - skipped - _TRAINING_ONLY_FIELDS)
    if unknown:
        log.log(log_level, "%s: ignoring field(s) this loader does not know: %s", source, ", ".join(unknown))
    return {k: v for k, v in raw.items() if k in known and k not in skipped}


def hubert_config_from_mert(raw: dict[str, Any], *, source: str = "MERT config") -> HubertConfig:
    """Map a MERT-style ``config.json`` dict onto an equivalent ``HubertConfig``.

    Raises:
        ConfigError: see :func:`check_mert_config`.
    """
    cfg = HubertConfig(**check_mert_config(raw, source=source))
    # Eager attention: the plain math, identical on every device and exportable to ONNX as is.
    cfg._attn_implementation = "eager"
    return cfg


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from e


def check_mert_preprocessor(raw: Any, *, source: str) -> None:
    """Refuse a ``preprocessor_config.json`` whose feature extraction is not MERT-v1's raw 24 kHz waveform.

    Checked: ``feature_extractor_type`` (Wav2Vec2FeatureExtractor), ``sampling_rate`` (24000),
    ``do_normalize`` (false; Wav2Vec2FeatureExtractor normalises when the field is absent) and
    ``feature_size`` (1). Padding settings do not matter for one clip at a time.

    Raises:
        ConfigError: naming ``source`` and the field.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    kind = raw.get("feature_extractor_type", MERT_PREPROCESSOR["feature_extractor_type"])
    if kind != MERT_PREPROCESSOR["feature_extractor_type"]:
        raise ConfigError(
            f"{source}: feature_extractor_type={kind!r}; MERT-v1 takes the raw waveform "
            f"({MERT_PREPROCESSOR['feature_extractor_type']})"
        )
    sr = raw.get("sampling_rate", SAMPLE_RATE_HZ)
    if isinstance(sr, bool) or not isinstance(sr, int | float) or sr != SAMPLE_RATE_HZ:
        raise ConfigError(f"{source}: sampling_rate={sr!r}; MU-LLaMA's MERT runs at {SAMPLE_RATE_HZ} Hz")
    if "do_normalize" not in raw or raw["do_normalize"] is not False:
        shown = f"={raw['do_normalize']!r}" if "do_normalize" in raw else " is missing (then it defaults to true)"
        raise ConfigError(
            f"{source}: do_normalize{shown}; MERT-v1 takes the waveform unnormalised (do_normalize false), "
            "as the runtime feeds it"
        )
    size = raw.get("feature_size", 1)
    if size != 1 or isinstance(size, bool):
        raise ConfigError(f"{source}: feature_size={size!r}; MERT-v1 takes one raw sample per step (1)")


def read_mert_folder(mert_dir: Path) -> tuple[dict[str, Any], bool]:
    """Return (raw ``config.json`` dict, ``do_normalize``) of a MERT folder, both checked.

    ``preprocessor_config.json`` is optional; when present it must describe MERT-v1's feature extraction
    (:func:`check_mert_preprocessor`), so ``do_normalize`` is always false. Fields of ``config.json`` this
    loader does not know are logged at INFO level.

    Raises:
        ConfigError: a missing or unreadable ``config.json``, or a field that changes the model (named
            together with its file).
    """
    mert_dir = Path(mert_dir)
    cfg_path = mert_dir / "config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"MERT folder {mert_dir} has no config.json")
    raw = _read_json(cfg_path)
    check_mert_config(raw, source=str(cfg_path), log_level=logging.INFO)
    pre = mert_dir / "preprocessor_config.json"
    if pre.exists():
        check_mert_preprocessor(_read_json(pre), source=str(pre))
    return raw, False


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
        from training.reference.state_dict import load_strict

        load_strict(self.hubert, to_hubert_state_dict(sd), what="MERT")
