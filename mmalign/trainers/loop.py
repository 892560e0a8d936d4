"""The one training loop. accelerate does devices, precision, accumulation and distribution; a method
contributes ``compute_loss``. Reads top to bottom: load -> data -> trainable params -> optimizer ->
resume -> steps (log, checkpoint, validate) -> export.

Run it with ``mmalign train CONFIG [key=value ...]`` on one device, or under ``accelerate launch -m mmalign
train ...`` / ``torchrun --nproc_per_node N -m mmalign train ...`` on many.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmalign.config import RunConfig, save_config, to_dict
from mmalign.pipelines import load_pipeline, make_adapter
from mmalign.trainers import check_noise_process, get_method
from mmalign.trainers.common import TrainModels

CHECKPOINT_PREFIX = "checkpoint-"
TRAINABLE_FILE = "trainable.safetensors"


@dataclass
class TrainResult:
    """What :func:`train` returns: the summary written to summary.json and the trained network."""

    summary: dict[str, Any]
    denoiser: torch.nn.Module
    pipeline: Any
    initial_trainable: dict[str, torch.Tensor] | None = None


class TrainingError(RuntimeError):
    """Training cannot continue (non-finite loss, bad resume target ...); checkpoints already written stay."""


# --------------------------------------------------------------------------------------------------
# helpers


def weight_dtype(mixed_precision: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def add_lora(denoiser: torch.nn.Module, lora: Any) -> None:
    """Attach a peft LoRA adapter (diffusers' PeftAdapterMixin); only its weights will train."""
    from peft import LoraConfig

    denoiser.add_adapter(LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha if lora.alpha is not None else lora.rank, lora_dropout=lora.dropout,
        init_lora_weights=lora.init if lora.init != "default" else True, target_modules=list(lora.target_modules),
    ))


def build_optimizer(params: list[torch.nn.Parameter], train: Any, lr: float) -> torch.optim.Optimizer:
    if train.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(train.adam_beta1, train.adam_beta2),
                                 weight_decay=train.weight_decay, eps=train.adam_epsilon)
    if train.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # Salesforce's SDXL settings: fixed lr, no relative step or parameter scaling.
        return Adafactor(params, lr=lr, relative_step=False, scale_parameter=False, warmup_init=False,
                         clip_threshold=1.0, weight_decay=train.weight_decay)
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise ImportError("train.optimizer=adamw8bit needs bitsandbytes: pip install 'mmalign[bnb]'") from err
    return bnb.optim.AdamW8bit(params, lr=lr, betas=(train.adam_beta1, train.adam_beta2),
                               weight_decay=train.weight_decay, eps=train.adam_epsilon)


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    ckpts = [p for p in Path(output_dir, "checkpoints").glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir()]
    return sorted(ckpts, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    if not resume:
        return None
    if resume == "latest":
        ckpts = list_checkpoints(output_dir)
        return ckpts[-1] if ckpts else None
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise TrainingError(f"train.resume={resume}: not a checkpoint directory (no state.json)")
    return path


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in model.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------------------------------
# the loop


def train(cfg: RunConfig, *, keep_initial: bool = False) -> TrainResult:
    """Train ``cfg.method`` on ``cfg.data`` and export the result.

    Args:
        cfg: the run config.
        keep_initial: also return a CPU copy of the trainable weights before the first step (tests use it
            to prove that every trainable weight moved; costs a copy of them).
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    t_cfg = cfg.train
    out = Path(t_cfg.output_dir)
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
    if t_cfg.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    set_seed(t_cfg.seed)  # same seed on every process: identical LoRA init on every replica
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")

    # ---- model
    dtype = weight_dtype(t_cfg.mixed_precision)
    m = cfg.model
    pipe, family = load_pipeline(m.pretrained, family=m.family, revision=m.revision, variant=m.variant, vae=m.vae,
                                 trust_remote_code=m.trust_remote_code)
    adapter = make_adapter(pipe, family, **m.adapter_options)
    check_noise_process(method.name, family, adapter.noise_process)
    denoiser = getattr(pipe, adapter.denoiser_name)
    for encoder in adapter.text_encoders:
        encoder.requires_grad_(False).to(accelerator.device, dtype)
    pipe.vae.requires_grad_(False).to(accelerator.device)  # fp32: the stock SDXL VAE overflows in fp16
    denoiser.requires_grad_(False)

    # ---- data (cache filled once, before any trainable weight exists)
    data = method.build_data(cfg, adapter, accelerator)

    reference = None
    if cfg.lora.enabled:
        add_lora(denoiser, cfg.lora)
        for p in denoiser.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # trainable weights stay fp32 under fp16/bf16 autocast
    else:
        if method.needs_reference(cfg.method):
            reference = copy.deepcopy(denoiser).requires_grad_(False).to(accelerator.device, dtype).eval()
        denoiser.requires_grad_(True)
    if t_cfg.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    denoiser.to(accelerator.device)
    denoiser.train()
    params = [p for p in denoiser.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    initial = trainable_state(denoiser) if keep_initial else None

    # ---- optimisation
    global_batch = t_cfg.batch_size * t_cfg.gradient_accumulation_steps * accelerator.num_processes
    lr = t_cfg.learning_rate * (global_batch if t_cfg.scale_lr else 1)
    optimizer = build_optimizer(params, t_cfg, lr)
    from diffusers.optimization import get_scheduler

    lr_scheduler = get_scheduler(t_cfg.lr_scheduler, optimizer, num_warmup_steps=t_cfg.warmup_steps * accelerator.num_processes,
                                 num_training_steps=t_cfg.max_steps * accelerator.num_processes)
    loader = torch.utils.data.DataLoader(data.dataset, batch_size=t_cfg.batch_size, shuffle=True, drop_last=True,
                                         collate_fn=data.collate, num_workers=cfg.data.num_workers)
    if len(loader) == 0:
        raise TrainingError(f"{cfg.data.source}: {len(data.dataset)} pairs is fewer than train.batch_size={t_cfg.batch_size}")
    denoiser, optimizer, loader, lr_scheduler = accelerator.prepare(denoiser, optimizer, loader, lr_scheduler)
    models = TrainModels(adapter, denoiser, reference, unwrap=accelerator.unwrap_model)
    if method.make_state is not None:
        models.state = method.make_state(models, cfg.method)
        if models.state is not None:
            accelerator.register_for_checkpointing(models.state)  # saved and restored with every checkpoint

    # Checkpoints hold only the trainable weights (a LoRA is megabytes, not the 5 GB UNet).
    def save_hook(hook_models, weights, output_dir):
        if accelerator.is_main_process:
            for model in hook_models:
                save_file(trainable_state(model), os.path.join(output_dir, TRAINABLE_FILE))
        weights.clear()

    def load_hook(hook_models, input_dir):
        state = load_file(os.path.join(input_dir, TRAINABLE_FILE))
        while hook_models:
            model = hook_models.pop()
            missing = set(state) - {n for n, _ in model.named_parameters()}
            if missing:
                raise TrainingError(f"{input_dir}: checkpoint has weights this model lacks, e.g. {sorted(missing)[:3]}")
            model.load_state_dict(state, strict=False)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

    # ---- resume
    step = 0
    resume_from = resolve_resume(t_cfg.resume, out)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        step = json.loads((resume_from / "state.json").read_text())["step"]
        accelerator.print(f"resumed from {resume_from} at step {step}")
    if accelerator.is_main_process and t_cfg.report_to != "none":
        accelerator.init_trackers("mmalign", config={k: v for k, v in _flat_config(cfg).items() if isinstance(v, (int, float, str, bool))})

    accelerator.print(
        f"{method.name} on {family} ({m.pretrained}): {len(data.dataset)} items, {n_trainable:,} trainable params "
        f"({'LoRA r=' + str(cfg.lora.rank) if cfg.lora.enabled else 'full fine-tune'}), global batch {global_batch}, lr {lr:.3g}"
    )

    def save_checkpoint(at_step: int) -> Path:
        final = out / "checkpoints" / f"{CHECKPOINT_PREFIX}{at_step}"
        tmp = out / "checkpoints" / f".tmp-{CHECKPOINT_PREFIX}{at_step}"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()  # every rank has written its RNG state before the directory moves
        if accelerator.is_main_process:
            (tmp / "state.json").write_text(json.dumps({"step": at_step, "method": method.name}))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)  # a checkpoint only ever appears complete
            if t_cfg.checkpoints_total_limit:
                for old in list_checkpoints(out)[:-t_cfg.checkpoints_total_limit]:
                    shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final

    # ---- steps
    batches_per_epoch = len(loader)
    micro = step * t_cfg.gradient_accumulation_steps
    epoch, skip = divmod(micro, batches_per_epoch)
    history: list[dict[str, float]] = []
    skipped: list[str] = list(data.skipped)
    bar = tqdm(total=t_cfg.max_steps, initial=step, desc=method.name, disable=not (t_cfg.progress and accelerator.is_local_main_process))
    t0, last_metrics = time.perf_counter(), {}
    steps_at_t0 = step
    while step < t_cfg.max_steps:
        loader.set_epoch(epoch)
        epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
        skip = 0
        for raw in epoch_loader:
            skipped.extend(raw.get("skipped", []))
            if "prompt" not in raw:  # every item of this batch was unreadable and skipped
                continue
            with accelerator.accumulate(denoiser), accelerator.autocast():
                batch = data.prepare(raw, accelerator.device)
                loss, metrics = method.compute_loss(batch, models, cfg.method)
                if not torch.isfinite(loss):
                    last = list_checkpoints(out)
                    raise TrainingError(
                        f"non-finite loss ({loss.item()}) at step {step + 1} on items {batch.get('item_id')}; "
                        f"last checkpoint: {last[-1] if last else 'none'}. Lower train.learning_rate or method.beta, or use bf16."
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients and t_cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, t_cfg.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            if models.state is not None:
                models.state.after_optimizer_step()  # e.g. Self-NPO's EMA teacher, once per optimizer step
            step += 1
            # one collective for the loss and every metric (not one per metric), one host sync for all of them
            names = ["loss", *metrics]
            values = torch.stack([loss.detach().float().mean(), *(v.detach().float().mean() for v in metrics.values())])
            values = accelerator.reduce(values.to(accelerator.device), "mean").tolist()
            logs = {"lr": lr_scheduler.get_last_lr()[0], **dict(zip(names, values))}
            last_metrics = logs
            if step % t_cfg.log_every == 0 or step == t_cfg.max_steps:
                history.append({"step": step, **logs})
                if t_cfg.report_to != "none":
                    accelerator.log(logs, step=step)
            bar.update(1)
            bar.set_postfix(loss=f"{logs['loss']:.4f}", acc=f"{logs.get('implicit_acc', float('nan')):.2f}")
            if t_cfg.checkpoint_every and step % t_cfg.checkpoint_every == 0 and step < t_cfg.max_steps:
                save_checkpoint(step)
            if t_cfg.validation_every and step % t_cfg.validation_every == 0 and accelerator.is_main_process:
                write_validation_grid(pipe, accelerator.unwrap_model(denoiser), adapter, t_cfg, out / "validation" / f"step-{step:06d}.png")
            if step >= t_cfg.max_steps:
                break
        epoch += 1
    bar.close()
    seconds = time.perf_counter() - t0

    # ---- finish: checkpoint, replica check, export, summary
    final_ckpt = save_checkpoint(step)
    unwrapped = accelerator.unwrap_model(denoiser)
    checksum = torch.tensor([sum(float(p.detach().double().sum()) for p in unwrapped.parameters() if p.requires_grad)],
                            dtype=torch.float64, device=accelerator.device)
    all_sums = accelerator.gather(checksum).tolist()
    summary = {
        "method": method.name, "family": family, "steps": step, "seconds": seconds,
        "steps_per_second": (step - steps_at_t0) / seconds if seconds > 0 else math.nan,
        "pairs_per_second": (step - steps_at_t0) * global_batch / seconds if seconds > 0 else math.nan,
        "trainable_params": n_trainable, "num_processes": accelerator.num_processes,
        "replica_checksums": all_sums, "replicas_identical": len(set(all_sums)) == 1,
        "final_metrics": last_metrics, "data": data.counts, "skipped_items": skipped, "checkpoint": str(final_ckpt),
    }
    if accelerator.is_main_process:
        summary["export"] = str(export(pipe, unwrapped, adapter.denoiser_name, cfg, out / "final"))
        (out / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        if skipped:
            accelerator.print(f"skipped {len(skipped)} unreadable item(s); first: {skipped[0]} (all listed in summary.json)")
        accelerator.print(f"done: {step} steps in {seconds:.1f}s -> {summary['export']}")
    accelerator.end_training()
    return TrainResult(summary, unwrapped, pipe, initial)


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


def export(pipe: Any, denoiser: torch.nn.Module, denoiser_name: str, cfg: RunConfig, out_dir: Path) -> Path:
    """LoRA -> ``pipe.load_lora_weights(out_dir)``-loadable weights; full -> the denoiser in diffusers format.

    ``denoiser_name`` is the pipeline attribute ("unet" or "transformer"); diffusers' ``save_lora_weights``
    takes the layers as ``<name>_lora_layers``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.lora.enabled:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(denoiser))
        type(pipe).save_lora_weights(out_dir, **{f"{denoiser_name}_lora_layers": layers}, safe_serialization=True)
    else:
        denoiser.save_pretrained(out_dir / denoiser_name, safe_serialization=True)
    return out_dir


@torch.no_grad()
def write_validation_grid(pipe: Any, denoiser: torch.nn.Module, adapter: Any, t_cfg: Any, path: Path) -> Path:
    """Sample the fixed validation prompts with a fixed seed and save them as one PNG grid."""
    from torchvision.utils import save_image

    was_training = denoiser.training
    denoiser.eval()
    setattr(pipe, adapter.denoiser_name, denoiser)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(device="cpu").manual_seed(t_cfg.validation_seed)
    out = pipe(list(t_cfg.validation_prompts), num_inference_steps=t_cfg.validation_steps,
               guidance_scale=t_cfg.validation_guidance, generator=generator, output_type="pt")
    denoiser.train(was_training)
    path.parent.mkdir(parents=True, exist_ok=True)
    if hasattr(out, "frames"):  # video pipelines: [B,T,3,H,W] -> one row of frames per prompt
        frames = torch.as_tensor(out.frames).float().cpu()
        save_image(frames.flatten(0, 1), path, nrow=frames.shape[1])
    else:
        save_image(out.images.float().cpu(), path, nrow=min(len(out.images), 4))
    return path
