"""Recipe configuration: YAML file + ``key.sub=value`` overrides -> typed, validated dataclasses.

Unknown keys fail, naming the valid ones (a typo must not silently train with a default). Relative
paths are taken relative to the current directory, as the launch command in each config's first
line assumes (run from the repository root).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mullama_sdk.errors import ConfigError

STAGES = ("pretrain", "finetune")
PRECISIONS = ("fp32", "bf16", "fp16")
BASE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ModelConfig:
    """Where the weights come from and the shape of what is trained.

    Attributes:
        llama_dir: Meta LLaMA folder (``params.json``, ``tokenizer.model``, ``consolidated.*.pth``).
        mert_dir: MERT folder (``config.json``, weights).
        init_checkpoint: Start from these trained parts. Pretrain: optional (none = fresh adapter, zero
            gates); it must hold no finetune deltas. Finetune: required (a pretrain checkpoint, ours or
            the published one).
        n_inject: Last LLaMA layers that receive music (fresh pretrain only; 20 in MU-LLaMA).
        query_len: Adapter tokens per injected layer (fresh pretrain only; 1 in MU-LLaMA).
        adapter_blocks: Residual blocks of the music adapter (fresh pretrain only).
        adapter_hidden: Width inside each block; ``None`` = 4 x LLaMA dim (16384 for 7B).
        lora_rank: Finetune: rank of the LoRA deltas added when the init checkpoint has none.
        bias: Finetune: add biases on wq, wo, w1, w2, w3 when the init checkpoint has none.
        base_dtype: dtype of the frozen LLaMA matrices; not float32 only with bf16/fp16 autocast.
        trust_pickle: Allow arbitrary unpickling of ``init_checkpoint`` (trusted files only).
    """

    llama_dir: str = ""
    mert_dir: str = ""
    init_checkpoint: str | None = None
    n_inject: int = 20
    query_len: int = 1
    adapter_blocks: int = 3
    adapter_hidden: int | None = None
    lora_rank: int = 16
    bias: bool = True
    base_dtype: str = "float32"
    trust_pickle: bool = False


@dataclass
class DataConfig:
    """Training data.

    Attributes:
        train_json: MusicQA-format JSON.
        audio_dir: Folder ``audio_name`` is relative to; ``None`` = the JSON's folder.
        max_words: Longest sequence in tokens (96 pretrain / 512 finetune in the published recipe).
        feature_cache: MERT feature cache folder; ``None`` = ``<output_dir>/features``.
        max_window_seconds: Encoder window length, as the runtime's (30 s).
        num_workers: DataLoader worker processes.
    """

    train_json: str = ""
    audio_dir: str | None = None
    max_words: int = 96
    feature_cache: str | None = None
    max_window_seconds: float = 30.0
    num_workers: int = 0


@dataclass
class OptimConfig:
    """AdamW with weight decay on matrices only, linear warm-up then half-cycle cosine to ``min_lr``.

    Attributes:
        lr: Peak learning rate (reached after ``warmup_steps`` optimizer steps).
        min_lr: Floor at the end of the cosine.
        weight_decay: Applied to tensors with at least two non-singleton dims (matrices) only.
        betas: AdamW betas ((0.9, 0.95) in the published recipe).
        eps: AdamW epsilon.
        warmup_steps: Optimizer steps of linear warm-up.
        clip_grad_norm: Clip the global gradient norm to this; ``None`` = no clipping.
    """

    lr: float = 1e-4
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 0
    clip_grad_norm: float | None = None


@dataclass
class LoopConfig:
    """The training loop.

    Attributes:
        batch_size: Examples per micro-batch per process (1 in the published recipe).
        grad_accum: Micro-batches per optimizer step (4 pretrain / 32 finetune in the published recipe).
        max_steps: Optimizer steps; ``None`` = derived from ``epochs``.
        epochs: Passes over the data (used when ``max_steps`` is ``None``).
        precision: ``fp32``, ``bf16`` (autocast; CUDA or CPU) or ``fp16`` (autocast + loss scaling; CUDA).
        seed: Seeds torch, numpy, python and the data order.
        device: ``auto`` (``cuda:LOCAL_RANK`` when CUDA is available), ``cpu``, ``cuda``.
        log_every: Log a line every this many optimizer steps.
        save_every: Save a checkpoint every this many steps (and always at the end); ``None`` = end only.
        keep_last: Step checkpoints kept in ``output_dir`` (older ones are deleted); 0 = keep all.
    """

    batch_size: int = 1
    grad_accum: int = 4
    max_steps: int | None = None
    epochs: float | None = 1.0
    precision: str = "fp32"
    seed: int = 0
    device: str = "auto"
    log_every: int = 1
    save_every: int | None = None
    keep_last: int = 2


@dataclass
class RecipeConfig:
    """Everything one run needs; stored in every checkpoint it writes.

    Attributes:
        stage: ``pretrain`` or ``finetune`` (set by the subcommand).
        output_dir: Checkpoints, ``log.json``, ``loss.png`` and the resolved ``config.yaml`` go here.
        resume: A checkpoint of this run to continue from, or ``auto`` (the newest in ``output_dir``, if any).
        save_published: Also write each checkpoint in the published MU-LLaMA layout (``*.published.pth``).
    """

    stage: str = "pretrain"
    output_dir: str = ""
    resume: str | None = None
    save_published: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> RecipeConfig:
        """Check values that the dataclass types cannot; returns ``self``.

        Raises:
            ConfigError: naming the key and what would be valid.
        """
        m, d, o, t = self.model, self.data, self.optim, self.train
        _need(self.stage in STAGES, f"stage={self.stage!r}; valid: {', '.join(STAGES)}")
        for key, value in (("output_dir", self.output_dir), ("model.llama_dir", m.llama_dir),
                           ("model.mert_dir", m.mert_dir), ("data.train_json", d.train_json)):
            _need(bool(value), f"{key} is required")
        if self.stage == "finetune":
            _need(bool(m.init_checkpoint), "finetune needs model.init_checkpoint (a pretrain-stage checkpoint)")
        _need(t.precision in PRECISIONS, f"train.precision={t.precision!r}; valid: {', '.join(PRECISIONS)}")
        _need(m.base_dtype in BASE_DTYPES, f"model.base_dtype={m.base_dtype!r}; valid: {', '.join(BASE_DTYPES)}")
        _need(m.base_dtype == "float32" or t.precision != "fp32",
              f"model.base_dtype={m.base_dtype} needs train.precision bf16 or fp16 (autocast)")
        _need(t.batch_size >= 1 and t.grad_accum >= 1, "train.batch_size and train.grad_accum must be >= 1")
        _need(t.max_steps is not None or (t.epochs is not None and t.epochs > 0),
              "set train.max_steps or a positive train.epochs")
        _need(t.max_steps is None or t.max_steps >= 1, f"train.max_steps must be >= 1, got {t.max_steps}")
        _need(o.lr > 0 and 0 <= o.min_lr <= o.lr, f"need 0 <= optim.min_lr <= optim.lr and lr > 0 "
              f"(got lr={o.lr}, min_lr={o.min_lr})")
        _need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), f"optim.betas={o.betas}: two values in [0, 1)")
        _need(o.weight_decay >= 0 and o.warmup_steps >= 0, "optim.weight_decay and optim.warmup_steps must be >= 0")
        _need(o.clip_grad_norm is None or o.clip_grad_norm > 0, "optim.clip_grad_norm must be > 0 or null")
        _need(d.max_words >= 2, f"data.max_words must be >= 2, got {d.max_words}")
        _need(m.lora_rank >= 0, f"model.lora_rank must be >= 0, got {m.lora_rank}")
        _need(m.n_inject >= 1 and m.query_len >= 1 and m.adapter_blocks >= 0,
              "model.n_inject and model.query_len must be >= 1, model.adapter_blocks >= 0")
        _need(t.log_every >= 1 and (t.save_every is None or t.save_every >= 1) and t.keep_last >= 0,
              "train.log_every >= 1, train.save_every >= 1 or null, train.keep_last >= 0")
        return self


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``optim.lr=3e-4`` -> (["optim", "lr"], 3e-4); values are read as YAML (``null``, lists, numbers)."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not KEY=VALUE (e.g. optim.lr=3e-4 or train.max_steps=100)")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {e}") from e
    return key.strip().split("."), parsed


def load_recipe_config(path: Path | None, overrides: list[str] = (), *, stage: str | None = None) -> RecipeConfig:
    """Read a YAML config, apply ``key=value`` overrides, fill defaults, validate.

    Raises:
        ConfigError: unreadable YAML, unknown keys, wrong types or invalid values.
    """
    import yaml

    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {k} is not a section")
        node[keys[-1]] = value
    if stage is not None:
        if raw.get("stage", stage) != stage:
            raise ConfigError(f"the config says stage {raw['stage']!r} but the command is {stage!r}")
        raw["stage"] = stage
    return _build(RecipeConfig, raw, "").validate()


def _build(cls, raw: dict[str, Any], where: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{where.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(where + u for u in unknown)}; valid: "
                          f"{', '.join(where + f for f in fields)}")
    kwargs = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, f"{where}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, where + name)
    return cls(**kwargs)


def _coerce(value: Any, hint, key: str):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}={value!r}: expected {hint}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}: expected a list")
        (item,) = typing.get_args(hint)
        return [_coerce(v, item, key) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}={value!r}: expected an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r}: expected a number")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r}: expected a string")
    raise ConfigError(f"{key}: unsupported type {hint}")


def dump_yaml(cfg: RecipeConfig, path: Path, launch: str) -> None:
    """Write the resolved config with its launch command as the first comment line."""
    import yaml

    Path(path).write_text(f"# {launch}\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
