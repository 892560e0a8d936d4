"""Toy video family: diffusers' TextToVideoSDPipeline (UNet3DConditionModel + a per-frame AutoencoderKL +
CLIP text encoder, DDPM epsilon by default), small enough to train and sample on a CPU.

The VAE encodes each frame on its own (temporal compression 1, one latent frame per pixel frame), so
segment labels map one to one onto latent frames. Latents are [B,C,T,H,W], as for CogVideoX and Wan.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmalign.pipelines.base import ddpm_add_noise, ddpm_target, training_scheduler, uniform_timesteps
from mmalign.pipelines.sd15 import clip_hidden_states


def frames_to_batch(pixels: torch.Tensor) -> torch.Tensor:
    """[B,T,3,H,W] -> [B*T,3,H,W]."""
    return pixels.reshape(-1, *pixels.shape[2:])


@dataclass
class ToyVideoAdapter:
    """Adapter for TextToVideoSDPipeline checkpoints (the toy video model; ModelScope-style UNet3D models)."""

    pipeline: Any
    family: str = "toy_video"
    denoiser_name: str = "unet"
    temporal_compression: int = 1
    causal: bool = False

    def __post_init__(self) -> None:
        self.scheduler = training_scheduler(self.pipeline.scheduler.config)
        self.vae = self.pipeline.vae
        self.text_encoder = self.pipeline.text_encoder
        self.tokenizer = self.pipeline.tokenizer

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        hidden, _ = clip_hidden_states(self.tokenizer, self.text_encoder, list(prompts))
        return {"encoder_hidden_states": hidden}

    @torch.no_grad()
    def latent_moments(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels [B,T,3,H,W] in [-1,1] -> posterior mean and std, each [B,C,T,h,w] (unscaled)."""
        b, t = pixels.shape[:2]
        dist = self.vae.encode(frames_to_batch(pixels).to(self.vae.device, self.vae.dtype)).latent_dist

        def video(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(b, t, *x.shape[1:]).permute(0, 2, 1, 3, 4)

        return video(dist.mean), video(dist.std)

    def latents_from_moments(self, mean, std, generator=None) -> torch.Tensor:
        eps = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(mean.device)
        return (mean.float() + std.float() * eps) * self.vae.config.scaling_factor

    def encode_media(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.latents_from_moments(*self.latent_moments(pixels), generator)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents [B,C,T,h,w] -> videos [B,T,3,H,W] in [0,1]."""
        b, _, t = latents.shape[:3]
        z = latents.permute(0, 2, 1, 3, 4).reshape(b * t, *latents.shape[1:2], *latents.shape[3:])
        x = self.vae.decode(z.to(self.vae.dtype) / self.vae.config.scaling_factor).sample.float()
        return x.reshape(b, t, *x.shape[1:]).add(1).div(2).clamp(0, 1)

    def extra_conditioning(self, meta: dict[str, Any], resolution: int) -> dict[str, torch.Tensor]:
        return {}

    def add_noise(self, x0, noise, t):
        return ddpm_add_noise(self.scheduler, x0, noise, t)

    def target(self, x0, noise, t):
        return ddpm_target(self.scheduler, x0, noise, t)

    def predict(self, denoiser, xt, t, cond):
        dtype = next(p.dtype for p in denoiser.parameters())
        return denoiser(xt.to(dtype), t, encoder_hidden_states=cond["encoder_hidden_states"].to(dtype)).sample

    def sample_timesteps(self, n, generator, device):
        return uniform_timesteps(self.scheduler, n, generator, device)


def make_toy_video_pipeline(*, vae: Any = None, text_encoder: Any = None, tokenizer: Any = None, seed: int = 0,
                            block_out_channels: tuple[int, ...] = (16, 32), latent_channels: int = 4,
                            cross_attention_dim: int | None = None, prediction_type: str = "epsilon",
                            tokenizer_dir: str | Path | None = None) -> Any:
    """A randomly initialised TextToVideoSDPipeline; pass the toy image model's VAE/text encoder to reuse them.

    Missing parts are built tiny: a 2-level AutoencoderKL (x2 down), a 2-layer CLIPTextModel over the
    toy vocabulary (tokenizer written to ``tokenizer_dir``).
    """
    from diffusers import DDIMScheduler, TextToVideoSDPipeline, UNet3DConditionModel

    if tokenizer is None or text_encoder is None:
        from mmalign.toy.render import TOY_WORDS
        from mmalign.toy.tiny import _text_encoder
        from mmalign.toy.tokenizer import build_word_tokenizer

        if tokenizer_dir is None:
            raise ValueError("pass tokenizer_dir (where the toy tokenizer files are written) or a tokenizer and text encoder")
        tokenizer = build_word_tokenizer(TOY_WORDS, tokenizer_dir)
        text_encoder = _text_encoder(16, None, len(tokenizer), seed + 1, tokenizer.model_max_length)
    if vae is None:
        from mmalign.toy.tiny import _vae

        vae = _vae(seed + 2, latent_channels=latent_channels)
    torch.manual_seed(seed)
    unet = UNet3DConditionModel(
        sample_size=8, in_channels=vae.config.latent_channels, out_channels=vae.config.latent_channels,
        block_out_channels=block_out_channels, layers_per_block=1,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=cross_attention_dim or text_encoder.config.hidden_size, attention_head_dim=4,
        norm_num_groups=8,
    )
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, prediction_type=prediction_type, steps_offset=1)
    return TextToVideoSDPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)


def build_tiny_toy_video(out_dir: str | Path, *, seed: int = 0, prediction_type: str = "epsilon") -> Any:
    """A tiny random toy video pipeline saved in diffusers format (for tests). Returns the pipeline."""
    out_dir = Path(out_dir)
    pipe = make_toy_video_pipeline(seed=seed, prediction_type=prediction_type, tokenizer_dir=out_dir / "_tok")
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return pipe
