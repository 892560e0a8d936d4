"""FLUX.1 family (FluxPipeline): CLIP-L (pooled embedding only) and T5-XXL (512 tokens), a 16-channel VAE with shift
and scale, and ``FluxTransformer2DModel``, which reads its latents as 2x2 patches packed into a token sequence with
(0, row, column) position ids; FLUX.1 [dev] also takes the distilled guidance scale as an input. Rectified flow.

Training maths (:mod:`mmalign.pipelines.flow`; diffusers 0.42.1 ``train_dreambooth_lora_flux.py``): sigma = u with
u ~ U(0, 1) (the script's default weighting ``none``) or logit-normal; FLUX's scheduler shifts its sampling
schedule by the image's token count (``use_dynamic_shifting``), which the script's training draws do not, so
neither does this adapter unless ``shift`` is set; x_t = (1 - sigma) x0 + sigma noise; the transformer gets
t / 1000 = sigma (diffusers' ``FluxPipeline`` divides by 1000 as well); target = noise - x0; the guidance input is
``guidance`` (3.5, the script's and the pipeline's default) for a guidance-distilled model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mmalign.pipelines.flow import check_sampling, flow_add_noise, flow_timesteps, scheduler_shift
from mmalign.pipelines.sd15 import scale_latents, vae_moments


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B,C,h,w] -> [B, (h/2)(w/2), 4C]: FluxPipeline's 2x2 patch tokens."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents` for latents of height ``h`` and width ``w``."""
    b, _, d = tokens.shape
    x = tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def latent_ids(h: int, w: int, device: Any, dtype: torch.dtype) -> torch.Tensor:
    """[(h/2)(w/2), 3] position ids (0, row, column) of the packed tokens of an h x w latent."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


@dataclass
class FluxAdapter:
    """Adapter for FluxPipeline checkpoints: FLUX.1 [dev] (guidance-distilled) and [schnell].

    ``timestep_sampling``: ``uniform`` (default) or ``logit_normal``; ``shift``: a static timestep shift (None: the
    scheduler's own when it is static, else none); ``guidance``: the distilled guidance input of a model that takes
    one; ``max_text_len``: the T5 prompt length (512).
    """

    pipeline: Any
    family: str = "flux"
    denoiser_name: str = "transformer"
    noise_process: str = "flow"
    micro_conditioning: bool = False
    timestep_sampling: str = "uniform"
    shift: float | None = None
    guidance: float = 3.5
    max_text_len: int = 512

    def __post_init__(self) -> None:
        check_sampling(self.timestep_sampling)
        self.scheduler = self.pipeline.scheduler  # sampling only; training maths are the flow formulas
        self.vae = self.pipeline.vae
        config = self.pipeline.scheduler.config
        if self.shift is None:
            self.shift = 1.0 if config.get("use_dynamic_shifting") else scheduler_shift(config)
        tokenizer = getattr(self.pipeline, "tokenizer_2", None)
        if tokenizer is not None:
            self.max_text_len = min(self.max_text_len, int(tokenizer.model_max_length or self.max_text_len))

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [e for e in (self.pipeline.text_encoder, self.pipeline.text_encoder_2) if e is not None]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, pooled, _ = self.pipeline.encode_prompt(
            list(prompts),
            device=self.pipeline.text_encoder_2.device,
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
        """Latents [B,C,h,w] in, velocity [B,C,h,w] out; packing and position ids as FluxPipeline makes them."""
        dtype = next(p.dtype for p in denoiser.parameters())
        b, _, h, w = xt.shape
        text = cond["encoder_hidden_states"]
        guidance = None
        if denoiser.config.guidance_embeds:
            guidance = torch.full((b,), self.guidance, device=xt.device, dtype=torch.float32)
        out = denoiser(
            hidden_states=pack_latents(xt).to(dtype),
            timestep=t.float() / 1000,
            guidance=guidance,
            pooled_projections=cond["pooled_projections"].to(dtype),
            encoder_hidden_states=text.to(dtype),
            txt_ids=torch.zeros(text.shape[1], 3, device=xt.device, dtype=dtype),
            img_ids=latent_ids(h, w, xt.device, dtype),
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w)

    def sample_timesteps(self, n, generator, device):
        """t = 1000 * shift(u), u ~ U(0, 1) or logit-normal(0, 1); no shift unless ``shift`` is set."""
        return flow_timesteps(n, generator, device, shift=self.shift, sampling=self.timestep_sampling)
