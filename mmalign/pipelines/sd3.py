"""Stable Diffusion 3 / 3.5 family (StableDiffusion3Pipeline): CLIP-L and CLIP-G (penultimate hidden states
concatenated and zero-padded to T5's width, pooled embeddings concatenated), T5-XXL (256 tokens; optional), a
16-channel VAE with shift and scale, and the MMDiT ``SD3Transformer2DModel``, trained as a rectified flow.

Training maths (:mod:`mmalign.pipelines.flow`; SD3 paper §2-3, diffusers 0.42.1 ``train_dreambooth_lora_sd3.py``):
sigma = shift(u), the shift read from the pipeline's FlowMatchEuler scheduler (3.0 for SD3 and SD3.5),
u ~ logit-normal(0, 1) (the paper's rf/lognorm(0.00, 1.00) and the diffusers script's default) or uniform;
x_t = (1 - sigma) x0 + sigma noise; the transformer gets timestep t = 1000 sigma; target = noise - x0. Text
conditioning is the pipeline's own ``encode_prompt``, so training sees what sampling sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mmalign.config import ConfigError
from mmalign.pipelines.flow import check_sampling, flow_add_noise, flow_timesteps, scheduler_shift
from mmalign.pipelines.sd15 import scale_latents, vae_moments


@dataclass
class SD3Adapter:
    """Adapter for StableDiffusion3Pipeline checkpoints: SD3 Medium, SD3.5 Medium / Large / Large Turbo.

    ``timestep_sampling``: ``logit_normal`` (default) or ``uniform``. ``max_text_len``: the T5 prompt length
    (256, the pipeline's default); ``generate``, ``eval`` and validation sample at the same length.
    """

    pipeline: Any
    family: str = "sd3"
    denoiser_name: str = "transformer"
    noise_process: str = "flow"
    micro_conditioning: bool = False
    timestep_sampling: str = "logit_normal"
    max_text_len: int = 256

    def __post_init__(self) -> None:
        check_sampling(self.timestep_sampling)
        self.scheduler = self.pipeline.scheduler  # sampling only; training maths are the flow formulas
        self.vae = self.pipeline.vae
        self.shift = scheduler_shift(self.pipeline.scheduler.config)
        tokenizer = getattr(self.pipeline, "tokenizer_3", None)
        if tokenizer is not None:
            self.max_text_len = min(self.max_text_len, int(tokenizer.model_max_length or self.max_text_len))

    def check_resolution(self, resolution: int) -> None:
        """The MMDiT's position embeddings cover ``pos_embed_max_size`` patches a side: a larger training
        resolution is a ConfigError before any step (a ValueError inside the first forward before)."""
        config = self.pipeline.transformer.config
        most = getattr(config, "pos_embed_max_size", None)
        if most is None:
            return
        scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        largest = int(most) * int(config.patch_size) * scale
        if resolution > largest:
            raise ConfigError(
                f"model.resolution={resolution}: {self.pipeline.transformer.__class__.__name__} takes at most "
                f"{largest} px a side (pos_embed_max_size {most} x patch {config.patch_size} x VAE {scale})"
            )

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        p = self.pipeline
        return [
            e for e in (p.text_encoder, p.text_encoder_2, getattr(p, "text_encoder_3", None)) if e is not None
        ]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        prompts = list(prompts)
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompts,
            prompts,
            prompts,
            device=self.pipeline.text_encoder.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_text_len,
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    @torch.no_grad()
    def latent_moments(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return vae_moments(self.vae, pixels)

    def latents_from_moments(self, mean, std, generator=None) -> torch.Tensor:
        return scale_latents(self.vae, mean, std, generator)  # (z - shift_factor) * scaling_factor

    def encode_media(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.latents_from_moments(*self.latent_moments(pixels), generator)

    def extra_conditioning(self, meta: dict[str, Any], resolution: int) -> dict[str, torch.Tensor]:
        return {}

    def add_noise(self, x0, noise, t):
        return flow_add_noise(x0, noise, t)

    def target(self, x0, noise, t):
        return noise - x0

    def predict(self, denoiser, xt, t, cond):
        dtype = next(p.dtype for p in denoiser.parameters())
        return denoiser(
            hidden_states=xt.to(dtype),
            timestep=t,
            encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
            pooled_projections=cond["pooled_projections"].to(dtype),
            return_dict=False,
        )[0]

    def sample_timesteps(self, n, generator, device):
        """t = 1000 * shift(u), u ~ logit-normal(0, 1) or U(0, 1)."""
        return flow_timesteps(n, generator, device, shift=self.shift, sampling=self.timestep_sampling)
