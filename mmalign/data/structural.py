"""StructuralDPO pairs (DenseDPO §3.2, Algo. 2) and per-segment labels, plus the ``mmalign label-video`` command.

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

import argparse
import copy
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from mmalign.data.segments import clip_label, fit_frames, frame_segments, labels_from_scores, num_segments


def _is_flow(adapter: Any) -> bool:
    return hasattr(adapter, "shift")


@torch.no_grad()
def denoise_from(adapter: Any, pipe: Any, x0: torch.Tensor, cond: dict[str, torch.Tensor], uncond: dict[str, torch.Tensor],
                 *, eta: float, noise: torch.Tensor, steps: int = 20, guidance: float = 1.0) -> torch.Tensor:
    """SDEdit-style: noise latents ``x0`` [B,C,T,h,w] to level ``eta`` with ``noise`` and denoise with the pipeline's sampler."""
    sched = copy.deepcopy(pipe.scheduler)
    sched.set_timesteps(steps, device=x0.device)
    timesteps = sched.timesteps
    if _is_flow(adapter):
        sigmas = sched.sigmas[: len(timesteps)].float().cpu()
        start = int((sigmas - eta).abs().argmin())
        sigma = sigmas[start].item()
        x = (1 - sigma) * x0 + sigma * noise
    else:
        start = min(len(timesteps) - 1, round((1 - eta) * len(timesteps)))
        x = sched.add_noise(x0, noise, timesteps[start:start + 1].repeat(x0.shape[0]))
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
def structural_pairs(adapter: Any, pipe: Any, videos: torch.Tensor, prompts: Sequence[str], *, seed: int,
                     eta_range: tuple[float, float] = (0.65, 0.8), steps: int = 20, guidance: float = 1.0
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
            noise = torch.randn(x0[i:i + 1].shape, generator=torch.Generator().manual_seed(seed * 1000 + 2 * i + which))
            one = {k: v[i:i + 1] for k, v in cond.items()}
            un = {k: v[i:i + 1] for k, v in uncond.items()}
            clips.append(denoise_from(adapter, pipe, x0[i:i + 1], one, un, eta=eta, noise=noise.to(x0.device),
                                      steps=steps, guidance=guidance))
        outs.append(adapter.decode_latents(torch.cat(clips)))
    return outs[0], outs[1], etas


def segment_slices(num_frames: int, fps: float, segment_seconds: float = 1.0) -> list[list[int]]:
    """Frame indices of each segment (:func:`~mmalign.data.segments.frame_segments` rule)."""
    seg = frame_segments(torch.arange(num_frames) / fps, segment_seconds, duration=num_frames / fps)
    return [torch.nonzero(seg == s).flatten().tolist() for s in range(num_segments(num_frames / fps, segment_seconds))]


def reward_segment_labels(reward: Callable[..., torch.Tensor], video_0: torch.Tensor, video_1: torch.Tensor,
                          prompts: Sequence[str], *, fps: float, segment_seconds: float = 1.0, margin: float = 0.0
                          ) -> torch.Tensor:
    """Labels [B,S] from a reward called on each segment of each clip (``reward(media [B,t,3,H,W], prompts) -> [B]``)."""
    cols_0, cols_1 = [], []
    for idx in segment_slices(video_0.shape[1], fps, segment_seconds):
        for video, cols in ((video_0, cols_0), (video_1, cols_1)):
            score = reward(video[:, idx], list(prompts))
            cols.append(score.float().reshape(video.shape[0], -1).mean(1).cpu())
    return labels_from_scores(torch.stack(cols_0, 1), torch.stack(cols_1, 1), margin)


def judge_segment_labels(judge: Any, video_0: torch.Tensor, video_1: torch.Tensor, prompts: Sequence[str], *,
                         fps: float, segment_seconds: float = 1.0) -> torch.Tensor:
    """Labels [B,S] from a pairwise judge asked in both orders per segment (disagreement -> tie)."""
    return judge.compare_segments(video_0, video_1, list(prompts), segment_frames=max(1, round(fps * segment_seconds)),
                                  fps=fps)


# --------------------------------------------------------------------------------------------------
# CLI: mmalign label-video --structural


def cmd_label_video(args: argparse.Namespace) -> int:
    from mmalign.data.images import DataError
    from mmalign.data.video import read_video, write_video
    from mmalign.pipelines import load_pipeline, make_adapter
    from mmalign.rewards import get_reward

    if not args.structural:
        raise DataError("label-video currently makes StructuralDPO pairs only: pass --structural")
    src = Path(args.videos)
    rows = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
    pipe, family = load_pipeline(args.model, family=args.family)
    pipe.set_progress_bar_config(disable=True)
    adapter = make_adapter(pipe, family)
    reward_kwargs = dict(kv.split("=", 1) for kv in args.reward_arg)
    reward_kwargs = {k: json.loads(v) if v[:1] in "0123456789-[{tf" else v for k, v in reward_kwargs.items()}
    reward = get_reward(args.reward, **reward_kwargs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, row in enumerate(rows):
        where = f"{src}:{i + 1}"
        if "prompt" not in row or "video" not in row:
            raise DataError(f"{where}: a row needs prompt and video")
        path = Path(row["video"]) if Path(row["video"]).is_absolute() else src.parent / row["video"]
        clip = read_video(path, fps=args.fps, num_frames=args.num_frames)
        frames = fit_frames(clip.frames, args.resolution, args.resolution).add(1).div(2)[None]
        v0, v1, etas = structural_pairs(adapter, pipe, frames, [row["prompt"]], seed=args.seed + i,
                                        eta_range=(args.eta_min, args.eta_max), steps=args.steps, guidance=args.guidance)
        labels = reward_segment_labels(reward, v0, v1, [row["prompt"]], fps=clip.fps, segment_seconds=args.segment_seconds,
                                       margin=args.margin)[0].tolist()
        names = [f"{i:06d}_0.mp4", f"{i:06d}_1.mp4"]
        write_video(out / names[0], v0[0], clip.fps)
        write_video(out / names[1], v1[0], clip.fps)
        lines.append({"prompt": row["prompt"], "video_0": names[0], "video_1": names[1], "labels": labels,
                      "label": clip_label(labels), "segment_seconds": args.segment_seconds, "eta": etas[0],
                      "seeds": [(args.seed + i) * 1000, (args.seed + i) * 1000 + 1], "source": str(path)})
    (out / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    print(f"wrote {len(lines)} StructuralDPO pairs with segment labels to {out / 'pairs.jsonl'}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("label-video", help="StructuralDPO video pairs from ground-truth clips + per-segment labels")
    p.add_argument("--structural", action="store_true", help="make StructuralDPO pairs (the only mode so far)")
    p.add_argument("--videos", required=True, help="JSONL of ground-truth clips: {prompt, video}")
    p.add_argument("--model", required=True, help="video pipeline (hub id or local directory)")
    p.add_argument("--family", default="auto")
    p.add_argument("--out", required=True, help="folder for the pair clips and pairs.jsonl")
    p.add_argument("--reward", default="toy_flicker", help="reward scoring each segment (higher = better)")
    p.add_argument("--reward-arg", action="append", default=[], help="reward factory argument key=value (repeatable)")
    p.add_argument("--margin", type=float, default=0.0, help="segment score differences within this are ties")
    p.add_argument("--segment-seconds", type=float, default=1.0)
    p.add_argument("--eta-min", type=float, default=0.65)
    p.add_argument("--eta-max", type=float, default=0.8)
    p.add_argument("--fps", type=float, default=None)
    p.add_argument("--num-frames", type=int, default=None)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_label_video)
