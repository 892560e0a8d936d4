"""Typed run configuration: YAML -> dataclasses -> ``key=value`` overrides.

Every field carries a ``help`` string and a default taken from the papers' released code. Unknown
or misspelled keys fail with the dotted key and the closest valid one (the struct mode of
OmegaConf, without the dependency). Cross-field checks live in each dataclass's ``__post_init__``
and say how to fix the problem.

Example::

    cfg = load_config("configs/sdxl/diffusion_dpo_lora.yaml", ["train.max_steps=2000", "method.beta=5000"])
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key and how to fix it."""


def _f(default: Any = dataclasses.MISSING, help: str = "", **kwargs: Any) -> Any:
    """A dataclass field with a help string (mutable defaults go through ``default_factory``)."""
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class ModelConfig:
    pretrained: str = _f("stable-diffusion-v1-5/stable-diffusion-v1-5", "Hub id or local directory of a diffusers pipeline.")
    family: str = _f("auto", "Pipeline family: auto (read model_index.json) or one of `mmalign ls` (sd15, sdxl, cogvideox, wan, toy_video).")
    revision: str | None = _f(None, "Hub revision (branch, tag or commit) of `pretrained`.")
    variant: str | None = _f(None, "Weight variant to load, e.g. fp16.")
    vae: str | None = _f(None, "Replacement VAE (hub id or path), e.g. madebyollin/sdxl-vae-fp16-fix for SDXL in fp16.")
    resolution: int = _f(512, "Training resolution in pixels (square); SDXL uses 1024.")
    trust_remote_code: bool = _f(False, "Allow custom code from the model repository. Off unless you trust it.")
    adapter_options: dict = _f({}, "Family-specific adapter options, e.g. {timestep_sampling: logit_normal} for wan (the DenseDPO paper's rectified-flow timesteps).")

    def __post_init__(self) -> None:
        if self.resolution % 8:
            raise ConfigError(f"model.resolution={self.resolution} must be a multiple of 8 (the VAE downsamples by 8).")


@dataclass
class LoraConfig:
    enabled: bool = _f(True, "Train LoRA adapters through peft (reference = adapters disabled). false = full fine-tuning.")
    rank: int = _f(8, "LoRA rank r.")
    alpha: float | None = _f(None, "LoRA alpha; defaults to the rank (scale 1), as diffusers' DPO scripts do.")
    dropout: float = _f(0.0, "LoRA dropout.")
    target_modules: list[str] = _f(["to_q", "to_k", "to_v", "to_out.0"], "UNet/transformer modules that get adapters.")
    init: str = _f("gaussian", "peft init_lora_weights: gaussian (B=0, model equals reference at step 0) or default.")

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"lora.rank={self.rank} must be >= 1 (set lora.enabled=false for full fine-tuning).")


@dataclass
class DataConfig:
    source: str = _f("", "Pair data: a JSONL/CSV manifest, a parquet file or folder (Pick-a-Pic v2 layout), or a datasets directory.")
    format: str = _f("auto", "auto | manifest | pickapic.")
    split: str = _f("train", "Split to read from a datasets directory.")
    keep_ties: bool = _f(False, "Keep label_0 == 0.5 pairs (image_0 treated as chosen). The papers drop them (~12% of Pick-a-Pic).")
    on_bad_item: str = _f("error", "What a corrupt or missing image does: error (stop, naming row and file) or skip (counted, reported).")
    random_flip: bool = _f(True, "Random horizontal flip, as the reference code (per image for SD1.5, jointly for SDXL).")
    random_crop: bool = _f(False, "Random instead of centre crop.")
    caption_dropout: float = _f(0.2, "Probability of replacing the prompt with '' (SF: --proportion_empty_prompts 0.2).")
    max_items: int | None = _f(None, "Use at most this many pairs (debugging).")
    num_workers: int = _f(0, "DataLoader worker processes.")
    cache: bool = _f(True, "Encode VAE latents and text embeddings once into safetensors shards and train from them.")
    cache_dir: str | None = _f(None, "Cache directory; default <output_dir>/../.mmalign_cache next to the run (shared by runs).")
    cache_batch_size: int = _f(8, "Batch size of the one-off encoding pass that fills the cache.")
    cache_build: str = _f("eager", "eager: encode every pair before step 1; lazy: encode each pair the first time a batch draws it (no up-front pass; later epochs and runs read it back).")
    cache_max_gb: float | None = _f(None, "Refuse to build a latent cache estimated above this many GB (the estimate is printed before building; SDXL 1024 px is ~2.1 MB per pair).")
    shuffle: bool = _f(True, "Shuffle pairs each epoch. false keeps file order (a `mmalign label --strategy curriculum` manifest: easy pairs first).")

    def __post_init__(self) -> None:
        if self.format not in ("auto", "manifest", "pickapic"):
            raise ConfigError(f"data.format={self.format!r}: use auto, manifest or pickapic.")
        if self.cache_build not in ("eager", "lazy"):
            raise ConfigError(f"data.cache_build={self.cache_build!r}: use eager or lazy.")
        if self.on_bad_item not in ("error", "skip"):
            raise ConfigError(f"data.on_bad_item={self.on_bad_item!r}: use error or skip.")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ConfigError(f"data.caption_dropout={self.caption_dropout} must be in [0, 1).")


@dataclass
class TrainConfig:
    output_dir: str = _f("outputs/run", "Where checkpoints, logs, validation grids and the final export go.")
    max_steps: int = _f(2000, "Optimizer steps.")
    batch_size: int = _f(1, "Pairs per device per micro-step.")
    gradient_accumulation_steps: int = _f(1, "Micro-steps per optimizer step.")
    learning_rate: float = _f(1e-8, "Base learning rate (multiplied by the global batch when scale_lr is true).")
    scale_lr: bool = _f(True, "lr = learning_rate x batch_size x accumulation x processes (SF launchers: 1e-8 x 2048).")
    lr_scheduler: str = _f("constant_with_warmup", "Any diffusers get_scheduler name: constant, constant_with_warmup, linear, cosine ...")
    warmup_steps: int = _f(0, "Linear warmup steps.")
    optimizer: str = _f("adamw", "adamw | adafactor | adamw8bit (needs the [bnb] extra).")
    weight_decay: float = _f(1e-2, "AdamW weight decay.")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 disables).")
    mixed_precision: str = _f("no", "no | fp16 | bf16 (accelerate). Frozen parts are cast to this dtype.")
    gradient_checkpointing: bool = _f(False, "Trade compute for activation memory in the denoiser.")
    allow_tf32: bool = _f(True, "Allow TF32 matmuls on Ampere+ GPUs.")
    seed: int = _f(0, "Seed for data order, noise and timesteps.")
    checkpoint_every: int = _f(500, "Save a resumable checkpoint every N optimizer steps (0 = only at the end).")
    checkpoints_total_limit: int | None = _f(3, "Keep at most this many checkpoints (oldest removed after a new one is safely written).")
    resume: str | None = _f(None, "latest, or a checkpoint directory, to continue a run.")
    overwrite: bool = _f(False, "Start a new run in a non-empty output_dir (its old checkpoints are never resumed or rotated).")
    log_every: int = _f(1, "Log metrics every N optimizer steps.")
    report_to: str = _f("tensorboard", "tensorboard | wandb | none.")
    validation_every: int = _f(0, "Sample validation_prompts every N steps into a PNG grid (0 disables).")
    validation_prompts: list[str] = _f([], "Fixed prompts for validation grids.")
    validation_steps: int = _f(25, "Sampling steps for validation images.")
    validation_guidance: float = _f(5.0, "CFG scale for validation images.")
    validation_seed: int = _f(0, "Seed for validation images (same images every time).")
    progress: bool = _f(True, "Show a progress bar.")

    def __post_init__(self) -> None:
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ConfigError(f"train.mixed_precision={self.mixed_precision!r}: use no, fp16 or bf16.")
        if self.optimizer not in ("adamw", "adafactor", "adamw8bit"):
            raise ConfigError(f"train.optimizer={self.optimizer!r}: use adamw, adafactor or adamw8bit.")
        if self.report_to not in ("tensorboard", "wandb", "none"):
            raise ConfigError(f"train.report_to={self.report_to!r}: use tensorboard, wandb or none.")
        if self.max_steps < 1 or self.batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ConfigError("train.max_steps, train.batch_size and train.gradient_accumulation_steps must be >= 1.")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ConfigError(f"train.checkpoints_total_limit={self.checkpoints_total_limit} must be >= 1 (or null to keep every checkpoint).")
        if self.overwrite and self.resume:
            raise ConfigError("train.overwrite=true starts a new run and train.resume continues one: set only one of them.")
        if self.validation_every and not self.validation_prompts:
            raise ConfigError("train.validation_every is set but train.validation_prompts is empty: add prompts or set it to 0.")


@dataclass
class RunConfig:
    """A whole recipe: which model, which method, which data, how to train."""

    model: ModelConfig = _f(None, "The pipeline to tune.")
    method: Any = _f(None, "The method and its hyper-parameters; `name` picks the trainer (see `mmalign ls`).")
    data: DataConfig = _f(None, "Preference data.")
    lora: LoraConfig = _f(None, "LoRA settings (lora.enabled=false for full fine-tuning).")
    train: TrainConfig = _f(None, "Optimisation, precision, checkpoints and logging.")

    def __post_init__(self) -> None:
        self.model = self.model or ModelConfig()
        self.data = self.data or DataConfig()
        self.lora = self.lora or LoraConfig()
        self.train = self.train or TrainConfig()


# --------------------------------------------------------------------------------------------------
# dict <-> dataclass


def _closest(key: str, options: typing.Iterable[str]) -> str:
    match = difflib.get_close_matches(key, list(options), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; YAML quirks (``1e-5`` read as a string) are fixed."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def from_dict(cls: type, data: dict | None, prefix: str = "", method_configs: Mapping[str, type] | None = None) -> Any:
    """Build dataclass ``cls`` from a nested dict; unknown keys raise naming the closest valid key.

    ``method_configs`` (method name -> config class) is needed for a :class:`RunConfig`'s ``method`` section.
    """
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{dotted}'{_closest(key, names)}")
        tp = hints[key]
        if cls is RunConfig and key == "method":
            kwargs[key] = _method_from_dict(value, dotted, method_configs)
        elif dataclasses.is_dataclass(tp):
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"{dotted}: expected a mapping of {tp.__name__} keys, got {value!r}")
            kwargs[key] = from_dict(tp, value, f"{dotted}.")
        else:
            kwargs[key] = _coerce(value, tp, dotted)
    if cls is RunConfig:
        for key in ("model", "data", "lora", "train"):
            kwargs.setdefault(key, from_dict(hints[key], {}, f"{key}."))
        kwargs.setdefault("method", _method_from_dict({}, "method", method_configs))
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field without default
        raise ConfigError(f"{prefix or 'config'}: {err}") from err


def _method_from_dict(value: Any, key: str, method_configs: Mapping[str, type] | None) -> Any:
    if method_configs is None:
        raise TypeError("a RunConfig's method section needs method_configs: use mmalign.trainers.load_config, "
                        "or pass method_configs=mmalign.trainers.METHOD_CONFIGS")
    if value is not None and not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping with a name (e.g. name: diffusion_dpo), got {type(value).__name__}")
    value = dict(value or {})
    name = value.get("name", "diffusion_dpo")
    if name not in method_configs:
        raise ConfigError(f"{key}.name={name!r} is not a method{_closest(str(name), method_configs)}; known: {', '.join(method_configs)}")
    return from_dict(method_configs[name], value, f"{key}.")


def to_dict(cfg: Any) -> Any:
    """Dataclass -> plain nested dict (for saving the resolved config next to a run)."""
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: typing.Sequence[str]) -> list[tuple[str, Any]]:
    """``["train.max_steps=10", "lora.enabled=false"]`` -> ``[(key, value), ...]`` (values parsed as YAML)."""
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.max_steps=100)")
        key, raw = item.split("=", 1)
        parsed.append((key.strip(), yaml.safe_load(raw) if raw.strip() else ""))
    return parsed


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model, method, data, lora, train)")
    return data


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = (), *,
                method_configs: Mapping[str, type] | None = None) -> RunConfig:
    """Load a recipe and apply ``key=value`` overrides; raises :class:`ConfigError` naming the bad key.

    ``method_configs`` maps method names to their config classes (this module knows no method); most callers
    want :func:`mmalign.trainers.load_config`, which passes every registered method.
    """
    tree = load_yaml(path) if path is not None else {}
    for key, value in parse_overrides(overrides):
        _set_dotted(tree, key, value)
    try:
        return from_dict(RunConfig, tree, method_configs=method_configs)
    except ConfigError as err:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{err}") from None


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def describe(cls: type, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, help) for every field of ``cls``, for `mmalign validate --help-keys` and docs."""
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        )
        rows.append((f"{prefix}{f.name}", default, f.metadata.get("help", "")))
    return rows
