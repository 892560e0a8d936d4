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
import math
import reprlib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmalign.utils import first_line, safe_load


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key and how to fix it."""


# Limits on what a config may hold, so a hostile or broken file fails fast instead of exhausting memory.
MAX_CONFIG_BYTES = 1 << 20  # a recipe is a few KB
MAX_CONFIG_NODES = 100_000  # values after YAML aliases are expanded (a 300-byte "billion laughs" file is 1e9)
MAX_STRING = 4096  # longest string value (PATH_MAX on Linux)
_BOOL_WORDS = {"true": True, "false": False, "yes": True, "no": False, "on": True, "off": False}


_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict, _REPR.maxlevel = 60, 60, 4, 4, 2


def short(value: Any) -> str:
    """A bounded repr for error messages: never walks more than a few levels/items of a value."""
    return _REPR.repr(value)


def clip(text: Any, limit: int = 200) -> str:
    """``str(text)`` cut to ``limit`` characters (file names and reasons in one-line errors)."""
    text = str(text)
    return text if len(text) <= limit else text[:limit] + "..."


_name = clip


_CHECKS = ("ge", "gt", "le", "lt", "choices", "multiple_of", "nonempty")


def _f(default: Any = dataclasses.MISSING, help: str = "", **kwargs: Any) -> Any:
    """A dataclass field with a help string (mutable defaults go through ``default_factory``).

    Range checks ride along in the metadata and run in :func:`check_fields`: ``ge``/``gt``/``le``/``lt``
    (numbers), ``choices`` (allowed values), ``multiple_of`` (ints), ``nonempty`` (strings and lists).
    """
    meta = {"help": help, **{k: kwargs.pop(k) for k in _CHECKS if k in kwargs}}
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata=meta, **kwargs)
    return field(default=default, metadata=meta, **kwargs)


def check_fields(cfg: Any, section: str) -> None:
    """Apply every field's declared range (see :func:`_f`); raises :class:`ConfigError` naming ``section.key``."""
    for f in dataclasses.fields(cfg):
        value, meta, key = getattr(cfg, f.name), f.metadata, f"{section}.{f.name}"
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}={value} must be a finite number")
        if "choices" in meta and value not in meta["choices"]:
            raise ConfigError(f"{key}={short(value)}: choose from {', '.join(map(str, meta['choices']))}")
        if (
            meta.get("nonempty")
            and isinstance(value, (str, list))
            and not (value.strip() if isinstance(value, str) else value)
        ):
            raise ConfigError(f"{key} must not be empty")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            bounds = [
                ("ge", value >= meta.get("ge", value)),
                ("gt", "gt" not in meta or value > meta["gt"]),
                ("le", value <= meta.get("le", value)),
                ("lt", "lt" not in meta or value < meta["lt"]),
            ]
            for name, ok in bounds:
                if not ok:
                    raise ConfigError(
                        f"{key}={value} must be {_RANGE_WORDS[name]} {meta[name]}{_range_hint(meta)}"
                    )
            if "multiple_of" in meta and value % meta["multiple_of"]:
                raise ConfigError(f"{key}={value} must be a multiple of {meta['multiple_of']}")


_RANGE_WORDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def _interval(meta: dict) -> str:
    lo = f"[{meta['ge']}" if "ge" in meta else (f"({meta['gt']}" if "gt" in meta else "(-inf")
    hi = f"{meta['le']}]" if "le" in meta else (f"{meta['lt']})" if "lt" in meta else "inf)")
    return f"{lo}, {hi}"


def _range_hint(meta: dict) -> str:
    return f" (allowed: {_interval(meta)})"


@dataclass
class ModelConfig:
    pretrained: str = _f(
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "Hub id or local directory of a diffusers pipeline.",
        nonempty=True,
    )
    family: str = _f(
        "auto",
        "Pipeline family: auto (read model_index.json) or one of `mmalign ls` (sd15, sdxl, sd3, flux, cogvideox, wan, toy_video).",
    )
    revision: str | None = _f(None, "Hub revision (branch, tag or commit) of `pretrained`.")
    variant: str | None = _f(None, "Weight variant to load, e.g. fp16.")
    vae: str | None = _f(
        None, "Replacement VAE (hub id or path), e.g. madebyollin/sdxl-vae-fp16-fix for SDXL in fp16."
    )
    resolution: int = _f(512, "Training resolution in pixels (square); SDXL uses 1024.", ge=8, le=8192)
    trust_remote_code: bool = _f(
        False, "Allow custom code from the model repository. Off unless you trust it."
    )
    adapter_options: dict = _f(
        {},
        "Family-specific adapter options, e.g. {timestep_sampling: logit_normal} for wan (the DenseDPO paper's rectified-flow timesteps).",
    )

    def __post_init__(self) -> None:
        check_fields(self, "model")
        if self.resolution % 8:
            raise ConfigError(
                f"model.resolution={self.resolution} must be a multiple of 8 (the VAE downsamples by 8)."
            )


@dataclass
class LoraConfig:
    enabled: bool = _f(
        True, "Train LoRA adapters through peft (reference = adapters disabled). false = full fine-tuning."
    )
    rank: int = _f(8, "LoRA rank r.", le=4096)
    alpha: float | None = _f(
        None, "LoRA alpha; defaults to the rank (scale 1), as diffusers' DPO scripts do.", gt=0
    )
    dropout: float = _f(0.0, "LoRA dropout.", ge=0, lt=1)
    target_modules: list[str] = _f(
        ["to_q", "to_k", "to_v", "to_out.0"], "UNet/transformer modules that get adapters.", nonempty=True
    )
    init: str = _f(
        "gaussian",
        "peft init_lora_weights: gaussian (B=0, model equals reference at step 0) or default.",
        choices=("gaussian", "default"),
    )

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(
                f"lora.rank={self.rank} must be >= 1 (set lora.enabled=false for full fine-tuning)."
            )
        check_fields(self, "lora")


@dataclass
class DataConfig:
    source: str = _f(
        "",
        "Pair data: a JSONL/CSV manifest, a parquet file or folder (Pick-a-Pic v2 layout), or a datasets directory.",
    )
    format: str = _f("auto", "auto | manifest | pickapic.")
    split: str = _f("train", "Split to read from a datasets directory.", nonempty=True)
    keep_ties: bool = _f(
        False,
        "Keep label_0 == 0.5 pairs (image_0 treated as chosen). The papers drop them (~12% of Pick-a-Pic).",
    )
    on_bad_item: str = _f(
        "error",
        "What a corrupt or missing image does: error (stop, naming row and file) or skip (counted, reported).",
    )
    random_flip: bool = _f(
        True, "Random horizontal flip, as the reference code (per image for SD1.5, jointly for SDXL)."
    )
    random_crop: bool = _f(False, "Random instead of centre crop.")
    caption_dropout: float = _f(
        0.2, "Probability of replacing the prompt with '' (SF: --proportion_empty_prompts 0.2)."
    )
    max_items: int | None = _f(None, "Use at most this many pairs (debugging).", ge=1)
    num_workers: int = _f(0, "DataLoader worker processes.", ge=0, le=64)
    cache: bool = _f(
        True, "Encode VAE latents and text embeddings once into safetensors shards and train from them."
    )
    cache_dir: str | None = _f(
        None, "Cache directory; default <output_dir>/../.mmalign_cache next to the run (shared by runs)."
    )
    cache_batch_size: int = _f(
        8, "Batch size of the one-off encoding pass that fills the cache.", ge=1, le=4096
    )
    cache_build: str = _f(
        "eager",
        "eager: encode every pair before step 1; lazy: encode each pair the first time a batch draws it (no up-front pass; later epochs and runs read it back).",
    )
    cache_max_gb: float | None = _f(
        None,
        "Refuse to build a latent cache estimated above this many GB (the estimate is printed before building; SDXL 1024 px is ~2.1 MB per pair).",
        gt=0,
    )
    shuffle: bool = _f(
        True,
        "Shuffle pairs each epoch. false keeps file order (a `mmalign label --strategy curriculum` manifest: easy pairs first).",
    )
    buckets: bool = _f(
        False,
        "Aspect-ratio buckets (image pairs): each pair trains at the (height, width) nearest its winner's shape, about model.resolution^2 pixels, one bucket per batch; SDXL's time ids record the real size, crop and bucket.",
    )
    bucket_step: int = _f(
        64,
        "Bucket sides are multiples of this (64 for SD/SDXL: VAE x8 times the UNet's x8 down-sampling); must divide model.resolution.",
        ge=8,
        le=1024,
    )
    bucket_max_ratio: float = _f(
        2.0, "Most elongated bucket allowed (long side / short side).", ge=1.0, le=8.0
    )

    def __post_init__(self) -> None:
        check_fields(self, "data")
        if self.format not in ("auto", "manifest", "pickapic"):
            raise ConfigError(f"data.format={short(self.format)}: use auto, manifest or pickapic.")
        if self.cache_build not in ("eager", "lazy"):
            raise ConfigError(f"data.cache_build={short(self.cache_build)}: use eager or lazy.")
        if self.on_bad_item not in ("error", "skip"):
            raise ConfigError(f"data.on_bad_item={short(self.on_bad_item)}: use error or skip.")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ConfigError(f"data.caption_dropout={self.caption_dropout} must be in [0, 1).")


@dataclass
class TrainConfig:
    output_dir: str = _f(
        "outputs/run", "Where checkpoints, logs, validation grids and the final export go.", nonempty=True
    )
    max_steps: int = _f(2000, "Optimizer steps.", ge=1, le=10**9)
    batch_size: int = _f(1, "Pairs per device per micro-step.", ge=1, le=65536)
    gradient_accumulation_steps: int = _f(1, "Micro-steps per optimizer step.", ge=1, le=65536)
    learning_rate: float = _f(
        1e-8, "Base learning rate (multiplied by the global batch when scale_lr is true).", ge=0
    )
    scale_lr: bool = _f(
        True, "lr = learning_rate x batch_size x accumulation x processes (SF launchers: 1e-8 x 2048)."
    )
    lr_scheduler: str = _f(
        "constant_with_warmup",
        "A diffusers get_scheduler name.",
        choices=(
            "constant",
            "constant_with_warmup",
            "linear",
            "cosine",
            "cosine_with_restarts",
            "polynomial",
        ),
    )
    warmup_steps: int = _f(0, "Linear warmup steps.", ge=0, le=10**9)
    optimizer: str = _f("adamw", "adamw | adafactor | adamw8bit (needs the [bnb] extra).")
    weight_decay: float = _f(1e-2, "AdamW weight decay.", ge=0)
    adam_beta1: float = _f(0.9, "AdamW beta1.", ge=0, lt=1)
    adam_beta2: float = _f(0.999, "AdamW beta2.", ge=0, lt=1)
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.", gt=0)
    fused_adamw: bool = _f(
        True,
        "AdamW's update in torch's fused kernel (CPU and CUDA parameters); false: torch's multi-tensor foreach path. Same weights.",
    )
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 disables).", ge=0)
    mixed_precision: str = _f("no", "no | fp16 | bf16 (accelerate). Frozen parts are cast to this dtype.")
    trainable_dtype: str = _f(
        "fp32",
        "How the trained weights are stored: fp32 (autocast casts them at every use); bf16 (with mixed_precision=bf16: no casts; the optimizer keeps fp32 master copies and writes the rounded result back).",
        choices=("fp32", "bf16"),
    )
    frozen_dtype: str = _f(
        "compute",
        "How the denoiser's frozen weights are stored when LoRA (or a method's own modules) trains: compute (the mixed_precision dtype, as the text encoders; the model's _keep_in_fp32_modules stay fp32; not under FSDP) or fp32 (autocast casts each at every use; twice the memory).",
        choices=("compute", "fp32"),
    )
    gradient_checkpointing: bool = _f(False, "Trade compute for activation memory in the denoiser.")
    checkpoint_policy: str = _f(
        "recompute_all",
        "With gradient_checkpointing, what each checkpointed block keeps for backward: recompute_all (its inputs only; least memory, the forward runs twice); save_attention (also the attention outputs: backward skips re-running attention); save_matmuls (every matmul/conv/attention output: backward re-runs only element-wise ops). Same results (tested).",
        choices=("recompute_all", "save_attention", "save_matmuls"),
    )
    allow_tf32: bool = _f(True, "Allow TF32 matmuls on Ampere+ GPUs.")
    compile: str = _f(
        "none",
        "torch.compile the denoiser: none; regional (each repeated transformer block, diffusers' compile_repeated_blocks: short compile); full (the whole network). Same results as eager (tested).",
        choices=("none", "regional", "full"),
    )
    compile_mode: str = _f(
        "default",
        "torch.compile mode when train.compile is set; reduce-overhead uses CUDA graphs.",
        choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    )
    channels_last: bool = _f(
        False,
        "Store the denoiser's 2-D convolution weights channels-last (NHWC): faster convolutions on GPU.",
    )
    attention_backend: str = _f(
        "sdpa",
        "sdpa (torch scaled_dot_product_attention, flash/memory-efficient kernels on GPU) or xformers (needs the [xformers] extra and CUDA).",
        choices=("sdpa", "xformers"),
    )
    seed: int = _f(0, "Seed for data order, noise and timesteps.", ge=0, le=2**32 - 1)
    checkpoint_every: int = _f(
        500, "Save a resumable checkpoint every N optimizer steps (0 = only at the end).", ge=0
    )
    checkpoints_total_limit: int | None = _f(
        3, "Keep at most this many checkpoints (oldest removed after a new one is safely written).", ge=1
    )
    resume: str | None = _f(None, "latest, or a checkpoint directory, to continue a run.")
    overwrite: bool = _f(
        False, "Start a new run in a non-empty output_dir (its old checkpoints are never resumed or rotated)."
    )
    log_every: int = _f(1, "Log metrics every N optimizer steps.", ge=1)
    report_to: str = _f("tensorboard", "tensorboard | wandb | none.")
    push_to_hub: bool = _f(
        False,
        "Upload final/ (with its model card) to the Hugging Face Hub when the run ends; checked at start.",
    )
    hub_model_id: str | None = _f(
        None, "Hub repo for push_to_hub (user/name); default: output_dir's folder name."
    )
    hub_private: bool = _f(
        True, "Create the push_to_hub repo private (an existing repo keeps its visibility)."
    )
    validation_every: int = _f(
        0, "Sample validation_prompts every N steps into a PNG grid (0 disables).", ge=0
    )
    validation_prompts: list[str] = _f([], "Fixed prompts for validation grids.")
    validation_steps: int = _f(25, "Sampling steps for validation images.", ge=1, le=1000)
    validation_guidance: float = _f(5.0, "CFG scale for validation images.")
    validation_seed: int = _f(0, "Seed for validation images (same images every time).", ge=0, le=2**63 - 1)
    progress: bool = _f(True, "Show a progress bar.")

    def __post_init__(self) -> None:
        check_fields(self, "train")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ConfigError(f"train.mixed_precision={short(self.mixed_precision)}: use no, fp16 or bf16.")
        if self.optimizer not in ("adamw", "adafactor", "adamw8bit"):
            raise ConfigError(f"train.optimizer={short(self.optimizer)}: use adamw, adafactor or adamw8bit.")
        if self.trainable_dtype == "bf16" and self.mixed_precision != "bf16":
            raise ConfigError(
                f"train.trainable_dtype=bf16 needs train.mixed_precision=bf16 (it is {self.mixed_precision}): "
                "the forward must run in bf16 for bf16 weights"
            )
        if self.report_to not in ("tensorboard", "wandb", "none"):
            raise ConfigError(f"train.report_to={short(self.report_to)}: use tensorboard, wandb or none.")
        if self.max_steps < 1 or self.batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ConfigError(
                "train.max_steps, train.batch_size and train.gradient_accumulation_steps must be >= 1."
            )
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ConfigError(
                f"train.checkpoints_total_limit={self.checkpoints_total_limit} must be >= 1 (or null to keep every checkpoint)."
            )
        if self.compile == "none" and self.compile_mode != "default":
            raise ConfigError(
                f"train.compile_mode={self.compile_mode} has no effect with train.compile=none: set train.compile=regional or full"
            )
        if not self.gradient_checkpointing and self.checkpoint_policy != "recompute_all":
            raise ConfigError(
                f"train.checkpoint_policy={self.checkpoint_policy} has no effect without checkpointing: set train.gradient_checkpointing=true"
            )
        if self.overwrite and self.resume:
            raise ConfigError(
                "train.overwrite=true starts a new run and train.resume continues one: set only one of them."
            )
        if self.validation_every and not self.validation_prompts:
            raise ConfigError(
                "train.validation_every is set but train.validation_prompts is empty: add prompts or set it to 0."
            )


@dataclass
class RunConfig:
    """A whole recipe: which model, which method, which data, how to train."""

    model: ModelConfig = _f(None, "The pipeline to tune.")
    method: Any = _f(
        None, "The method and its hyper-parameters; `name` picks the trainer (see `mmalign ls`)."
    )
    data: DataConfig = _f(None, "Preference data.")
    lora: LoraConfig = _f(None, "LoRA settings (lora.enabled=false for full fine-tuning).")
    train: TrainConfig = _f(None, "Optimisation, precision, checkpoints and logging.")

    def __post_init__(self) -> None:
        self.model = self.model or ModelConfig()
        self.data = self.data or DataConfig()
        self.lora = self.lora or LoraConfig()
        self.train = self.train or TrainConfig()
        if self.data.buckets and self.model.resolution % self.data.bucket_step:
            raise ConfigError(
                f"data.bucket_step={self.data.bucket_step} must divide model.resolution={self.model.resolution} "
                "(bucket sides are multiples of it)"
            )


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
        raise ConfigError(errors[0] if errors else f"{key}: bad value {short(value)}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {short(value)}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {short(value)}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _BOOL_WORDS:  # YAML 1.1's spellings (see safe_load)
            return _BOOL_WORDS[value.lower()]
        raise ConfigError(f"{key}: expected true/false, got {short(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {short(value)}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value) if abs(value) < 1e308 or isinstance(value, float) else math.inf
        elif isinstance(value, str) and len(value) < 64:
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {short(value)}")
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {short(value)}")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            if isinstance(value, str) and len(value) > MAX_STRING:
                raise ConfigError(f"{key}: a string of {len(value)} characters; the limit is {MAX_STRING}")
            if isinstance(value, str) and "\x00" in value:
                raise ConfigError(f"{key}: the value contains a NUL character")
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {short(value)}")
    return value


def from_dict(
    cls: type, data: dict | None, prefix: str = "", method_configs: Mapping[str, type] | None = None
) -> Any:
    """Build dataclass ``cls`` from a nested dict; unknown keys raise naming the closest valid key.

    ``method_configs`` (method name -> config class) is needed for a :class:`RunConfig`'s ``method`` section.
    """
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {short(data)}")
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{short(key) if not isinstance(key, str) else key}"
        if not isinstance(key, str) or key not in names:
            raise ConfigError(
                f"unknown config key '{short(dotted) if len(dotted) > 80 else dotted}'{_closest(str(key)[:80], names)}"
            )
        tp = hints[key]
        if cls is RunConfig and key == "method":
            kwargs[key] = _method_from_dict(value, dotted, method_configs)
        elif dataclasses.is_dataclass(tp):
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"{dotted}: expected a mapping of {tp.__name__} keys, got {short(value)}")
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
        raise TypeError(
            "a RunConfig's method section needs method_configs: use mmalign.trainers.load_config, "
            "or pass method_configs=mmalign.trainers.METHOD_CONFIGS"
        )
    if value is not None and not isinstance(value, dict):
        raise ConfigError(
            f"{key}: expected a mapping with a name (e.g. name: diffusion_dpo), got {short(value)}"
        )
    value = dict(value or {})
    name = value.get("name", "diffusion_dpo")
    if not isinstance(name, str) or name not in method_configs:
        raise ConfigError(
            f"{key}.name={short(name)} is not a method{_closest(str(name), method_configs)}; "
            f"known: {', '.join(method_configs)}"
        )
    return from_dict(method_configs[name], value, f"{key}.")


def to_dict(cfg: Any) -> Any:
    """Dataclass -> plain nested dict (for saving the resolved config next to a run)."""
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if not all(p.strip() for p in parts):
        raise ConfigError(f"override key {short(dotted)} is not a dotted key such as train.max_steps")
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
            raise ConfigError(f"override {short(item)} is not key=value (e.g. train.max_steps=100)")
        key, raw = item.split("=", 1)
        try:
            value = safe_load(raw) if raw.strip() else ""
        except (yaml.YAMLError, RecursionError) as err:
            raise ConfigError(
                f"override {short(item)}: the value is not valid YAML ({clip(first_line(err))})"
            ) from None
        check_size(value, f"override {short(key)}")
        parsed.append((key.strip(), value))
    return parsed


def check_size(value: Any, where: str, limit: int = MAX_CONFIG_NODES) -> None:
    """Raise if ``value`` expands (YAML aliases repeat shared nodes) to more than ``limit`` values.

    Walks at most ``limit`` nodes, so a "billion laughs" file is rejected in milliseconds instead of
    being expanded by a later ``repr``, copy or dump.
    """
    budget, stack = limit, [value]
    while stack:
        node = stack.pop()
        budget -= 1
        if budget < 0:
            raise ConfigError(
                f"{where}: expands to more than {limit} values (YAML anchors/aliases?); "
                "write the config out without aliases"
            )
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)


def read_yaml(path: str | Path, what: str = "config file", max_bytes: int = MAX_CONFIG_BYTES) -> Any:
    """Parse a small YAML/JSON file safely: a regular file, at most ``max_bytes``, UTF-8, bounded expansion.

    Raises:
        ConfigError: naming the file, for anything that is not such a file.
    """
    path = Path(path)
    try:
        if not path.exists():
            raise ConfigError(f"{what} not found: {_name(path)}")
        if not path.is_file():
            raise ConfigError(f"{_name(path)}: the {what} is not a regular file")
        size = path.stat().st_size
        if size > max_bytes:
            raise ConfigError(f"{_name(path)}: the {what} is {size} bytes; the limit is {max_bytes}")
        with path.open("rb") as fh:
            raw = fh.read(max_bytes + 1)
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{_name(path)}: the {what} is not UTF-8 text ({err.reason} at byte {err.start})"
        ) from None
    except OSError as err:
        raise ConfigError(f"{_name(path)}: cannot read the {what}: {err.strerror or err}") from None
    if "\x00" in text:
        raise ConfigError(f"{_name(path)}: the {what} contains NUL bytes (a binary file?)")
    try:
        data = safe_load(text)
    except (yaml.YAMLError, RecursionError) as err:
        raise ConfigError(f"{_name(path)}: not valid YAML: {clip(first_line(err))}") from None
    check_size(data, str(path))
    return data


def load_yaml(path: str | Path) -> dict:
    data = read_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of sections (model, method, data, lora, train)"
        )
    return data


def load_config(
    path: str | Path | None = None,
    overrides: typing.Sequence[str] = (),
    *,
    method_configs: Mapping[str, type] | None = None,
) -> RunConfig:
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
        where = f"{_name(path)}: " if path is not None else ""
        raise ConfigError(f"{where}{err}") from None
    except RecursionError:
        raise ConfigError(f"{path or 'overrides'}: nested too deeply") from None


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def describe(cls: type, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, help) for every field of ``cls``, for `mmalign validate --help-keys` and docs."""
    rows = []
    for f in dataclasses.fields(cls):
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        )
        text = f.metadata.get("help", "")
        if any(k in f.metadata for k in ("ge", "gt", "le", "lt")):
            text += f" Allowed: {_interval(f.metadata)}."
        elif "choices" in f.metadata:
            text += f" One of: {', '.join(map(str, f.metadata['choices']))}."
        rows.append((f"{prefix}{f.name}", default, text))
    return rows
