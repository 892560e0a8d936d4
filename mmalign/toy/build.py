"""Pretrain the toy pipeline: a real StableDiffusionPipeline, tiny, on 32x32 coloured shapes (DESIGN §5).

Three stages, all seeded: (1) an AutoencoderKL (x4 down, 8x8x4 latents) learns to reconstruct toy images;
(2) the data set is encoded once into latents; (3) a UNet2DConditionModel and a 2-layer CLIPTextModel
(word-level tokenizer over :data:`~mmalign.toy.render.TOY_WORDS`) learn DDPM epsilon prediction, with
caption dropout for classifier-free guidance and an EMA of the weights. The result is saved with
``save_pretrained`` (safetensors) and loads back with ``StableDiffusionPipeline.from_pretrained``.

The base is imperfect on purpose, so preference tuning has room to help: part of the training images
carry speckle or the wrong colour for their caption, and the UNet is trained briefly.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from mmalign.toy import DEFAULT_TOY_MODEL
from mmalign.toy.render import TOY_WORDS, sample_dataset
from mmalign.toy.tokenizer import build_word_tokenizer


@dataclass
class ToyBuildConfig:
    """Everything that determines the built weights (saved beside them as ``toy_build.json``)."""

    seed: int = 0
    image_size: int = 32
    num_images: int = 16384
    p_speckle: float = 0.15
    p_wrong_color: float = 0.12
    vae_steps: int = 800
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    unet_steps: int = 2000
    unet_batch: int = 32
    unet_lr: float = 1e-3
    text_hidden: int = 64
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    threads: int = 1


def make_vae(seed: int):
    """AutoencoderKL, 3 levels (32, 64, 64) -> x4 downsampling, 4 latent channels."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=32,
    )


def make_unet(seed: int, cross_attention_dim: int):
    """UNet2DConditionModel on 8x8x4 latents, (64, 128) channels, 1 layer per block; like SD, cross-attention
    everywhere but the lowest-resolution down/up blocks (keeps the weights under 20 MB)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(64, 128),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def make_text_encoder(seed: int, vocab_size: int, hidden: int, max_len: int):
    """A 2-layer CLIPTextModel whose special-token ids match the word-level tokenizer."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=max_len,
        projection_dim=hidden,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        hidden_act="gelu",
    )
    return CLIPTextModel(config)


def make_schedulers():
    """SD's noise schedule: DDPM for training, DDIM (the pipeline's sampler)."""
    from diffusers import DDIMScheduler, DDPMScheduler

    kwargs = dict(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        prediction_type="epsilon",
    )
    ddim = DDIMScheduler(**kwargs, set_alpha_to_one=False, steps_offset=1)
    return DDPMScheduler(**kwargs), ddim


def _ema_update(ema: list[torch.Tensor], params: list[torch.nn.Parameter], decay: float) -> None:
    with torch.no_grad():
        torch._foreach_mul_(ema, decay)
        torch._foreach_add_(ema, [p.detach() for p in params], alpha=1 - decay)


def _lr_factor(step: int, total: int, warmup: int = 100) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1))) * 0.9 + 0.1


def train_vae(vae, images: torch.Tensor, cfg: ToyBuildConfig, log: Callable[[str], None]) -> float:
    """Train the autoencoder on ``images`` [N,3,H,W] in [0,1]; returns the last logged reconstruction MSE."""
    g = torch.Generator().manual_seed(cfg.seed + 11)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg.vae_steps))
    vae.train()
    running, t0 = 0.0, time.time()
    for step in range(cfg.vae_steps):
        idx = torch.randint(0, len(images), (cfg.vae_batch,), generator=g)
        x = images[idx] * 2 - 1
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        recon = vae.decode(z).sample
        mse = F.mse_loss(recon, x)
        loss = mse + cfg.vae_kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        running = 0.98 * running + 0.02 * mse.item() / 4 if step else mse.item() / 4  # MSE in [0,1] units
        if step % 100 == 0 or step == cfg.vae_steps - 1:
            log(f"vae step {step}/{cfg.vae_steps} mse {running:.4f} ({time.time() - t0:.0f}s)")
    vae.eval()
    return running


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Posterior means [N,4,h,w] of ``images`` [N,3,H,W] in [0,1] (unscaled)."""
    return torch.cat(
        [vae.encode(images[i : i + batch] * 2 - 1).latent_dist.mean for i in range(0, len(images), batch)]
    )


def train_unet(
    unet, text_encoder, tokenizer, latents, captions, cfg: ToyBuildConfig, log: Callable[[str], None]
):
    """DDPM epsilon training of ``unet`` and ``text_encoder`` on scaled ``latents`` [N,4,h,w]; loads the EMA."""
    ddpm, _ = make_schedulers()
    g = torch.Generator().manual_seed(cfg.seed + 13)
    ids = tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    empty = tokenizer(
        [""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids
    params = [*unet.parameters(), *text_encoder.parameters()]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg.unet_steps))
    alphas = ddpm.alphas_cumprod
    unet.train()
    text_encoder.train()
    running, t0 = 0.0, time.time()
    for step in range(cfg.unet_steps):
        idx = torch.randint(0, len(latents), (cfg.unet_batch,), generator=g)
        x0 = latents[idx]
        batch_ids = ids[idx].clone()
        drop = torch.rand(cfg.unet_batch, generator=g) < cfg.caption_dropout
        batch_ids[drop] = empty[0]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, ddpm.config.num_train_timesteps, (cfg.unet_batch,), generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        hidden = text_encoder(batch_ids)[0]
        pred = unet(xt, t, encoder_hidden_states=hidden).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        _ema_update(ema, params, min(cfg.ema_decay, (1 + step) / (10 + step)))
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if step % 100 == 0 or step == cfg.unet_steps - 1:
            log(f"unet step {step}/{cfg.unet_steps} loss {running:.4f} ({time.time() - t0:.0f}s)")
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    unet.eval()
    text_encoder.eval()
    return running


def toy_build(out_dir: str | Path = DEFAULT_TOY_MODEL, *, log: Callable[[str], None] = print, **overrides):
    """Build the toy StableDiffusionPipeline and save it to ``out_dir`` (diffusers format, safetensors).

    Args:
        out_dir: destination; ``mmalign/toy/assets/toy-sd`` by default (the committed weights).
        log: progress printer.
        **overrides: fields of :class:`ToyBuildConfig` (e.g. ``unet_steps=200`` for a quick smoke build).

    Returns:
        The built ``StableDiffusionPipeline`` (in eval mode, fp32, on CPU).
    """
    from diffusers import StableDiffusionPipeline

    cfg = ToyBuildConfig(**overrides)
    out_dir = Path(out_dir)
    torch.set_num_threads(cfg.threads)
    start = time.time()
    log(f"toy build -> {out_dir} with {asdict(cfg)}")
    images, rows = sample_dataset(
        cfg.num_images,
        seed=cfg.seed,
        size=cfg.image_size,
        p_speckle=cfg.p_speckle,
        p_wrong_color=cfg.p_wrong_color,
    )
    captions = [r.caption for r in rows]
    log(f"rendered {len(images)} images ({time.time() - start:.0f}s)")

    vae = make_vae(cfg.seed + 1)
    vae_mse = train_vae(vae, images, cfg, log)
    latents = encode_latents(vae, images)
    scaling = 1.0 / latents.std().item()
    vae.register_to_config(scaling_factor=scaling)
    latents = latents * scaling
    vae_seconds = time.time() - start
    log(f"vae done: mse {vae_mse:.4f}, latent scaling {scaling:.3f} ({vae_seconds:.0f}s)")

    tokenizer = build_word_tokenizer(TOY_WORDS, out_dir / "tokenizer")
    text_encoder = make_text_encoder(
        cfg.seed + 2, len(tokenizer), cfg.text_hidden, tokenizer.model_max_length
    )
    unet = make_unet(cfg.seed + 3, cfg.text_hidden)
    unet_loss = train_unet(unet, text_encoder, tokenizer, latents, captions, cfg, log)
    _, ddim = make_schedulers()
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=ddim,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    seconds = time.time() - start
    info = {
        "config": asdict(cfg),
        "vae_mse": vae_mse,
        "unet_loss": unet_loss,
        "vae_seconds": round(vae_seconds),
        "seconds": round(seconds),
        "torch": torch.__version__,
    }
    (out_dir / "toy_build.json").write_text(json.dumps(info, indent=2) + "\n")
    log(f"saved {out_dir} in {seconds:.0f}s")
    return pipe
