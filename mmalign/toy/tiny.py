"""Tiny, randomly initialised pipelines of the real SD1.5 / SDXL / SD3 / FLUX classes, saved in diffusers format.

Tests and benchmarks build these in code and load them back with ``from_pretrained``, the same path a
user's hub checkpoint takes. Sizes follow the spirit of diffusers' ``get_dummy_components``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmalign.toy.render import TOY_WORDS
from mmalign.toy.tokenizer import build_word_tokenizer

TINY_WORDS = [
    "a",
    "an",
    "photo",
    "of",
    "red",
    "green",
    "blue",
    "yellow",
    "circle",
    "square",
    "triangle",
    "cat",
    "dog",
]


def _text_encoder(hidden: int, proj: int | None, vocab_size: int, seed: int, max_len: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=max_len,
        projection_dim=proj or hidden,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        hidden_act="gelu",
    )
    return (CLIPTextModelWithProjection if proj else CLIPTextModel)(config).eval()


def _t5_encoder(tokenizer: Any, umt5: bool = False):
    """A 1-layer T5 (UMT5 for Wan) encoder of width 32 over ``tokenizer``'s words, as diffusers' dummy components;
    initialised from the current torch seed, in eval mode."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_cls, model_cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = config_cls(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=1,
        num_heads=4,
        pad_token_id=tokenizer.pad_token_id,
        decoder_start_token_id=0,
    )
    return model_cls(config).eval()


def _vae(seed: int, latent_channels: int = 4, channels: tuple[int, ...] = (16, 32), **config: Any):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=32,
        **config,
    )


def build_tiny_sd15(
    out_dir: str | Path, *, seed: int = 0, prediction_type: str = "epsilon", sample_size: int = 8
):
    """A StableDiffusionPipeline with a 2-layer CLIP text encoder, 2-level VAE (x2 down) and a tiny UNet.

    Returns the pipeline after saving it to ``out_dir``.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    out_dir = Path(out_dir)
    tokenizer = build_word_tokenizer(TINY_WORDS, out_dir / "_tok")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        prediction_type=prediction_type,
        steps_offset=1,
    )
    text_encoder = _text_encoder(16, None, len(tokenizer), seed + 1, tokenizer.model_max_length)
    pipe = StableDiffusionPipeline(
        unet=unet,
        scheduler=scheduler,
        vae=_vae(seed + 2),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return pipe


def build_tiny_sdxl(
    out_dir: str | Path, *, seed: int = 0, prediction_type: str = "epsilon", sample_size: int = 8
):
    """A StableDiffusionXLPipeline: two text encoders (the second with projection), text_time conditioning."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    out_dir = Path(out_dir)
    tokenizer = build_word_tokenizer(TINY_WORDS, out_dir / "_tok")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 16,
        cross_attention_dim=32,
        norm_num_groups=8,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
        prediction_type=prediction_type,
    )
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        scheduler=scheduler,
        vae=_vae(seed + 2),
        text_encoder=_text_encoder(16, None, len(tokenizer), seed + 1, tokenizer.model_max_length),
        text_encoder_2=_text_encoder(16, 16, len(tokenizer), seed + 3, tokenizer.model_max_length),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return pipe


def build_tiny_sd3(out_dir: str | Path, *, seed: int = 0, shift: float = 3.0, sample_size: int = 8):
    """A StableDiffusion3Pipeline: two CLIP encoders with projection (width 8), a 1-layer T5 (width 32 = the
    transformer's joint attention width), a VAE with SD3's shift and scale factors, a 1-layer MMDiT and
    FlowMatchEuler at SD3's shift 3, as diffusers' own SD3 dummy components but with no hub download."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    out_dir = Path(out_dir)
    tokenizer = build_word_tokenizer(TINY_WORDS, out_dir / "_tok")
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=16,  # the two CLIP projections, concatenated
        pos_embed_max_size=16,
    )
    torch.manual_seed(seed + 4)
    t5 = _t5_encoder(tokenizer)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        vae=_vae(seed + 2, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=_text_encoder(8, 8, len(tokenizer), seed + 1, tokenizer.model_max_length),
        text_encoder_2=_text_encoder(8, 8, len(tokenizer), seed + 3, tokenizer.model_max_length),
        text_encoder_3=t5,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        tokenizer_3=tokenizer,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return pipe


def build_tiny_flux(out_dir: str | Path, *, seed: int = 0, guidance_embeds: bool = True):
    """A FluxPipeline as FLUX.1 [dev] is shaped: CLIP (pooled, width 32) and a 1-layer T5 (width 32), a VAE with
    FLUX's shift and scale factors (4 latent channels, packed 2x2 into 16), one double- and one single-stream
    block, the distilled guidance input (``guidance_embeds=False``: [schnell]) and FlowMatchEuler shifting by
    image size, as diffusers' own Flux dummy components but with no hub download."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    out_dir = Path(out_dir)
    tokenizer = build_word_tokenizer(TINY_WORDS, out_dir / "_tok")
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8),
    )
    torch.manual_seed(seed + 4)
    t5 = _t5_encoder(tokenizer)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=_vae(seed + 2, shift_factor=0.1159, scaling_factor=0.3611),
        text_encoder=_text_encoder(32, None, len(tokenizer), seed + 1, tokenizer.model_max_length),
        text_encoder_2=t5,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return pipe


# --------------------------------------------------------------------------------------------------
# video families


def make_toy_video_pipeline(
    *,
    vae: Any = None,
    text_encoder: Any = None,
    tokenizer: Any = None,
    unet: Any = None,
    seed: int = 0,
    prediction_type: str = "epsilon",
    tokenizer_dir: str | Path | None = None,
    motion_heads: int = 4,
) -> Any:
    """An AnimateDiffPipeline with random motion modules; pass the toy image model's parts to start from them.

    Missing parts are built tiny: a 2-level AutoencoderKL (x2 down), a 2-layer CLIPTextModel over the toy
    vocabulary (tokenizer written to ``tokenizer_dir``), a 2-level UNet2DConditionModel (16, 32).
    """
    from diffusers import AnimateDiffPipeline, DDIMScheduler, MotionAdapter, UNet2DConditionModel

    if tokenizer is None or text_encoder is None:
        if tokenizer_dir is None:
            raise ValueError(
                "pass tokenizer_dir (where the toy tokenizer files are written) or a tokenizer and text encoder"
            )
        tokenizer = build_word_tokenizer(TOY_WORDS, tokenizer_dir)
        text_encoder = _text_encoder(16, None, len(tokenizer), seed + 1, tokenizer.model_max_length)
    if vae is None:
        vae = _vae(seed + 2)
    if unet is None:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=vae.config.latent_channels,
            out_channels=vae.config.latent_channels,
            layers_per_block=1,
            block_out_channels=(16, 32),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=text_encoder.config.hidden_size,
            attention_head_dim=8,
            norm_num_groups=8,
        )
    torch.manual_seed(seed + 3)
    motion = MotionAdapter(
        block_out_channels=tuple(unet.config.block_out_channels),
        motion_layers_per_block=unet.config.layers_per_block,
        motion_norm_num_groups=8,
        motion_num_attention_heads=motion_heads,
        motion_max_seq_length=32,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        prediction_type=prediction_type,
        steps_offset=1,
    )
    return AnimateDiffPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        motion_adapter=motion,
        scheduler=scheduler,
    )


def build_tiny_toy_video(out_dir: str | Path, *, seed: int = 0, prediction_type: str = "epsilon") -> Any:
    """A tiny random toy video pipeline saved in diffusers format (for tests). Returns the pipeline."""
    out_dir = Path(out_dir)
    pipe = make_toy_video_pipeline(seed=seed, prediction_type=prediction_type, tokenizer_dir=out_dir / "_tok")
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return pipe


def build_tiny_cogvideox(out_dir: str | Path, *, seed: int = 0) -> Any:
    """A tiny random CogVideoXPipeline (diffusers' dummy-component sizes) saved in diffusers format.

    The tokenizer is the word-level toy tokenizer (no hub download); the T5 encoder is 1 layer, width 32.
    """
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )

    out_dir = Path(out_dir)
    tokenizer = build_word_tokenizer(TOY_WORDS, out_dir / "_tok", model_max_length=16)
    torch.manual_seed(seed)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=4,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        time_embed_dim=2,
        text_embed_dim=32,
        num_layers=1,
        sample_width=2,
        sample_height=2,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=16,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    torch.manual_seed(seed + 2)
    text_encoder = _t5_encoder(tokenizer)
    scheduler = CogVideoXDDIMScheduler(
        prediction_type="v_prediction",
        snr_shift_scale=3.0,
        beta_schedule="scaled_linear",
        clip_sample=False,
        timestep_spacing="trailing",
        rescale_betas_zero_snr=True,
    )
    pipe = CogVideoXPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder.eval(),
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return pipe


WAN_VARIANTS = ("2.1", "2.2-a14b", "2.2-ti2v-5b")


def build_tiny_wan(out_dir: str | Path, *, seed: int = 0, shift: float = 7.0, variant: str = "2.1") -> Any:
    """A tiny random WanPipeline (diffusers' dummy-component sizes) saved in diffusers format.

    The tokenizer is the word-level toy tokenizer (no hub download); the UMT5 encoder is 1 layer, width 32.
    ``variant``: ``2.1``; ``2.2-a14b`` (two experts, ``transformer_2`` below ``boundary_ratio`` 0.875);
    ``2.2-ti2v-5b`` (48-channel VAE with 16x spatial compression, per-token timesteps), as diffusers' Wan 2.2
    pipeline tests build them.
    """
    if variant not in WAN_VARIANTS:
        raise ValueError(f"variant={variant!r}: choose from {WAN_VARIANTS}")
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )

    out_dir = Path(out_dir)
    tokenizer = build_word_tokenizer(TOY_WORDS, out_dir / "_tok", model_max_length=16)
    torch.manual_seed(seed)
    five_b = variant == "2.2-ti2v-5b"
    z = 48 if five_b else 16
    vae_5b = dict(in_channels=12, out_channels=12, is_residual=True, patch_size=2, scale_factor_spatial=16)
    vae = AutoencoderKLWan(
        base_dim=3,
        z_dim=z,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        **(dict(vae_5b, latents_mean=[0.0] * z, latents_std=[1.0] * z) if five_b else {}),
    )

    def transformer():
        return WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=12,
            in_channels=z,
            out_channels=z,
            text_dim=32,
            freq_dim=256,
            ffn_dim=32,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
        )

    torch.manual_seed(seed + 1)
    experts = {"transformer": transformer()}
    if variant == "2.2-a14b":
        torch.manual_seed(seed + 3)
        experts.update(transformer_2=transformer(), boundary_ratio=0.875)
    torch.manual_seed(seed + 2)
    text_encoder = _t5_encoder(tokenizer, umt5=True)
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder.eval(),
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        expand_timesteps=five_b,
        **experts,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return pipe
