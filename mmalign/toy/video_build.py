"""Pretrain the toy video model: the toy image pipeline's parts plus AnimateDiff motion modules (DESIGN §5).

The toy image pipeline (``mmalign/toy/assets/toy-sd``: VAE, CLIP text encoder, UNet2DConditionModel) is
turned into a diffusers ``AnimateDiffPipeline`` (:func:`mmalign.toy.tiny.make_toy_video_pipeline`) and its
UNet (motion modules and, by default, the spatial layers; ``train_spatial=False`` trains the motion modules
only) is trained (DDPM epsilon, EMA) on rendered clips of a moving shape of which a fraction flicker in one
random segment (:func:`mmalign.toy.render.render_video`). The base video model therefore flickers sometimes,
which is what DenseDPO is benchmarked on (``bench/efficacy_dense_dpo.py``).

Two settings make it coherent from pure noise (BENCHMARKS.md, "A toy video base that is coherent from noise"):
the epsilon loss is weighted by min(1/SNR(t), ``x0_weight_cap``), an error in x0's units, because at t >= 900,
where a sample's layout forms, an epsilon error barely moves the x0 estimate and so barely teaches the frames to
agree; and the spatial layers train with the motion modules. The text encoder and VAE stay the image model's.
Weights are rounded to fp16 and the UNet and VAE stored in fp16 (the pipeline loads them as fp32; the returned
pipeline holds the same values). Saved with ``save_pretrained`` (safetensors) without the separate
``motion_adapter`` (its weights live inside the saved ``UNetMotionModel``), and loaded back with
``AnimateDiffPipeline.from_pretrained`` or :func:`mmalign.pipelines.load_pipeline`.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mmalign.pipelines.toy_video import frame_noise
from mmalign.toy import DEFAULT_TOY_MODEL, DEFAULT_VIDEO_ASSET_DIR
from mmalign.toy.build import _ema_update, _lr_factor


@dataclass
class ToyVideoBuildConfig:
    """Everything that determines the built weights (saved beside them as ``toy_video_build.json``)."""

    seed: int = 0
    frames: int = 8
    size: int = 32
    segments: int = 4
    num_clips: int = 2048
    p_flicker: float = 0.5
    flicker_amount: float = 0.35
    p_size: float = 0.3
    p_position: float = 0.0
    steps: int = 1200
    batch: int = 8
    lr: float = 1e-3
    caption_dropout: float = 0.1
    ema_decay: float = 0.995
    motion_heads: int = 4
    threads: int = 1
    high_t_fraction: float = 0.0  # this share of each batch draws t from [high_t_min, T): where layout forms
    high_t_min: int = 800
    noise_correlation: float = 0.0  # frames' noises share this variance fraction (a mixed video noise prior)
    train_spatial: bool = True  # also train the image UNet's layers (False: only the motion modules)
    x0_weight_cap: float = 5.0  # > 0: weight each clip's eps loss by min(1/SNR(t), cap), an x0-space loss

    def __post_init__(self) -> None:
        # checked before the clips are rendered, so a bad value costs no build time
        if not 0.0 <= self.noise_correlation < 1.0:
            raise ValueError(f"noise_correlation={self.noise_correlation} must be in [0, 1)")
        if self.x0_weight_cap < 0:
            raise ValueError(f"x0_weight_cap={self.x0_weight_cap} must be >= 0 (0: plain epsilon loss)")


def render_clips(cfg: ToyVideoBuildConfig) -> tuple[torch.Tensor, list[str], list[int | None]]:
    """The training clips [N,T,3,H,W] in [0,1], their captions and flicker segments (None = clean)."""
    from mmalign.toy.render import render_video, sample_spec

    rng = random.Random(cfg.seed + 101)
    clips, captions, flicker = [], [], []
    for i in range(cfg.num_clips):
        s = cfg.seed * 1_000_003 + i
        spec = sample_spec(s, p_size=cfg.p_size, p_position=cfg.p_position)
        seg = rng.randrange(cfg.segments) if rng.random() < cfg.p_flicker else None
        clips.append(
            render_video(
                spec,
                seed=s,
                frames=cfg.frames,
                size=cfg.size,
                flicker_segment=seg,
                segments=cfg.segments,
                flicker_amount=cfg.flicker_amount,
            )
        )
        captions.append(spec.caption())
        flicker.append(seg)
    return torch.stack(clips), captions, flicker


@torch.no_grad()
def encode_clips(adapter: Any, clips: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Scaled posterior means [N,C,T,h,w] of clips [N,T,3,H,W] in [0,1] (per-frame VAE)."""
    out = []
    for i in range(0, len(clips), batch):
        mean, _ = adapter.latent_moments(clips[i : i + batch] * 2 - 1)
        out.append(mean * adapter.vae.config.scaling_factor)
    return torch.cat(out)


def train_video_unet(
    adapter: Any,
    latents: torch.Tensor,
    captions: Sequence[str],
    cfg: ToyVideoBuildConfig,
    log: Callable[[str], None],
) -> float:
    """DDPM epsilon training of the motion modules (and the spatial layers with ``cfg.train_spatial``); loads
    their EMA at the end. Returns the last running loss.

    Args:
        adapter: a :class:`~mmalign.pipelines.toy_video.ToyVideoAdapter` of the pipeline being built.
        latents: [N,C,T,h,w] scaled clean latents.
        captions: N captions.
        cfg: the build config.
        log: progress printer.
    """
    unet = adapter.pipeline.unet
    unet.freeze_unet2d_params()  # everything but the motion modules
    if cfg.train_spatial:
        unet.requires_grad_(True)
    params = [p for p in unet.parameters() if p.requires_grad]
    uniq = sorted(set(captions))
    text = adapter.encode_prompts([*uniq, ""])["encoder_hidden_states"]  # [U+1,L,D], frozen encoder
    index = torch.tensor([uniq.index(c) for c in captions])
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: _lr_factor(s, cfg.steps, warmup=min(100, cfg.steps // 10 + 1))
    )
    g = torch.Generator().manual_seed(cfg.seed + 17)
    alphas = adapter.scheduler.alphas_cumprod
    n_t = adapter.scheduler.config.num_train_timesteps
    unet.train()
    running, t0 = 0.0, time.time()
    for step in range(cfg.steps):
        idx = torch.randint(0, len(latents), (cfg.batch,), generator=g)
        x0 = latents[idx]
        rows = index[idx].clone()
        rows[torch.rand(cfg.batch, generator=g) < cfg.caption_dropout] = len(uniq)
        noise = frame_noise(x0.shape, cfg.noise_correlation, generator=g)
        t = torch.randint(0, n_t, (cfg.batch,), generator=g)
        if cfg.high_t_fraction > 0:  # extra draws only here, so a default build is unchanged
            high = torch.rand(cfg.batch, generator=g) < cfg.high_t_fraction
            t = torch.where(high, torch.randint(cfg.high_t_min, n_t, (cfg.batch,), generator=g), t)
        a = alphas[t].view(-1, 1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = adapter.predict(unet, xt, t, {"encoder_hidden_states": text[rows]})
        if cfg.x0_weight_cap > 0:  # eps errors at high t barely move x0's estimate; weigh them as x0 errors
            w = ((1 - a) / a).clamp(max=cfg.x0_weight_cap).flatten()
            loss = (w * (pred.float() - noise).pow(2).flatten(1).mean(1)).sum() / w.sum()
        else:
            loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        _ema_update(ema, params, min(cfg.ema_decay, (1 + step) / (10 + step)))
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if step % 100 == 0 or step == cfg.steps - 1:
            log(f"motion step {step}/{cfg.steps} loss {running:.4f} ({time.time() - t0:.0f}s)")
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    unet.requires_grad_(False)
    unet.eval()
    return running


def toy_video_build(
    out_dir: str | Path = DEFAULT_VIDEO_ASSET_DIR,
    *,
    base: str | Path = DEFAULT_TOY_MODEL,
    log: Callable[[str], None] = print,
    **overrides: Any,
) -> Any:
    """Build the toy video pipeline from the toy image pipeline at ``base`` and save it to ``out_dir``.

    Args:
        out_dir: destination (diffusers format, safetensors); ``mmalign/toy/assets/toy-video`` by default.
        base: a toy StableDiffusionPipeline directory whose VAE, text encoder and UNet are reused.
        log: progress printer.
        **overrides: fields of :class:`ToyVideoBuildConfig` (e.g. ``steps=2`` for a smoke build).

    Returns:
        The built ``AnimateDiffPipeline`` (eval mode, fp32, CPU).
    """
    from diffusers import AnimateDiffPipeline, StableDiffusionPipeline

    from mmalign.pipelines.toy_video import ToyVideoAdapter
    from mmalign.toy.tiny import make_toy_video_pipeline

    cfg = ToyVideoBuildConfig(**overrides)
    out_dir = Path(out_dir)
    torch.set_num_threads(cfg.threads)
    start = time.time()
    log(f"toy video build {base} -> {out_dir} with {asdict(cfg)}")
    image_pipe = StableDiffusionPipeline.from_pretrained(base)
    pipe = make_toy_video_pipeline(
        vae=image_pipe.vae,
        text_encoder=image_pipe.text_encoder,
        tokenizer=image_pipe.tokenizer,
        unet=image_pipe.unet,
        seed=cfg.seed,
        motion_heads=cfg.motion_heads,
    )
    # the image model's sampler
    pipe.scheduler = type(pipe.scheduler).from_config(image_pipe.scheduler.config)
    adapter = ToyVideoAdapter(pipe)
    clips, captions, flicker = render_clips(cfg)
    latents = encode_clips(adapter, clips)
    log(
        f"rendered and encoded {len(clips)} clips, {sum(s is not None for s in flicker)} with flicker "
        f"({time.time() - start:.0f}s)"
    )
    loss = train_video_unet(adapter, latents, captions, cfg, log)
    pipe = AnimateDiffPipeline(
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        unet=pipe.unet,
        motion_adapter=None,
        scheduler=pipe.scheduler,
    )
    # Every weight is rounded to fp16 (half the size on disk). The UNet and VAE are stored in fp16 (diffusers
    # loads them as fp32); the text encoder is stored in fp32 because transformers would load it as fp16.
    pipe.to(torch.float16).to(torch.float32)
    pipe.unet.half()
    pipe.vae.half()
    pipe.save_pretrained(out_dir, safe_serialization=True)
    pipe.to(torch.float32)
    seconds = time.time() - start
    info = {
        "config": asdict(cfg),
        "base": str(base),
        "loss": loss,
        "seconds": round(seconds),
        "torch": torch.__version__,
    }
    (out_dir / "toy_video_build.json").write_text(json.dumps(info, indent=2) + "\n")
    log(f"saved {out_dir} in {seconds:.0f}s")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate_videos(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    frames: int = 8,
    size: int = 32,
    steps: int = 20,
    guidance_scale: float = 1.0,
    batch_size: int = 32,
    noise_correlation: float = 0.0,
) -> torch.Tensor:
    """Sample one clip per (prompt, seed) with an AnimateDiffPipeline; clip i depends only on (prompt i, seed i).

    ``noise_correlation`` > 0 starts each clip from :func:`~mmalign.pipelines.toy_video.frame_noise` drawn from
    its seed (frames sharing that fraction of their noise) instead of the pipeline's i.i.d. frames.

    Returns:
        [N,T,3,H,W] float in [0,1], on CPU.
    """
    from mmalign.toy.sample import generate

    extra: dict[str, Any] = {}
    if noise_correlation > 0:
        shape = (
            1,
            pipe.unet.config.in_channels,
            frames,
            size // pipe.vae_scale_factor,
            size // pipe.vae_scale_factor,
        )
        extra["latents"] = torch.cat(
            [
                frame_noise(shape, noise_correlation, generator=torch.Generator().manual_seed(int(s)))
                for s in seeds
            ]
        )
    return generate(
        pipe,
        prompts,
        seeds,
        guidance_scale=guidance_scale,
        steps=steps,
        batch_size=batch_size,
        size=size,
        num_frames=frames,
        **extra,
    )


def flicker_stats(videos: torch.Tensor, *, segments: int = 4, threshold: float = 0.5) -> dict[str, float]:
    """Flicker rate (clips whose worst segment scores below ``threshold`` under ``toy_flicker``) and the mean score."""
    from mmalign.toy.rewards import flicker

    score = flicker(segments=segments)(videos)
    return {"flicker_rate": (score < threshold).float().mean().item(), "flicker_score": score.mean().item()}


def coherence_stats(videos: torch.Tensor, prompts: Sequence[str], *, jump: float = 0.15) -> dict[str, float]:
    """Is each clip one shape moving steadily? Measured on videos [B,T,3,H,W] in [0,1] for their prompts.

    Returns:
        ``travel``: mean distance the shape's centroid moves from the first to the last frame (fraction of the
        side; rendered clips: 0.15-0.3); ``jump_rate``: fraction of clips whose centroid jumps more than ``jump``
        between two consecutive frames (rendered clips: 0); ``colour_constant``: fraction of clips whose shape has
        one palette colour in every frame (rendered clips: 1); ``color_correct``: mean fraction of frames whose
        colour is the prompt's.
    """
    from mmalign.toy.rewards import color_correct, dominant_color, foreground_weight

    b, t, _, h, w = videos.shape
    frames = videos.float().reshape(b * t, 3, h, w)
    mask = foreground_weight(frames)
    mass = mask.sum(dim=(1, 2)).clamp_min(1e-6)
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
    )
    centre = torch.stack([(mask * xs).sum(dim=(1, 2)) / mass / w, (mask * ys).sum(dim=(1, 2)) / mass / h], -1)
    centre = centre.view(b, t, 2)
    steps = (centre[:, 1:] - centre[:, :-1]).norm(dim=-1).amax(dim=1)
    names = dominant_color(frames)
    constant = [len(set(names[i * t : (i + 1) * t])) == 1 and names[i * t] is not None for i in range(b)]
    return {
        "travel": (centre[:, -1] - centre[:, 0]).norm(dim=-1).mean().item(),
        "jump_rate": (steps > jump).float().mean().item(),
        "colour_constant": sum(constant) / b,
        "color_correct": color_correct()(videos, list(prompts)).mean().item(),
    }


def cmd_toy_build_video(args: Any) -> int:
    """``mmalign toy build-video``: build (and save) the toy video pipeline."""
    overrides: dict[str, Any] = {}
    fields = ToyVideoBuildConfig.__dataclass_fields__
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            print(
                f"mmalign toy build-video: bad --set {item!r}; use KEY=VALUE with KEY one of: {', '.join(fields)}"
            )
            return 2
        kind = type(getattr(ToyVideoBuildConfig(), key))
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                print(f"mmalign toy build-video: --set {item!r}: {key} takes true or false")
                return 2
            overrides[key] = value.lower() in ("true", "1")
        else:
            try:
                overrides[key] = kind(value)
            except ValueError:
                print(f"mmalign toy build-video: --set {item!r}: {key} takes a {kind.__name__}")
                return 2
    overrides.setdefault("seed", args.seed)
    try:
        ToyVideoBuildConfig(**overrides)
    except ValueError as err:
        print(f"mmalign toy build-video: {err}")
        return 2
    toy_video_build(args.out, base=args.base, **overrides)
    print(f"toy video pipeline written to {args.out}")
    return 0
