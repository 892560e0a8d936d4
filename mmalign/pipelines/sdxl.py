"""Stable Diffusion XL family: two text encoders (penultimate hidden states concatenated, pooled
embedding of encoder 2) and micro-conditioning ``add_time_ids`` = (original size, crop top-left, target size)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mmalign.pipelines.base import ddpm_add_noise, ddpm_target, training_scheduler, uniform_timesteps
from mmalign.pipelines.sd15 import clip_hidden_states, scale_latents, user_conditioning, vae_moments


def sdxl_time_ids(original_sizes, crops_top_left, target_size) -> torch.Tensor:
    """[B,6] time ids, one row (orig_h, orig_w, crop_top, crop_left, target_h, target_w) per image.

    diffusers' SDXL DPO script records each image's real size and crop; Salesforce uses a constant
    (res, res, 0, 0, res, res). Both are this function with different inputs. ``target_size`` is one
    (height, width) for the batch or one per image (aspect-ratio buckets).
    """
    targets = [target_size] * len(original_sizes) if isinstance(target_size[0], int) else target_size
    rows = [
        [*map(float, o), *map(float, c), *map(float, t)]
        for o, c, t in zip(original_sizes, crops_top_left, targets)
    ]
    return torch.tensor(rows, dtype=torch.float32)


@dataclass
class SDXLAdapter:
    """Adapter for StableDiffusionXLPipeline checkpoints."""

    pipeline: Any
    family: str = "sdxl"
    denoiser_name: str = "unet"
    noise_process: str = "ddpm"
    micro_conditioning: bool = True  # add_time_ids carry each image's original size and crop

    def __post_init__(self) -> None:
        p = self.pipeline
        self.scheduler = training_scheduler(p.scheduler.config)
        self.vae = p.vae
        self.encoders = [
            (t, e)
            for t, e in ((p.tokenizer, p.text_encoder), (p.tokenizer_2, p.text_encoder_2))
            if e is not None
        ]

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [encoder for _, encoder in self.encoders]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        hiddens, pooled = [], None
        for tokenizer, encoder in self.encoders:
            hidden, out = clip_hidden_states(tokenizer, encoder, list(prompts), layer=-2)
            hiddens.append(hidden)
            pooled = out[0]  # text_embeds of the projection encoder (the last one)
        return {"encoder_hidden_states": torch.cat(hiddens, dim=-1), "text_embeds": pooled}

    @torch.no_grad()
    def latent_moments(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return vae_moments(self.vae, pixels)

    def latents_from_moments(self, mean, std, generator=None) -> torch.Tensor:
        return scale_latents(self.vae, mean, std, generator)

    def encode_media(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.latents_from_moments(*self.latent_moments(pixels), generator)

    def extra_conditioning(self, meta: dict[str, Any], resolution: int) -> dict[str, torch.Tensor]:
        n = len(meta["original_size"])
        target = meta.get("target_size") or (resolution, resolution)  # per item with aspect-ratio buckets
        return {"time_ids": sdxl_time_ids(meta["original_size"], meta["crop_top_left"], target)[:n]}

    def add_noise(self, x0, noise, t):
        return ddpm_add_noise(self.scheduler, x0, noise, t)

    def target(self, x0, noise, t):
        return ddpm_target(self.scheduler, x0, noise, t)

    def predict(self, denoiser, xt, t, cond):
        dtype = next(p.dtype for p in denoiser.parameters())
        added = {
            "text_embeds": cond["text_embeds"].to(dtype),
            "time_ids": cond["time_ids"].to(xt.device, dtype),
            **user_conditioning(cond, dtype),
        }
        return denoiser(
            xt.to(dtype),
            t,
            encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
            added_cond_kwargs=added,
        ).sample

    def sample_timesteps(self, n, generator, device):
        return uniform_timesteps(self.scheduler, n, generator, device)
