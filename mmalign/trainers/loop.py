"""The one training loop. accelerate does devices, precision, accumulation and distribution; a method
contributes ``compute_loss``. :func:`train` is its named steps, top to bottom: run (accelerator, output
dir) -> models -> data -> trainable params -> optimizer -> resume -> fit (log, checkpoint, validate, stop
on a signal) -> finish (export, summary). Checkpoints: :mod:`mmalign.trainers.checkpoint`.

Run it with ``mmalign train CONFIG [key=value ...]`` on one device, or under ``accelerate launch -m mmalign
train ...`` / ``torchrun --nproc_per_node N -m mmalign train ...`` on many.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from mmalign.config import ConfigError, RunConfig, save_config, short, to_dict
from mmalign.data.buckets import BucketBatchSampler
from mmalign.data.seeded import SeededItems
from mmalign.pipelines import is_video, load_model, load_unused, prompt_length
from mmalign.pipelines.fast import FastPathError, apply_fast_paths, enable_checkpointing
from mmalign.pipelines.runtime import LORA_TARGET_FILE
from mmalign.trainers import check_clip_length, check_family, get_method
from mmalign.trainers.checkpoint import (
    CHECKPOINT_PREFIX,
    RUN_FILE,
    STATE_FILE,
    CheckpointError,
    Saveable,
    StopOnSignal,
    apply_checkpoint,
    fault,
    incomplete_checkpoints,
    list_checkpoints,
    load_latest,
    new_run_id,
    read_checkpoint,
    read_run_id,
    recover,
    run_id_of,
    save_checkpoint,
    trainable_state,
    write_json,
)
from mmalign.trainers.common import TrainModels
from mmalign.trainers.master_weights import MasterWeights
from mmalign.trainers.model_card import check_push, push_export, write_model_card
from mmalign.trainers.report import log_validation, write_training_curves
from mmalign.trainers.sharding import full_state_dict, gathered, is_sharded
from mmalign.utils import first_line, safe_load


@dataclass
class TrainResult:
    """What :func:`train` returns: the summary written to summary.json and the trained network."""

    summary: dict[str, Any]
    denoiser: torch.nn.Module
    pipeline: Any
    initial_trainable: dict[str, torch.Tensor] | None = None


class TrainingError(RuntimeError):
    """Training cannot continue (non-finite loss, bad resume target ...); checkpoints already written stay."""


class TrainingStopped(TrainingError):
    """A stop signal arrived; a checkpoint was saved. ``exit_code`` is 128 + the signal's number (as a shell reports)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


# --------------------------------------------------------------------------------------------------
# helpers


def weight_dtype(mixed_precision: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def cast_frozen(net: torch.nn.Module, dtype: torch.dtype) -> int:
    """The frozen floating-point weights of ``net`` to ``dtype`` (the compute dtype, as the text encoders), except
    in the modules the model keeps in fp32 (diffusers' ``_keep_in_fp32_modules``: Wan's norms and modulation)
    and in modules that also own a trained weight (personal_dpo's LayerNorm trains its scale, not its shift:
    a norm's weight and bias must share a dtype).

    A LoRA run's frozen base then costs half the memory (SDXL's UNet: 5 GB instead of 10) and autocast no longer
    casts every base weight in every forward; the matmuls ran in ``dtype`` already. Returns how many were cast.
    """
    if dtype == torch.float32:
        return 0
    keep = tuple(getattr(net, "_keep_in_fp32_modules", None) or ())
    cast = 0
    for prefix, module in net.named_modules():
        own = dict(module.named_parameters(prefix=prefix, recurse=False))
        if any(p.requires_grad for p in own.values()):
            continue
        for name, p in own.items():
            if p.is_floating_point() and p.dtype != dtype and not any(k in name.split(".") for k in keep):
                p.data = p.data.to(dtype)
                cast += 1
    return cast


def add_lora(denoiser: torch.nn.Module, lora: Any) -> None:
    """Attach a peft LoRA adapter (diffusers' PeftAdapterMixin); only its weights will train."""
    from peft import LoraConfig

    try:
        denoiser.add_adapter(
            LoraConfig(
                r=lora.rank,
                lora_alpha=lora.alpha if lora.alpha is not None else lora.rank,
                lora_dropout=lora.dropout,
                init_lora_weights=lora.init if lora.init != "default" else True,
                target_modules=list(lora.target_modules),
            )
        )
    except (
        ValueError
    ) as err:  # peft: no module matches target_modules (NoMatchingPeftModuleError), bad ranks ...
        raise ConfigError(
            f"lora.target_modules={short(list(lora.target_modules))} on {type(denoiser).__name__}: {err}"
        ) from None


def trains_what(cfg: RunConfig, method: Any) -> str:
    """ "LoRA r=8", "full fine-tune", or a method's own path ("own modules + LoRA r=8") for messages."""
    lora = f"LoRA r={cfg.lora.rank}" if cfg.lora.enabled else ""
    if method.add_trainable is not None:
        return f"{method.name}'s own trainable modules" + (f" + {lora}" if lora else "")
    return lora or "full fine-tune"


FUSED_DEVICES = ("cuda", "cpu")  # where torch's fused AdamW kernel runs (torch >= 2.4)


def build_optimizer(
    params: list[torch.nn.Parameter], train: Any, lr: float, fused: bool | None = None
) -> torch.optim.Optimizer:
    """The optimizer ``train.optimizer`` names. AdamW runs torch's fused kernel (one kernel for every parameter's
    update) with ``train.fused_adamw`` wherever the parameters allow it, rather than torch's default multi-tensor
    ``foreach`` path; the two compute the same update. ``fused`` overrides the config (the benchmark's
    side-by-side)."""
    if train.optimizer == "adamw":
        if fused is None:
            fused = train.fused_adamw and all(
                p.is_floating_point() and p.device.type in FUSED_DEVICES for p in params
            )
        return torch.optim.AdamW(
            params,
            lr=lr,
            betas=(train.adam_beta1, train.adam_beta2),
            weight_decay=train.weight_decay,
            eps=train.adam_epsilon,
            **({"fused": True} if fused else {"foreach": True}),
        )
    if train.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # Salesforce's SDXL settings: fixed lr, no relative step or parameter scaling.
        return Adafactor(
            params,
            lr=lr,
            relative_step=False,
            scale_parameter=False,
            warmup_init=False,
            clip_threshold=1.0,
            weight_decay=train.weight_decay,
        )
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise ImportError("train.optimizer=adamw8bit needs bitsandbytes: pip install 'mmalign[bnb]'") from err
    return bnb.optim.AdamW8bit(
        params,
        lr=lr,
        betas=(train.adam_beta1, train.adam_beta2),
        weight_decay=train.weight_decay,
        eps=train.adam_epsilon,
    )


# --------------------------------------------------------------------------------------------------
# the loop: train() is its named steps, each one screen: run -> models -> data -> trainable -> optimizer
# -> resume -> fit -> finish


@dataclass
class _Run:
    """What :func:`train`'s steps hand to each other, filled in the order they run."""

    cfg: RunConfig
    accelerator: Any
    out: Path
    method: Any
    run_id: str
    pipe: Any = None
    family: str = ""
    adapter: Any = None
    denoiser: Any = None
    reference: Any = None
    data: Any = None
    items: SeededItems | None = None
    batch_sampler: BucketBatchSampler | None = None
    loader: Any = None
    params: list[torch.nn.Parameter] = field(default_factory=list)
    initial: dict[str, torch.Tensor] | None = None
    optimizer: Any = None
    lr_scheduler: Any = None
    models: TrainModels | None = None
    global_batch: int = 0
    lr: float = 0.0
    sharded: bool = False  # FSDP2: weights are DTensor shards (mmalign/trainers/sharding.py)
    data_wait_s: float = 0.0  # seconds the steps waited for a batch
    lock_fd: int = -1  # the main process's lock on ``out`` (``_lock_output_dir``), released when train() ends

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"

    @property
    def samples_here(self) -> bool:
        """Whether this process runs validation sampling: the main one, or all of them when sharded."""
        return self.sharded or self.accelerator.is_main_process

    def parts(self) -> Saveable:
        return Saveable(
            self.accelerator.unwrap_model(self.denoiser),
            self.optimizer,
            self.lr_scheduler,
            self.accelerator.scaler,
            self.models.state,
        )


@dataclass
class _Position:
    """Where training stands: optimizer step, epoch, batches consumed in it, accelerate's micro-step count."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    micro_step: int = 0


def train(cfg: RunConfig, *, keep_initial: bool = False) -> TrainResult:
    """Train ``cfg.method`` on ``cfg.data`` and export the result.

    Args:
        cfg: the run config.
        keep_initial: also return a CPU copy of the trainable weights before the first step (tests use it
            to prove that every trainable weight moved; costs a copy of them).

    Raises:
        TrainingStopped: SIGTERM/SIGINT/SIGHUP arrived; a checkpoint was saved at the step boundary.
        TrainingError: non-finite loss, no usable checkpoint to resume ...
    """
    run = _setup_run(cfg)
    try:
        _setup_models(run)
        _setup_data(run)
        _setup_trainable(run, keep_initial)
        _setup_optimizer(run)
        start = _resume(run)
        end, seconds, last_metrics, skipped = _fit(run, start)
        return _finish(run, start, end, seconds, last_metrics, skipped)
    finally:
        if run.lock_fd >= 0:
            os.close(run.lock_fd)  # releases the lock


def _setup_run(cfg: RunConfig) -> _Run:
    """Accelerator, seed, and the output directory claimed for this run (refused if another run's)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

    t_cfg = cfg.train
    out = Path(t_cfg.output_dir)
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        # ZeRO's optimizer.state_dict() is its own partitioned format (no "state" entries, a pickled loss scaler):
        # refused here rather than at the first checkpoint, after the training it would cost
        raise ConfigError(
            "accelerate launch with DeepSpeed: not supported (mmalign's checkpoints cannot hold ZeRO's "
            "partitioned optimizer state); for sharded training use --config_file configs/accelerate/fsdp.yaml "
            "(FSDP2)"
        )
    check_push(cfg)
    _check_output_dir(t_cfg, out)
    _check_resume_settings(cfg, out)
    method = get_method(cfg.method.name)
    _reset_single_process_state()
    # With no accelerator device, cpu=True lets accelerate turn torchrun's env into a gloo group (MULTI_CPU).
    no_device = not torch.cuda.is_available() and not torch.backends.mps.is_available()
    accelerator = Accelerator(
        cpu=no_device,
        mixed_precision=t_cfg.mixed_precision,
        gradient_accumulation_steps=t_cfg.gradient_accumulation_steps,
        log_with=None if t_cfg.report_to == "none" else t_cfg.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    # accelerate runs no fp16 autocast on CPU: the frozen fp16 parts would meet fp32 ones deep in a forward
    if t_cfg.mixed_precision == "fp16" and not accelerator.native_amp:
        raise ConfigError(
            f"train.mixed_precision=fp16 needs a GPU (no fp16 autocast on {accelerator.device.type}); "
            "set train.mixed_precision=bf16 or no"
        )
    if t_cfg.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    set_seed(t_cfg.seed)  # same seed on every process: identical LoRA init on every replica
    accelerator.wait_for_everyone()  # every process has checked output_dir before the main one writes there
    lock_fd = -1
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        lock_fd = _lock_output_dir(out)  # before anything in out is moved or written
        for line in recover(out / "checkpoints"):
            accelerator.print(f"checkpoints: {line}")
        if t_cfg.overwrite and (moved := _set_aside_outputs(out)):
            accelerator.print(
                f"train.overwrite: the previous run's {', '.join(p.name for p in moved)} moved to {moved[0].parent}"
            )
        write_json(out / RUN_FILE, {"run_id": _run_id(t_cfg, out)})
        save_config(cfg, out / "config.yaml")
    accelerator.wait_for_everyone()
    return _Run(cfg, accelerator, out, method, read_run_id(out), lock_fd=lock_fd)


def _setup_models(run: _Run) -> None:
    """Load the pipeline: every part frozen and on the device; the denoiser stays fp32 until it trains."""
    cfg, accelerator = run.cfg, run.accelerator
    dtype = weight_dtype(cfg.train.mixed_precision)
    pipe, family, adapter = load_model(cfg.model)
    check_family(cfg.method, family, adapter.noise_process)
    check = getattr(type(adapter), "check_config", None)  # optional: a family's own refusals (Wan 2.2 A14B)
    if check is not None:
        check(dict(pipe.config), cfg)
    # optional: the largest size a denoiser takes (SD3's position grid)
    if hasattr(adapter, "check_resolution"):
        adapter.check_resolution(cfg.model.resolution)
    check_clip_length(cfg, family)
    denoiser = getattr(pipe, adapter.denoiser_name)
    for encoder in adapter.text_encoders:
        encoder.requires_grad_(False).to(accelerator.device, dtype)
    pipe.vae.requires_grad_(False).to(accelerator.device)  # fp32: the stock SDXL VAE overflows in fp16
    denoiser.requires_grad_(False)
    run.pipe, run.family, run.adapter, run.denoiser = pipe, family, adapter, denoiser


def _setup_data(run: _Run) -> None:
    """The method's data (any cache is filled now, before a trainable weight exists) and its loader.

    The loader has its own seeded generator and every item its own augmentation seed
    (:class:`SeededItems`): neither touches the global RNG, so a resumed run sees the same batches."""
    cfg, t_cfg = run.cfg, run.cfg.train
    run.data = data = run.method.build_data(cfg, run.adapter, run.accelerator)
    run.items = SeededItems(data.dataset, t_cfg.seed)
    if data.groups is not None:  # aspect-ratio buckets: every batch from one bucket, seeded per epoch
        run.batch_sampler = BucketBatchSampler(
            data.groups, t_cfg.batch_size, shuffle=cfg.data.shuffle, seed=t_cfg.seed
        )
        batching = {"batch_sampler": run.batch_sampler}
    else:
        batching = {"batch_size": t_cfg.batch_size, "shuffle": cfg.data.shuffle, "drop_last": True}
    run.loader = torch.utils.data.DataLoader(
        run.items,
        collate_fn=data.collate,
        num_workers=cfg.data.num_workers,
        pin_memory=torch.cuda.is_available(),  # page-locked batches: asynchronous host-to-device copies
        # not persistent_workers: a persistent worker keeps its copy of SeededItems, which set_epoch cannot reach
        # its own generator, also with a batch sampler: each iterator draws a base seed from it, and drawn from
        # the global RNG that would shift the training noise of a resumed run (which starts one more iterator)
        generator=torch.Generator().manual_seed(t_cfg.seed),
        **batching,
    )
    if len(run.loader) == 0:
        where = " in any one aspect-ratio bucket (data.buckets)" if data.groups is not None else ""
        raise TrainingError(
            f"{cfg.data.source}: {len(data.dataset)} pairs gives fewer than train.batch_size={t_cfg.batch_size}{where}"
        )


def _setup_trainable(run: _Run, keep_initial: bool) -> None:
    """LoRA adapters (the reference is the same network with them off) or the whole denoiser plus a frozen copy;
    a method's own trainable modules (``Method.add_trainable``, e.g. personal_dpo's user path) with or without LoRA.
    The trained weights are fp32; with LoRA or a method's own modules the frozen rest is in the compute dtype."""
    from accelerate.utils import DistributedType, set_seed

    cfg, accelerator, denoiser = run.cfg, run.accelerator, run.denoiser
    # Seeded again: building a cache may draw from the global RNG (an inversion cache does), so without this
    # the same config trained differently depending on whether its caches already existed.
    set_seed(cfg.train.seed)
    if cfg.lora.enabled:
        add_lora(denoiser, cfg.lora)
    if run.method.add_trainable is not None:  # after peft, which freezes every non-LoRA weight
        run.method.add_trainable(denoiser, cfg)
    if cfg.lora.enabled or run.method.add_trainable is not None:
        for p in denoiser.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # trainable weights stay fp32 under fp16/bf16 autocast
        # not under FSDP2, which wants one dtype per sharded group and sets its own compute precision
        if cfg.train.frozen_dtype == "compute" and accelerator.distributed_type != DistributedType.FSDP:
            cast_frozen(denoiser, weight_dtype(cfg.train.mixed_precision))
    else:
        if run.method.needs_reference(cfg.method):
            dtype = weight_dtype(cfg.train.mixed_precision)
            run.reference = copy.deepcopy(denoiser).requires_grad_(False).to(accelerator.device, dtype).eval()
        denoiser.requires_grad_(True)
    if cfg.train.gradient_checkpointing:
        try:
            enable_checkpointing(denoiser, cfg.train.checkpoint_policy)
        except FastPathError as err:
            raise ConfigError(str(err)) from None
    denoiser.to(accelerator.device)
    for net in (denoiser, run.reference):
        if net is not None:
            _fast_paths(net, cfg.train, accelerator)
    denoiser.train()
    run.params = [p for p in denoiser.parameters() if p.requires_grad]
    run.initial = trainable_state(denoiser) if keep_initial else None


def _fast_paths(net: torch.nn.Module, t_cfg: Any, accelerator: Any) -> None:
    """train.attention_backend, train.channels_last and train.compile (docs/training.md, "Fast paths")."""
    try:
        done = apply_fast_paths(
            net,
            compile=t_cfg.compile,
            compile_mode=t_cfg.compile_mode,
            channels_last=t_cfg.channels_last,
            attention_backend=t_cfg.attention_backend,
        )
    except FastPathError as err:
        raise ConfigError(str(err)) from None
    if t_cfg.compile != "none" or t_cfg.channels_last or t_cfg.attention_backend != "sdpa":
        accelerator.print(
            f"fast paths: attention {done['attention_backend']}, {done['channels_last_tensors']} weights "
            f"channels-last, {done['compiled_modules']} module(s) compiled ({t_cfg.compile}, {t_cfg.compile_mode})"
        )


def _setup_optimizer(run: _Run) -> None:
    """Optimizer and lr schedule; accelerate wraps them with the denoiser and the loader; method state."""
    from accelerate.utils import DistributedType
    from diffusers.optimization import get_scheduler

    t_cfg, accelerator = run.cfg.train, run.accelerator
    run.global_batch = t_cfg.batch_size * t_cfg.gradient_accumulation_steps * accelerator.num_processes
    run.lr = t_cfg.learning_rate * (run.global_batch if t_cfg.scale_lr else 1)
    if t_cfg.trainable_dtype == "bf16":  # bf16 weights in the model, fp32 masters in the optimizer
        if accelerator.distributed_type == DistributedType.FSDP:
            raise ConfigError(
                "train.trainable_dtype=bf16 under FSDP: FSDP keeps fp32 shards and gathers them in the mixed "
                "precision of its config; leave train.trainable_dtype=fp32"
            )
        optimizer = MasterWeights(run.params, lambda masters: build_optimizer(masters, t_cfg, run.lr))
    else:
        optimizer = build_optimizer(run.params, t_cfg, run.lr)
    lr_scheduler = get_scheduler(
        t_cfg.lr_scheduler,
        optimizer,
        num_warmup_steps=t_cfg.warmup_steps * accelerator.num_processes,
        num_training_steps=t_cfg.max_steps * accelerator.num_processes,
    )
    run.denoiser, run.optimizer, run.loader, run.lr_scheduler = accelerator.prepare(
        run.denoiser, optimizer, run.loader, lr_scheduler
    )
    # FSDP2 swaps each parameter for a sharded DTensor in prepare (and points the optimizer at the new ones)
    run.params = [p for group in run.optimizer.param_groups for p in group["params"]]
    run.sharded = is_sharded(run.params)
    run.models = TrainModels(run.adapter, run.denoiser, run.reference, unwrap=accelerator.unwrap_model)
    if run.method.make_state is not None:
        run.models.state = run.method.make_state(run.models, run.cfg.method)  # checkpointed with the run


def _resume(run: _Run) -> _Position:
    """Load ``train.resume`` (latest: the newest usable checkpoint of this run) and trim history.jsonl to it."""
    t_cfg, accelerator = run.cfg.train, run.accelerator
    ckpt = None
    try:
        if t_cfg.resume == "latest":
            ignored = incomplete_checkpoints(run.checkpoints)
            if ignored:
                accelerator.print(
                    f"warning: ignoring incomplete checkpoint folder(s): {', '.join(p.name for p in ignored)}"
                )
            ckpt = load_latest(run.checkpoints, run.run_id, accelerator.process_index, warn=accelerator.print)
            if ckpt is None:
                accelerator.print(
                    f"train.resume=latest: no checkpoint of this run in {run.checkpoints}; starting at step 0"
                )
        elif t_cfg.resume:
            ckpt = read_checkpoint(Path(t_cfg.resume), accelerator.process_index)
    except CheckpointError as err:
        raise TrainingError(f"train.resume={t_cfg.resume}: {err}") from err
    if ckpt is not None:
        try:
            apply_checkpoint(ckpt, run.parts())
        except (
            CheckpointError
        ) as err:  # a sound checkpoint of another setting (lora.rank, method, dtype): input
            raise ConfigError(
                f"train.resume={t_cfg.resume}: {err} (or start anew in another train.output_dir)"
            ) from None
    if accelerator.is_main_process:
        _restart_history(run.out / "history.jsonl", ckpt.step if ckpt else None)
    if ckpt is None:
        return _Position()
    s = ckpt.state
    accelerator.step = s["micro_step"]  # where accelerate's accumulation counter was
    accelerator.print(f"resumed from {ckpt.path} at step {ckpt.step}")
    return _Position(ckpt.step, s["epoch"], s["batch"], s["micro_step"])


def _fit(run: _Run, pos: _Position) -> tuple[_Position, float, dict[str, float], list[str]]:
    """The steps, from ``pos`` to ``train.max_steps``: log, checkpoint, validate; a stop signal ends it with a
    checkpoint. Returns the end position, seconds spent, the last metrics and the skipped items."""
    from tqdm.auto import tqdm

    cfg, t_cfg, accelerator, method, loader = run.cfg, run.cfg.train, run.accelerator, run.method, run.loader
    expert = getattr(run.adapter, "expert", None)
    if expert:  # Wan 2.2 A14B: one of two experts, on its own timesteps
        lo, hi = run.adapter.t_range
        which = f"; {expert} expert {run.adapter.denoiser_name}, t in [{lo:g}, {hi:g})"
    else:
        which = ""
    accelerator.print(
        f"{method.name} on {run.family} ({cfg.model.pretrained}{which}): {len(run.data.dataset)} items, "
        f"{sum(p.numel() for p in run.params):,} trainable params "
        f"({trains_what(cfg, run.method)}), global batch {run.global_batch}, lr {run.lr:.3g}"
    )
    if len(run.data.dataset) < run.global_batch:
        accelerator.print(
            f"note: {len(run.data.dataset)} items are fewer than one global batch ({run.global_batch}), so each "
            "step sees items more than once; lower train.gradient_accumulation_steps or add data"
        )
    if accelerator.is_main_process and t_cfg.report_to != "none":
        accelerator.init_trackers(
            "mmalign",
            config={k: v for k, v in _flat_config(cfg).items() if isinstance(v, (int, float, str, bool))},
        )
    step, epoch, done = pos.step, pos.epoch, pos.batch
    skipped: list[str] = list(run.data.skipped)
    bar = tqdm(
        total=t_cfg.max_steps,
        initial=step,
        desc=method.name,
        disable=not (t_cfg.progress and accelerator.is_local_main_process),
    )
    if t_cfg.validation_every and step == 0 and run.samples_here:
        _validate(run, 0)  # the base, to compare every later grid with
    t0, last_metrics = time.perf_counter(), {}
    # this optimizer step's micro-batch figures: (loss, metrics) per accumulated batch
    window: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []
    with StopOnSignal() as stop:
        while step < t_cfg.max_steps:
            if done >= len(loader):  # a checkpoint taken after an epoch's last batch
                epoch, done = epoch + 1, 0
            loader.set_epoch(epoch)
            run.items.set_epoch(epoch)
            if run.batch_sampler is not None:
                run.batch_sampler.set_epoch(epoch)
            epoch_loader = accelerator.skip_first_batches(loader, done) if done else loader
            for raw in _timed(epoch_loader, run):
                done += 1
                skipped.extend(raw.get("skipped", []))
                if "prompt" not in raw:  # every item of this batch was unreadable and skipped
                    continue
                loss, metrics = _micro_step(run, raw, step)
                window.append(
                    (loss.detach().float().mean(), {k: v.detach().float().mean() for k, v in metrics.items()})
                )
                if not accelerator.sync_gradients:
                    continue
                # the step's figures are the mean over its accumulated micro-batches, not the last one's
                loss = torch.stack([w[0] for w in window]).mean()
                metrics = {
                    k: torch.stack([w[1][k] for w in window if k in w[1]]).mean() for k in window[-1][1]
                }
                window.clear()
                if run.models.state is not None:
                    run.models.state.after_optimizer_step()  # e.g. Self-NPO's EMA teacher, once per optimizer step
                step += 1
                here = _Position(step, epoch, done, accelerator.step)
                fault("step", step)
                logs, stopping = _log_step(run, step, loss, metrics, stop.signum is not None)
                last_metrics = logs
                bar.update(1)
                shown = {"loss": f"{logs['loss']:.4f}"}
                if "implicit_acc" in logs:  # the preference methods' (Self-NPO has none)
                    shown["acc"] = f"{logs['implicit_acc']:.2f}"
                bar.set_postfix(**shown)
                if (
                    t_cfg.checkpoint_every and step % t_cfg.checkpoint_every == 0 and step < t_cfg.max_steps
                ) or stopping:
                    saved = _save(run, here)
                if stopping:
                    bar.close()
                    accelerator.end_training()
                    signum = stop.signum or signal.SIGTERM  # a peer process got it
                    raise TrainingStopped(
                        f"stopped by {signal.Signals(signum).name} after step {step}: checkpoint {saved}; "
                        "continue with train.resume=latest",
                        128 + signum,
                    )
                if t_cfg.validation_every and step % t_cfg.validation_every == 0 and run.samples_here:
                    _validate(run, step)
                if step >= t_cfg.max_steps:
                    break
            else:
                epoch, done = epoch + 1, 0
    bar.close()
    return _Position(step, epoch, done, accelerator.step), time.perf_counter() - t0, last_metrics, skipped


def _timed(batches: Any, run: _Run) -> Iterator[Any]:
    """``batches``, adding the seconds spent waiting for each one to ``run.data_wait_s``."""
    it = iter(batches)
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return
        run.data_wait_s += time.perf_counter() - t0
        yield batch


def _micro_step(run: _Run, raw: dict, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward, backward and (on the accumulation boundary) the optimizer step for one batch."""
    accelerator, t_cfg = run.accelerator, run.cfg.train
    with accelerator.accumulate(run.denoiser), accelerator.autocast():
        batch = run.data.prepare(raw, accelerator.device)
        loss, metrics = run.method.compute_loss(batch, run.models, run.cfg.method)
        if not torch.isfinite(loss):
            last = list_checkpoints(run.checkpoints, run.run_id)
            raise TrainingError(
                f"non-finite loss ({loss.item()}) at step {step + 1} on items {batch.get('item_id')}; "
                f"last checkpoint: {last[-1] if last else 'none'}. Lower train.learning_rate or method.beta, or use bf16."
            )
        accelerator.backward(loss)
        if accelerator.sync_gradients and t_cfg.max_grad_norm > 0:
            inner = getattr(run.optimizer, "optimizer", run.optimizer)  # accelerate's wrapper holds it
            clipped = inner.master_grads() if isinstance(inner, MasterWeights) else run.params  # fp32 masters
            accelerator.clip_grad_norm_(clipped, t_cfg.max_grad_norm)
        run.optimizer.step()
        run.lr_scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return loss, metrics


def _log_step(
    run: _Run, step: int, loss: torch.Tensor, metrics: dict[str, torch.Tensor], stop: bool
) -> tuple[dict[str, float], bool]:
    """Average loss, metrics and the stop flag over processes; log them. Returns (logs, any process stopping)."""
    accelerator, t_cfg = run.accelerator, run.cfg.train
    # one collective for the loss, every metric and the stop flag, one host sync for all of them
    names = ["loss", *metrics]
    values = torch.stack(
        [
            loss.detach().float().mean(),
            *(v.detach().float().mean() for v in metrics.values()),
            torch.tensor(float(stop), device=loss.device),
        ]
    )
    values = accelerator.reduce(values.to(accelerator.device), "mean").tolist()
    stopping = values.pop() > 0
    logs = {"lr": run.lr_scheduler.get_last_lr()[0], **dict(zip(names, values))}
    if step % t_cfg.log_every == 0 or step == t_cfg.max_steps:
        if accelerator.is_main_process:
            with open(run.out / "history.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **logs}) + "\n")
        if t_cfg.report_to != "none":
            accelerator.log(logs, step=step)
    return logs, stopping


def _finished_summary(path: Path, step: int) -> dict[str, Any] | None:
    """The summary a finished run wrote at ``step`` (a resume that has nothing left to run keeps it), else None."""
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return (
        summary
        if isinstance(summary, dict) and summary.get("steps") == step and "export" in summary
        else None
    )


def _finish(
    run: _Run,
    start: _Position,
    end: _Position,
    seconds: float,
    last_metrics: dict[str, float],
    skipped: list[str],
) -> TrainResult:
    """Final checkpoint, replica check, export, summary.json."""
    cfg, accelerator, step = run.cfg, run.accelerator, end.step
    if run.data.flush is not None:
        run.data.flush()  # the last encodings of a lazy cache, for later runs
    finished = _finished_summary(run.out / "summary.json", step) if step == start.step else None
    if (
        finished is not None
    ):  # a requeued job that had already finished: its summary and card stay as they were
        accelerator.print(
            f"done: no steps (already at step {step}); the finished run's results are kept -> {finished.get('export')}"
        )
        accelerator.end_training()
        return TrainResult(finished, accelerator.unwrap_model(run.denoiser), run.pipe, run.initial)
    final_ckpt = run.checkpoints / f"{CHECKPOINT_PREFIX}{step}"
    if step != start.step or not final_ckpt.is_dir():  # not already there (a resume of a finished run)
        final_ckpt = _save(run, end)
    unwrapped = accelerator.unwrap_model(run.denoiser)
    checksum = torch.tensor(  # sharded: of the gathered weights, so equal on every process by construction
        [sum(float(gathered(p.detach()).double().sum()) for p in unwrapped.parameters() if p.requires_grad)],
        dtype=torch.float64,
        device=accelerator.device,
    )
    all_sums = accelerator.gather(checksum).tolist()
    done = step - start.step
    summary = {
        "method": run.method.name,
        "family": run.family,
        "steps": step,
        "seconds": seconds,
        "steps_per_second": done / seconds if seconds > 0 else math.nan,
        "pairs_per_second": done * run.global_batch / seconds if seconds > 0 else math.nan,
        # host time spent waiting for the next batch: near 0 when the loader keeps up (else raise data.num_workers)
        "data_wait_seconds": run.data_wait_s,
        "data_wait_fraction": run.data_wait_s / seconds if seconds > 0 else math.nan,
        "trainable_params": sum(p.numel() for p in run.params),
        "num_processes": accelerator.num_processes,
        "replica_checksums": all_sums,
        "replicas_identical": len(set(all_sums)) == 1,
        "sharded": run.sharded,
        "final_metrics": last_metrics,
        "data": run.data.counts,
        "skipped_items": skipped,
        "checkpoint": str(final_ckpt),
    }
    # a method may write its own artefact (personal_dpo: a user adapter)
    exporter = run.method.export or export
    with full_state_dict(unwrapped):  # FSDP2: every process gathers, the main one writes
        if accelerator.is_main_process:
            summary["export"] = str(
                exporter(run.pipe, unwrapped, run.adapter.denoiser_name, cfg, run.out / "final")
            )
    if accelerator.is_main_process:
        grids = [  # this run's last grid: a grid past its last step is another run's (train.overwrite)
            g
            for g in sorted((run.out / "validation").glob("step-*.png"))
            if g.stem[5:].isdigit() and int(g.stem[5:]) <= step
        ]
        card = functools.partial(
            write_model_card,
            cfg,
            Path(summary["export"]),
            pipeline_class=type(run.pipe).__name__,
            summary=run.method.summary,
            result=summary,
            validation=grids[-1] if grids else None,
        )
        try:
            card()
        except Exception as err:  # the card describes the export; failing to write it must not cost the run
            accelerator.print(
                f"note: could not write the model card: {type(err).__name__}: {first_line(err)}"
            )
        if cfg.train.push_to_hub:  # the card then loads from the repo
            summary["push_to_hub"] = push_export(cfg, Path(summary["export"]), lambda repo: card(where=repo))
        (run.out / "summary.json").write_text(json.dumps(summary, indent=1))
        history = (
            [
                json.loads(line)
                for line in (run.out / "history.jsonl").read_text().splitlines()
                if line.strip()
            ]
            if (run.out / "history.jsonl").is_file()
            else []
        )
        write_training_curves(history, run.out / "training_curves.png")
        if skipped:
            accelerator.print(
                f"skipped {len(skipped)} unreadable item(s); first: {skipped[0]} (all listed in summary.json)"
            )
        if summary["data_wait_fraction"] > 0.25:
            accelerator.print(
                f"note: the steps waited for data {summary['data_wait_fraction']:.0%} of the run "
                f"(data.num_workers={cfg.data.num_workers}): more workers, or `mmalign cache`, would keep up"
            )
        ran = f"{step} steps"  # a resumed run: the steps it ran itself
        if start.step:
            ran = {0: f"no steps (already at step {step})", 1: f"step {step}"}.get(
                step - start.step, f"steps {start.step + 1}-{step}"
            )
        accelerator.print(f"done: {ran} in {seconds:.1f}s -> {summary['export']}")
        pushed = summary.get("push_to_hub", {})
        if "error" in pushed:
            accelerator.print(
                f"train.push_to_hub: the upload to {pushed['repo_id']} failed: {pushed['error']}"
            )
        elif pushed:
            accelerator.print(f"uploaded {summary['export']} to {pushed['url']}")
    accelerator.end_training()
    return TrainResult(summary, unwrapped, run.pipe, run.initial)


# --------------------------------------------------------------------------------------------------
# run bookkeeping: output directory, run id, history, checkpoints


# What a checkpoint decides (its optimizer's and scheduler's learning rates) or positions (the data order, the
# step's size): a resume that changes them would train otherwise than its config.yaml and model card say.
_FIXED_ON_RESUME = (
    "train.learning_rate",
    "train.scale_lr",
    "train.lr_scheduler",
    "train.warmup_steps",
    "train.optimizer",
    "train.batch_size",
    "train.gradient_accumulation_steps",
    "train.seed",
)


def _check_resume_settings(cfg: RunConfig, out: Path) -> None:
    """A resume keeps the settings its checkpoint fixed (``_FIXED_ON_RESUME``): a change is a ConfigError naming
    each key with both values, before anything loads; another ``data.source`` is a note (a moved dataset)."""
    saved = out / "config.yaml"
    if not cfg.train.resume or not saved.is_file():
        return
    try:
        before = {
            f"{sec}.{k}": v
            for sec, vals in (safe_load(saved.read_text()) or {}).items()
            for k, v in (vals or {}).items()
        }
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return  # not a config this loop wrote: the checkpoint's own checks still apply
    now = _flat_config(cfg)
    changed = [
        f"{k}={before[k]!r} -> {now[k]!r}"
        for k in _FIXED_ON_RESUME
        if k in before and before[k] != now.get(k)
    ]
    if changed:
        raise ConfigError(
            f"train.resume={cfg.train.resume}: the run in {out} was trained with other settings that its "
            f"checkpoint fixes ({'; '.join(changed)}): resume with the run's own values, or start a new run "
            "(another train.output_dir, or train.overwrite=true)"
        )
    if (
        "data.source" in before
        and before["data.source"] != now.get("data.source")
        and os.environ.get("RANK", "0") == "0"
    ):
        print(
            f"note: train.resume: data.source was {before['data.source']}; the run continues at its data "
            f"position on {now.get('data.source')}"
        )


def _check_output_dir(t_cfg: Any, out: Path) -> None:
    """Runs never mix: an output_dir holding a run needs train.resume (continue) or train.overwrite (a new run)."""
    if t_cfg.resume and t_cfg.resume != "latest" and not (Path(t_cfg.resume) / STATE_FILE).is_file():
        raise TrainingError(f"train.resume={t_cfg.resume}: not a checkpoint directory (no {STATE_FILE})")
    if not t_cfg.resume and not t_cfg.overwrite and _holds_a_run(out):
        raise ConfigError(
            f"train.output_dir={out} is not empty (another run?): add train.resume=latest to continue "
            "that run or train.overwrite=true to start a new one there"
        )


# What a run writes before it has anything to resume or keep: a run that stopped there (bad data, a missing
# model, a crash in its first steps) left no checkpoint, logged step or export, so fixing the cause and running
# the same command again just works (its validation grids and tensorboard logs are written anew).
_BEFORE_STEP_1 = {RUN_FILE, "config.yaml", "history.jsonl", "logs", "validation", "checkpoints"}


# What describes a finished run (its export and report): a new run in the same folder (train.overwrite) moves them
# aside, so that until it writes its own nothing there describes the old run as if it were the new one.
_RUN_OUTPUTS = ("final", "summary.json", "validation", "training_curves.png", "history.jsonl", "config.yaml")


def _set_aside_outputs(out: Path) -> list[Path]:
    """Move the previous run's export, report, history and config into ``superseded/<its run id>/`` (when it got as
    far as a logged step); returns the moved paths."""
    present = [out / name for name in _RUN_OUTPUTS if (out / name).exists()]
    history = out / "history.jsonl"
    if not any(p.name in ("final", "summary.json") for p in present) and not (
        history.is_file() and history.stat().st_size
    ):
        return []
    dest = out / "superseded" / (read_run_id(out) or time.strftime("%Y%m%d-%H%M%S"))
    dest.mkdir(parents=True, exist_ok=True)
    moved = []
    for path in present:
        target = dest / path.name
        if target.exists():  # the same old run set aside twice (a new run stopped before writing its own)
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        moved.append(Path(shutil.move(str(path), str(target))))
    return moved


def _lock_output_dir(out: Path) -> int:
    """An exclusive lock on the output folder for the run's life (``flock`` on the folder itself: no file left
    behind): a second ``mmalign train`` into it while the first runs (a requeued job passing train.resume=latest)
    is refused instead of interleaving history.jsonl and overwriting checkpoints. -1 where the file system or OS
    has no flock (the run goes on unlocked)."""
    try:
        import fcntl
    except ImportError:  # Windows
        return -1
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(
            f"train.output_dir={out}: another training run is writing there now; wait for it to end, or use "
            "another train.output_dir"
        ) from None
    except OSError:  # no flock on this file system
        os.close(fd)
        return -1
    return fd


def _holds_a_run(out: Path) -> bool:
    """Whether ``out`` holds something a new run must not mix with: a checkpoint, a step in history.jsonl, an
    export, a summary, or any file a run does not write itself."""
    if not out.is_dir():
        return False
    if any(p.name not in _BEFORE_STEP_1 for p in out.iterdir()):
        return True
    history, checkpoints = out / "history.jsonl", out / "checkpoints"
    return (history.is_file() and history.stat().st_size > 0) or (
        checkpoints.is_dir() and any(checkpoints.iterdir())
    )


def _run_id(t_cfg: Any, out: Path) -> str:
    """The run this output_dir now belongs to: kept on resume, new otherwise (old checkpoints stay, unrotated)."""
    if t_cfg.resume == "latest":
        return read_run_id(out) or new_run_id()
    if t_cfg.resume:
        return run_id_of(Path(t_cfg.resume)) or new_run_id()
    return new_run_id()


def _restart_history(path: Path, upto: int | None) -> None:
    """history.jsonl keeps the steps up to ``upto`` (a resume; later lines came from the interrupted part)
    and is appended from there; a new run (``upto`` None) starts it empty."""
    kept = []
    if upto is not None and path.is_file():
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= upto:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a kill
    path.write_text("".join(kept))


def _save(run: _Run, pos: _Position) -> Path:
    if run.data.flush is not None:
        run.data.flush()  # a lazy cache's encodings reach disk with the checkpoint
    state = {
        "run_id": run.run_id,
        "method": run.method.name,
        "epoch": pos.epoch,
        "batch": pos.batch,
        "micro_step": pos.micro_step,
    }
    return save_checkpoint(
        run.checkpoints, pos.step, state, run.parts(), run.accelerator, run.cfg.train.checkpoints_total_limit
    )


def _reset_single_process_state() -> None:
    """Let ``train`` run again in the same process with other precision settings (tests, notebooks, the
    quickstart). accelerate keeps one process-wide state; a single-process one holds no process group,
    so dropping it is safe. Under torchrun/accelerate launch every call shares one config and it stays."""
    from accelerate.state import AcceleratorState, PartialState

    if AcceleratorState._shared_state and PartialState().num_processes == 1:
        AcceleratorState._reset_state(reset_partial_state=True)


def _flat_config(cfg: RunConfig) -> dict[str, Any]:
    flat = {}
    for section, values in to_dict(cfg).items():
        for key, value in (values or {}).items():
            flat[f"{section}.{key}"] = value
    return flat


def lora_layers_for_export(denoiser: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights with ``lora_alpha / r`` folded into ``lora_B``: a file without alphas loads (in
    diffusers, and in the tools that read its format) as alpha = rank, so ``lora.alpha`` 16 at rank 4 would
    otherwise load at a quarter of the strength it trained at."""
    from peft.utils import get_peft_model_state_dict

    layers = get_peft_model_state_dict(denoiser)
    config = denoiser.peft_config.get("default") or next(iter(denoiser.peft_config.values()))
    scale = config.lora_alpha / config.r
    if scale != 1.0:
        layers = {k: v * scale if ".lora_B." in k else v for k, v in layers.items()}
    return layers


def export(pipe: Any, denoiser: torch.nn.Module, denoiser_name: str, cfg: RunConfig, out_dir: Path) -> Path:
    """LoRA -> ``pipe.load_lora_weights(out_dir)``-loadable weights; full -> the denoiser in diffusers format.

    ``denoiser_name`` is the pipeline attribute ("unet" or "transformer"); diffusers' ``save_lora_weights``
    takes the layers as ``<name>_lora_layers``. Wan 2.2's low-noise expert (``transformer_2``) is saved as
    diffusers saves it, as a transformer LoRA, with ``lora_target.json`` saying to load it with
    ``load_into_transformer_2=True`` (as :func:`mmalign.pipelines.runtime.load_trained` does).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.lora.enabled:
        from diffusers.utils import convert_state_dict_to_diffusers

        layers = lora_layers_for_export(denoiser)
        if (
            denoiser_name == "unet"
        ):  # as diffusers' UNet LoRA scripts save; its transformer scripts (SD3, FLUX, Wan,
            # CogVideoX) save peft's keys as they are, and SD3's loader skips converted ones (to_q.lora.down ...)
            layers = convert_state_dict_to_diffusers(layers)
        name = "transformer" if denoiser_name == "transformer_2" else denoiser_name
        type(pipe).save_lora_weights(out_dir, **{f"{name}_lora_layers": layers}, safe_serialization=True)
        if denoiser_name == "transformer_2":
            write_json(
                out_dir / LORA_TARGET_FILE,
                {
                    "component": denoiser_name,
                    "load": f"pipe.load_lora_weights('{out_dir}', load_into_transformer_2=True)",
                },
            )
    else:
        denoiser.save_pretrained(out_dir / denoiser_name, safe_serialization=True)
    return out_dir


def _validate(run: _Run, step: int) -> None:
    # what training left unloaded and sampling needs (a Wan 2.2 expert run's other expert): once, at the first grid
    loaded = load_unused(
        run.pipe,
        run.family,
        run.cfg.model,
        device=run.accelerator.device,
        dtype=weight_dtype(run.cfg.train.mixed_precision),
    )
    if loaded:
        run.accelerator.print(
            f"validation: loaded {', '.join(loaded)} from {run.cfg.model.pretrained} to sample with"
        )
    with run.accelerator.autocast():  # the training step's precision (FSDP2 gathers bf16 weights under bf16)
        media = sample_validation(  # sharded: on every process (each forward gathers the weights)
            run.pipe,
            run.accelerator.unwrap_model(run.denoiser),
            run.adapter,
            run.cfg.train,
            **_sample_shape(run.cfg, video=is_video(run.adapter)),
        )
    if not run.accelerator.is_main_process:
        return
    log_validation(
        run.accelerator,
        media,
        list(run.cfg.train.validation_prompts),
        step,
        run.out / "validation" / f"step-{step:06d}.png",
    )


def _sample_shape(cfg: RunConfig, video: bool) -> dict[str, int]:
    """The shape a run trains on, for its validation samples: an image run's ``model.resolution`` square, a video
    run's clip (frames, height, width) as its method trains on them.

    Not the pipeline's defaults: FLUX samples 1024 px whatever the run trains on (a 512 px run's grid would cost 4x
    its step and show another scale than it learns), Wan 81 frames at 480x832 and the toy video model 16 frames.
    """
    mc, res = cfg.method, cfg.model.resolution
    if not video:
        return {"height": res, "width": res}
    if not hasattr(
        mc, "num_frames"
    ):  # a video method without a clip shape of its own: the pipeline's defaults
        return {}
    shape = {"height": mc.height or res, "width": mc.width or res}
    return {**shape, "num_frames": mc.num_frames} if mc.num_frames else shape


@torch.no_grad()
def sample_validation(
    pipe: Any, denoiser: torch.nn.Module, adapter: Any, t_cfg: Any, **pipe_kwargs: Any
) -> torch.Tensor:
    """The fixed validation prompts sampled with a fixed seed: images [N,3,H,W] or clips [N,T,3,H,W] in [0, 1].

    ``pipe_kwargs`` go to the pipeline call (a video run's ``num_frames``/``height``/``width``).
    """
    was_training = denoiser.training
    denoiser.eval()
    setattr(pipe, adapter.denoiser_name, denoiser)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(device="cpu").manual_seed(t_cfg.validation_seed)
    out = pipe(
        list(t_cfg.validation_prompts),
        num_inference_steps=t_cfg.validation_steps,
        guidance_scale=t_cfg.validation_guidance,
        generator=generator,
        output_type="pt",
        **prompt_length(pipe, adapter),
        **pipe_kwargs,
    )
    denoiser.train(was_training)
    return torch.as_tensor(out.frames if is_video(adapter) else out.images).float().cpu()
