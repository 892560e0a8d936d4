"""StructuralDPO pairs (DenseDPO §3.2, Algo. 2) and per-segment labels (``mmalign label-video`` runs them).

A pair is made from one ground-truth clip: encode it, noise it partially to level eta ~ U(0.65, 0.8) with
two seeds (the same eta for both), and denoise both copies with the pipeline's own sampler. Early steps fix
the global motion, so the two clips share layout and motion and differ in local artefacts. The start step
is the one whose sigma is closest to eta for flow-matching families (Wan); for DDPM-family schedulers it is
the img2img convention (start after ``round((1 - eta) * steps)`` steps, as diffusers' ``strength``).

Labels per segment come from a reward (any clip reward, called on each segment's frames; higher = better;
differences within ``margin`` are ties) or from a pairwise judge asked in both orders (disagreement -> tie,
:meth:`mmalign.rewards.judge.VLMJudge.compare_segments`). The whole-clip label is their majority.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Sequence
from typing import Any

import torch

from mmalign.data.segments import frame_segments, labels_from_scores, num_segments


@torch.no_grad()
def denoise_from(
    adapter: Any,
    pipe: Any,
    x0: torch.Tensor,
    cond: dict[str, torch.Tensor],
    uncond: dict[str, torch.Tensor],
    *,
    eta: float,
    noise: torch.Tensor,
    steps: int = 20,
    guidance: float = 1.0,
) -> torch.Tensor:
    """SDEdit-style: noise latents ``x0`` [B,C,T,h,w] to level ``eta`` with ``noise`` and denoise with the pipeline's sampler."""
    sched = copy.deepcopy(pipe.scheduler)
    sched.set_timesteps(steps, device=x0.device)
    timesteps = sched.timesteps
    if adapter.noise_process == "flow":
        sigmas = sched.sigmas[: len(timesteps)].float().cpu()
        start = int((sigmas - eta).abs().argmin())
        sigma = sigmas[start].item()
        x = (1 - sigma) * x0 + sigma * noise
    else:
        start = min(len(timesteps) - 1, round((1 - eta) * len(timesteps)))
        x = sched.add_noise(x0, noise, timesteps[start : start + 1].repeat(x0.shape[0]))
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(start * getattr(sched, "order", 1))
    denoiser = getattr(pipe, adapter.denoiser_name)
    for t in timesteps[start:]:
        inp = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
        tt = t.expand(x.shape[0]).to(x.device)
        pred = adapter.predict(denoiser, inp, tt, cond)
        if guidance != 1.0:
            pred_u = adapter.predict(denoiser, inp, tt, uncond)
            pred = pred_u + guidance * (pred - pred_u)
        x = sched.step(pred, t, x).prev_sample
    return x


@torch.no_grad()
def structural_pairs(
    adapter: Any,
    pipe: Any,
    videos: torch.Tensor,
    prompts: Sequence[str],
    *,
    seed: int,
    eta_range: tuple[float, float] = (0.65, 0.8),
    steps: int = 20,
    guidance: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Two clips per ground-truth clip sharing its motion.

    Args:
        adapter, pipe: a video family adapter and its pipeline.
        videos: [B,T,3,H,W] ground truth in [0,1].
        prompts: B prompts.
        seed: draws eta per clip and the two noises (seed-derived, so runs are reproducible).
        eta_range: guidance level range; the same eta for both clips of a pair.

    Returns:
        clips 0 and 1 [B,T',3,H,W] in [0,1] (T' = T for the toy family, the VAE's decoded length otherwise) and the etas.
    """
    g = torch.Generator().manual_seed(seed)
    x0 = adapter.encode_media(videos.mul(2).sub(1), generator=g)
    cond = adapter.encode_prompts(list(prompts))
    uncond = adapter.encode_prompts([""] * len(prompts))
    rng = random.Random(seed)
    etas = [rng.uniform(*eta_range) for _ in prompts]
    outs = []
    for which in range(2):
        clips = []
        for i, eta in enumerate(etas):
            noise = torch.randn(
                x0[i : i + 1].shape, generator=torch.Generator().manual_seed(seed * 1000 + 2 * i + which)
            )
            one = {k: v[i : i + 1] for k, v in cond.items()}
            un = {k: v[i : i + 1] for k, v in uncond.items()}
            clips.append(
                denoise_from(
                    adapter,
                    pipe,
                    x0[i : i + 1],
                    one,
                    un,
                    eta=eta,
                    noise=noise.to(x0.device),
                    steps=steps,
                    guidance=guidance,
                )
            )
        outs.append(adapter.decode_latents(torch.cat(clips)))
    return outs[0], outs[1], etas


def segment_slices(num_frames: int, fps: float, segment_seconds: float = 1.0) -> list[list[int]]:
    """Frame indices of each segment (:func:`~mmalign.data.segments.frame_segments` rule)."""
    seg = frame_segments(torch.arange(num_frames) / fps, segment_seconds, duration=num_frames / fps)
    return [
        torch.nonzero(seg == s).flatten().tolist()
        for s in range(num_segments(num_frames / fps, segment_seconds))
    ]


def reward_segment_labels(
    reward: Callable[..., torch.Tensor],
    video_0: torch.Tensor,
    video_1: torch.Tensor,
    prompts: Sequence[str],
    *,
    fps: float,
    segment_seconds: float = 1.0,
    margin: float = 0.0,
) -> torch.Tensor:
    """Labels [B,S] from a reward called on each segment of each clip (``reward(media [B,t,3,H,W], prompts) -> [B]``)."""
    cols_0, cols_1 = [], []
    for idx in segment_slices(video_0.shape[1], fps, segment_seconds):
        for video, cols in ((video_0, cols_0), (video_1, cols_1)):
            score = reward(video[:, idx], list(prompts))
            cols.append(score.float().reshape(video.shape[0], -1).mean(1).cpu())
    return labels_from_scores(torch.stack(cols_0, 1), torch.stack(cols_1, 1), margin)
