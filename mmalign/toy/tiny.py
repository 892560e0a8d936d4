"""Tiny, randomly initialised pipelines of the real SD1.5 / SDXL classes, saved in diffusers format.

Tests and benchmarks build these in code and load them back with ``from_pretrained``, the same path a
user's hub checkpoint takes. Sizes follow the spirit of diffusers' ``get_dummy_components``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mmalign.toy.tokenizer import build_word_tokenizer

TINY_WORDS = ["a", "an", "photo", "of", "red", "green", "blue", "yellow", "circle", "square", "triangle", "cat", "dog"]


def _text_encoder(hidden: int, proj: int | None, vocab_size: int, seed: int, max_len: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=max_len, projection_dim=proj or hidden,
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, hidden_act="gelu",
    )
    return (CLIPTextModelWithProjection if proj else CLIPTextModel)(config).eval()


def _vae(seed: int, latent_channels: int = 4, channels: tuple[int, ...] = (16, 32)):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * len(channels), up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels, layers_per_block=1, norm_num_groups=8, sample_size=32,
    )


def build_tiny_sd15(out_dir: str | Path, *, seed: int = 0, prediction_type: str = "epsilon", sample_size: int = 8):
    """A StableDiffusionPipeline with a 2-layer CLIP text encoder, 2-level VAE (x2 down) and a tiny UNet.

    Returns the pipeline after saving it to ``out_dir``.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    out_dir = Path(out_dir)
    tokenizer = build_word_tokenizer(TINY_WORDS, out_dir / "_tok")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, prediction_type=prediction_type, steps_offset=1,
    )
    text_encoder = _text_encoder(16, None, len(tokenizer), seed + 1, tokenizer.model_max_length)
    pipe = StableDiffusionPipeline(
        unet=unet, scheduler=scheduler, vae=_vae(seed + 2), text_encoder=text_encoder, tokenizer=tokenizer,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return pipe


def build_tiny_sdxl(out_dir: str | Path, *, seed: int = 0, prediction_type: str = "epsilon", sample_size: int = 8):
    """A StableDiffusionXLPipeline: two text encoders (the second with projection), text_time conditioning."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    out_dir = Path(out_dir)
    tokenizer = build_word_tokenizer(TINY_WORDS, out_dir / "_tok")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=6 * 8 + 16,
        cross_attention_dim=32, norm_num_groups=8,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading",
        steps_offset=1, prediction_type=prediction_type,
    )
    pipe = StableDiffusionXLPipeline(
        unet=unet, scheduler=scheduler, vae=_vae(seed + 2),
        text_encoder=_text_encoder(16, None, len(tokenizer), seed + 1, tokenizer.model_max_length),
        text_encoder_2=_text_encoder(16, 16, len(tokenizer), seed + 3, tokenizer.model_max_length),
        tokenizer=tokenizer, tokenizer_2=tokenizer, force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return pipe
