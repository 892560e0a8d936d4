"""CogVideoX family (CogVideoXPipeline): T5 text encoder, AutoencoderKLCogVideoX (8x spatial, causal 4x
temporal), CogVideoXTransformer3DModel, DDPM v-prediction with the SNR-shifted schedule of
CogVideoXDDIMScheduler / CogVideoXDPMScheduler.

Training maths follow diffusers 0.42.1 ``examples/cogvideo/train_cogvideox_lora.py``: latents =
posterior sample x scaling_factor, uniform t, x_t = scheduler.add_noise; the script converts the output to
x0 with ``get_velocity`` and weights the x0 error by 1/(1 - abar_t), which equals the plain v-prediction
MSE used here (target = scheduler.get_velocity(x0, noise, t)). The schedule keeps CogVideoX's
``snr_shift_scale`` (the adapter's scheduler is the pipeline's scheduler class, not a plain DDPMScheduler).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mmalign.config import ConfigError
from mmalign.pipelines.base import ddpm_add_noise, ddpm_target, uniform_timesteps


@dataclass
class CogVideoXAdapter:
    """Adapter for CogVideoXPipeline checkpoints (CogVideoX-2b/5b and CogVideoX1.5 text-to-video)."""

    pipeline: Any
    family: str = "cogvideox"
    denoiser_name: str = "transformer"
    noise_process: str = "ddpm"  # v-prediction on CogVideoX's SNR-shifted DDPM schedule
    micro_conditioning: bool = False
    causal: bool = True

    def __post_init__(self) -> None:
        self.scheduler = type(self.pipeline.scheduler).from_config(self.pipeline.scheduler.config)
        self.vae = self.pipeline.vae
        self.temporal_compression = self.temporal_compression_of(self.vae.config)
        self.spatial_compression = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.max_text_len = int(self.pipeline.transformer.config.max_text_seq_length)

    @staticmethod
    def temporal_compression_of(vae_config: Any) -> int:
        """Pixel frames per latent frame of an AutoencoderKLCogVideoX config (``temporal_compression_ratio``, 4)."""
        return int(vae_config["temporal_compression_ratio"])

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.pipeline.text_encoder]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, _ = self.pipeline.encode_prompt(
            list(prompts),
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_text_len,
            device=self.pipeline.text_encoder.device,
        )
        return {"encoder_hidden_states": embeds}

    @torch.no_grad()
    def latent_moments(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels [B,T,3,H,W] in [-1,1] (T = 4k+1) -> posterior mean and std [B,C,k+1,H/8,W/8]."""
        x = pixels.permute(0, 2, 1, 3, 4).to(self.vae.device, self.vae.dtype)
        dist = self.vae.encode(x).latent_dist
        self.check_latent_frames(dist.mean.shape[2], pixels.shape[1])
        return dist.mean, dist.std

    def check_latent_frames(self, latent_frames: int, frames: int) -> None:
        """CogVideoX 1.5 patchifies time by ``patch_size_t`` (2): its latent frames must be a multiple of it.

        diffusers' CogVideoXPipeline pads *sampling* latents with extra frames and drops them after decoding;
        a training clip has no such frames to drop, so instead of guessing a padding we refuse it here, before
        any training step, naming the frame counts that work.
        """
        p_t = self.pipeline.transformer.config.get("patch_size_t")
        if p_t and latent_frames % p_t:
            c = self.temporal_compression
            ok = [
                f
                for f in range(frames - 2 * c * p_t, frames + 2 * c * p_t)
                if f > 0 and (f - 1) % c == 0 and ((f - 1) // c + 1) % p_t == 0
            ]
            raise ConfigError(
                f"CogVideoX 1.5 (transformer patch_size_t={p_t}) needs a multiple of {p_t} latent frames; "
                f"{frames} frames give {latent_frames}: set method.num_frames to one of {ok[:4]}"
            )

    def latents_from_moments(self, mean, std, generator=None) -> torch.Tensor:
        eps = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(mean.device)
        return (mean.float() + std.float() * eps) * self.vae.config.scaling_factor

    def encode_media(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.latents_from_moments(*self.latent_moments(pixels), generator)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents [B,C,T,h,w] -> videos [B,T',3,H,W] in [0,1]."""
        x = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample.float()
        return x.permute(0, 2, 1, 3, 4).add(1).div(2).clamp(0, 1)

    def extra_conditioning(self, meta: dict[str, Any], resolution: int) -> dict[str, torch.Tensor]:
        return {}

    def add_noise(self, x0, noise, t):
        return ddpm_add_noise(self.scheduler, x0, noise, t)

    def target(self, x0, noise, t):
        return ddpm_target(self.scheduler, x0, noise, t)

    def predict(self, denoiser, xt, t, cond):
        """The transformer takes [B,T,C,H,W]; rotary embeddings (CogVideoX-5b, 1.5) come from the pipeline."""
        dtype = next(p.dtype for p in denoiser.parameters())
        b, _, frames, h, w = xt.shape
        rotary = None
        if self.pipeline.transformer.config.use_rotary_positional_embeddings:
            rotary = self.pipeline._prepare_rotary_positional_embeddings(
                h * self.spatial_compression, w * self.spatial_compression, frames, xt.device
            )
        out = denoiser(
            hidden_states=xt.permute(0, 2, 1, 3, 4).to(dtype),
            encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
            timestep=t,
            image_rotary_emb=rotary,
            return_dict=False,
        )[0]
        return out.permute(0, 2, 1, 3, 4)

    def sample_timesteps(self, n, generator, device):
        return uniform_timesteps(self.scheduler, n, generator, device)
