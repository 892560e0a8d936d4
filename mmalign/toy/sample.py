"""Sampling the toy pipeline with one seed per image, and measuring it with the toy rewards.

One ``torch.Generator`` per image makes sample ``i`` depend only on ``(prompt_i, seed_i)``, not on the
batch it ran in: two models given the same prompts and seeds start from the same noise, which is what
paired comparisons (``mmalign eval``) need.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mmalign.toy import DEFAULT_TOY_MODEL, QUICKSTART_GUIDANCE, QUICKSTART_STEPS  # noqa: F401 (re-exported)


def load_toy_pipeline(path: str | Path = DEFAULT_TOY_MODEL):
    """``StableDiffusionPipeline.from_pretrained`` of the toy weights, fp32, CPU, progress bar off.

    Raises:
        FileNotFoundError: if ``path`` holds no ``model_index.json`` (build it with ``mmalign toy build``).
    """
    from diffusers import StableDiffusionPipeline

    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"no toy pipeline at {path}: run `mmalign toy build --out {path}`")
    pipe = StableDiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    guidance_scale: float = QUICKSTART_GUIDANCE,
    steps: int = QUICKSTART_STEPS,
    batch_size: int = 64,
    size: int = 32,
    progress: bool | str = False,
    latents: torch.Tensor | None = None,
    **pipe_kwargs: Any,
) -> torch.Tensor:
    """Sample one image (or, with a video pipeline, one clip) per (prompt, seed).

    Args:
        pipe: a StableDiffusionPipeline (any LoRA/adapter already loaded).
        prompts: one prompt per image.
        seeds: one seed per image; image i depends only on (prompts[i], seeds[i]).
        guidance_scale: classifier-free guidance (1.0 = off, one UNet pass per step).
        steps: sampler steps.
        batch_size: images per pipeline call.
        size: image side in pixels.
        progress: one overall tqdm bar over the samples (a string is its label).
        latents: the initial noise of every sample, [N, ...] (None: each drawn from its seed by the pipeline).
        pipe_kwargs: passed to the pipeline (e.g. ``num_frames`` for a video pipeline).

    Returns:
        [N, 3, size, size] (videos: [N, T, 3, size, size]) float in [0, 1], on CPU.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    if latents is not None and len(latents) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(latents)} initial latents")
    from tqdm.auto import tqdm

    out = []
    bar = tqdm(
        total=len(prompts),
        unit="sample",
        disable=not progress,
        desc=progress if isinstance(progress, str) else "sampling",
    )
    for i in range(0, len(prompts), batch_size):
        gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds[i : i + batch_size]]
        if latents is not None:
            pipe_kwargs["latents"] = latents[i : i + batch_size]
        images = pipe(
            list(prompts[i : i + batch_size]),
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=gens,
            output_type="pt",
            **pipe_kwargs,
        )
        media = images.frames if hasattr(images, "frames") else images.images  # video pipelines return frames
        out.append(torch.as_tensor(media).float().cpu())
        bar.update(len(gens))
    bar.close()
    return torch.cat(out).clamp(0, 1)


def toy_stats(
    images: torch.Tensor, prompts: Sequence[str], defect_threshold: float = 0.5
) -> dict[str, float]:
    """Colour-match and defect rates of images [N,3,H,W] for their prompts.

    Returns:
        ``color_correct`` (fraction whose shape colour is nearest the prompt's), ``color_match`` (mean
        continuous score), ``defect_rate`` (fraction with defect reward below ``defect_threshold``),
        ``defect`` (mean defect reward) and ``shape_match`` (mean).
    """
    from mmalign.toy.rewards import color_correct, color_match, defect_energy, shape_match

    defect = defect_energy()(images, prompts)
    return {
        "color_correct": color_correct()(images, prompts).mean().item(),
        "color_match": color_match()(images, prompts).mean().item(),
        "defect_rate": (defect < defect_threshold).float().mean().item(),
        "defect": defect.mean().item(),
        "shape_match": shape_match()(images, prompts).mean().item(),
    }
