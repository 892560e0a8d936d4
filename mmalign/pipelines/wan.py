"""Wan 2.1 family (WanPipeline): UMT5 text encoder, AutoencoderKLWan (8x spatial, causal 4x temporal,
per-channel latent normalisation), WanTransformer3DModel, rectified-flow matching.

Training maths (DESIGN §2; finetrainers' Wan specification and diffusers 0.42.1 ``WanPipeline``):
sigma = shift * u / (1 + (shift - 1) * u) with u ~ U(0, 1) (or logit-normal), the ``shift`` read from the
pipeline scheduler (UniPC ``flow_shift``, FlowMatchEuler ``shift``); x_t = (1 - sigma) x0 + sigma noise;
the transformer gets timestep t = 1000 sigma; target = noise - x0. In this adapter ``t`` is that
timestep (float, in [0, 1000]) everywhere: ``add_noise``, ``target`` and ``predict`` divide by 1000.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from mmalign.config import ConfigError
from mmalign.pipelines.flow import (
    NUM_TRAIN_TIMESTEPS,
    check_sampling,
    flow_add_noise,
    flow_timesteps,
    scheduler_shift,
)

EXPERTS = {"high_noise": "transformer", "low_noise": "transformer_2"}  # Wan 2.2 A14B: which expert is which


def other_expert(options: dict[str, Any]) -> list[str]:
    """The pipeline component a run of one Wan 2.2 expert does not load (``model.adapter_options.expert``).

    A14B's experts are 14B transformers each (57 GB in fp32 on the host while loading); a run trains one.
    """
    expert = options.get("expert")
    return [name for key, name in EXPERTS.items() if expert in EXPERTS and key != expert]


def wan_fps(index: dict[str, Any]) -> float | None:
    """Wan 2.2 TI2V-5B (the pipeline with per-token timesteps, ``expand_timesteps``) makes 24 fps clips; Wan 2.1
    and 2.2 A14B make 16 (the family's default)."""
    return 24.0 if index.get("expand_timesteps") else None


@dataclass
class WanAdapter:
    """Adapter for WanPipeline text-to-video checkpoints: Wan 2.1 T2V 1.3B/14B and Wan 2.2 T2V.

    Wan 2.2 TI2V-5B (48-channel VAE, 16x spatial) needs nothing more: its pipeline gives every latent token the same
    timestep in text-to-video (``expand_timesteps``), which the transformer takes as one per clip (tested equal).
    Wan 2.2 A14B has two experts: ``transformer`` denoises t >= ``boundary_ratio`` x 1000 (875: high noise, layout
    and motion) and ``transformer_2`` below it. A run trains one of them on its own timesteps
    (``expert: high_noise | low_noise``), as the pipeline would use it.
    """

    pipeline: Any
    family: str = "wan"
    denoiser_name: str = "transformer"
    noise_process: str = "flow"
    micro_conditioning: bool = False
    causal: bool = True
    timestep_sampling: str = "uniform"  # or "logit_normal" (the DenseDPO paper's rectified-flow training)
    max_text_len: int = 512
    expert: str | None = None  # Wan 2.2 A14B: "high_noise" (transformer) or "low_noise" (transformer_2)

    def __post_init__(self) -> None:
        check_sampling(self.timestep_sampling)
        if self.expert is not None and self.expert not in EXPERTS:
            raise ConfigError(f"model.adapter_options.expert={self.expert!r}: use one of {sorted(EXPERTS)}")
        ratio = getattr(self.pipeline.config, "boundary_ratio", None)
        self.boundary = (
            None if ratio is None else float(ratio) * NUM_TRAIN_TIMESTEPS
        )  # two experts split here
        self.t_range = (0.0, NUM_TRAIN_TIMESTEPS)
        if self.expert is not None and self.boundary is not None:
            self.denoiser_name = EXPERTS[self.expert]
            low = self.expert == "low_noise"
            self.t_range = (0.0, self.boundary) if low else (self.boundary, NUM_TRAIN_TIMESTEPS)
        self.shift = scheduler_shift(self.pipeline.scheduler.config)
        self.scheduler = self.pipeline.scheduler  # sampling only; training maths are the flow formulas below
        self.vae = self.pipeline.vae
        self.temporal_compression = self.temporal_compression_of(self.vae.config)
        tok_max = getattr(self.pipeline.tokenizer, "model_max_length", self.max_text_len) or self.max_text_len
        self.max_text_len = min(self.max_text_len, int(tok_max))
        z = self.vae.config.z_dim
        self.latents_mean = torch.tensor(self.vae.config.latents_mean, dtype=torch.float32).view(
            1, z, 1, 1, 1
        )
        self.latents_std = torch.tensor(self.vae.config.latents_std, dtype=torch.float32).view(1, z, 1, 1, 1)

    @staticmethod
    def temporal_compression_of(vae_config: Mapping[str, Any]) -> int:
        """Pixel frames per latent frame of an AutoencoderKLWan config (4: one per ``temperal_downsample`` step)."""
        return 2 ** sum(bool(d) for d in vae_config["temperal_downsample"])

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
        """Pixels [B,T,3,H,W] in [-1,1] (T = 4k+1) -> posterior mean and std [B,z,k+1,H/8,W/8] (unnormalised)."""
        dist = self.vae.encode(pixels.permute(0, 2, 1, 3, 4).to(self.vae.device, self.vae.dtype)).latent_dist
        return dist.mean, dist.std

    def latents_from_moments(self, mean, std, generator=None) -> torch.Tensor:
        eps = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(mean.device)
        z = mean.float() + std.float() * eps
        return (z - self.latents_mean.to(z.device)) / self.latents_std.to(z.device)

    def encode_media(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.latents_from_moments(*self.latent_moments(pixels), generator)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B,z,T,h,w] -> videos [B,T',3,H,W] in [0,1]."""
        z = latents.float() * self.latents_std.to(latents.device) + self.latents_mean.to(latents.device)
        x = self.vae.decode(z.to(self.vae.dtype)).sample.float()
        return x.permute(0, 2, 1, 3, 4).add(1).div(2).clamp(0, 1)

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
            return_dict=False,
        )[0]

    @staticmethod
    def check_config(index: Mapping[str, Any], cfg: Any) -> None:
        """Refuse a run this pipeline cannot do as configured, from its ``model_index.json`` (``index``) and the
        run config alone: config loading (``mmalign validate``, before a job is queued) calls it when the index is
        on disk, the loop once the pipeline is loaded."""
        expert = cfg.model.adapter_options.get("expert")
        ratio = index.get("boundary_ratio")
        if ratio is None:
            if expert is not None:
                raise ConfigError(
                    f"model.adapter_options.expert={expert} is for a two-expert Wan 2.2 A14B pipeline; "
                    f"{cfg.model.pretrained} has one transformer: remove the option"
                )
            return
        if expert is None:
            raise ConfigError(
                f"{cfg.model.pretrained} is a two-expert Wan 2.2 pipeline (transformer for t >= "
                f"{float(ratio) * NUM_TRAIN_TIMESTEPS:g}, transformer_2 below): train one per run with "
                "model.adapter_options.expert=high_noise or low_noise"
            )

    def sample_timesteps(self, n, generator, device):
        """t = 1000 * shift(u), u ~ U(0,1) or logit-normal(0,1); a Wan 2.2 expert's conditioned on its range."""
        return flow_timesteps(
            n, generator, device, shift=self.shift, sampling=self.timestep_sampling, t_range=self.t_range
        )
