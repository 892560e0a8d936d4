"""``mmalign label-video --structural``: StructuralDPO video pairs from ground-truth clips, labelled per segment
by a reward (:mod:`mmalign.data.structural`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mmalign.commands.options import add_runtime_args


def cmd_label_video(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from mmalign.data.images import DataError
    from mmalign.data.segments import clip_label, fit_frames
    from mmalign.data.structural import reward_segment_labels, structural_pairs
    from mmalign.data.video import read_video, write_video
    from mmalign.pipelines import make_adapter
    from mmalign.pipelines.runtime import load_for_inference
    from mmalign.rewards import get_reward
    from mmalign.utils import parse_key_values

    if not args.structural:
        raise DataError("label-video currently makes StructuralDPO pairs only: pass --structural")
    src = Path(args.videos)
    if not src.is_file():
        raise DataError(f"--videos {src}: file not found")
    rows = []
    for i, line in enumerate(src.read_text().splitlines(), start=1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{src}:{i}: not valid JSON: {err}") from None
            if not isinstance(row, dict) or "prompt" not in row or "video" not in row:
                raise DataError(f"{src}:{i}: a row needs prompt and video")
            rows.append((f"{src}:{i}", row))
    try:
        reward_kwargs = parse_key_values(args.reward_arg, flag="--reward-arg")
    except ValueError as err:
        raise DataError(str(err)) from None
    reward = get_reward(args.reward or ("vlm_judge" if args.judge else "toy_flicker"), **reward_kwargs)
    if args.judge and not hasattr(reward, "compare_segments"):
        raise DataError(
            f"--judge needs a pairwise judge (e.g. --reward vlm_judge); {args.reward!r} has no compare_segments"
        )
    pipe, family, _ = load_for_inference(
        args.model,
        family=args.family,
        device=args.device,
        dtype=args.dtype,
        cpu_offload=args.cpu_offload,
        verbose=args.verbose,
    )
    adapter = make_adapter(pipe, family)
    height, width = args.height or args.resolution, args.width or args.resolution
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (where, row) in enumerate(
        tqdm(rows, desc="StructuralDPO pairs", unit="clip", disable=args.no_progress)
    ):
        path = Path(row["video"]) if Path(row["video"]).is_absolute() else src.parent / row["video"]
        try:
            clip = read_video(path, fps=args.fps, num_frames=args.num_frames)
        except DataError as err:
            raise DataError(f"{where}: {err}") from None
        frames = fit_frames(clip.frames, height, width).add(1).div(2)[None]
        v0, v1, etas = structural_pairs(
            adapter,
            pipe,
            frames,
            [row["prompt"]],
            seed=args.seed + i,
            eta_range=(args.eta_min, args.eta_max),
            steps=args.steps,
            guidance=args.guidance,
        )
        v0, v1 = v0.float().cpu(), v1.float().cpu()
        if args.judge:  # both orders asked per segment, disagreement -> tie (VLMJudge.compare_segments)
            labels = (
                reward.compare_segments(
                    v0,
                    v1,
                    [row["prompt"]],
                    segment_frames=max(1, round(clip.fps * args.segment_seconds)),
                    fps=clip.fps,
                )[0]
                .long()
                .tolist()
            )
        else:
            labels = reward_segment_labels(
                reward,
                v0,
                v1,
                [row["prompt"]],
                fps=clip.fps,
                segment_seconds=args.segment_seconds,
                margin=args.margin,
            )[0].tolist()
        names = [f"{i:06d}_0.mp4", f"{i:06d}_1.mp4"]
        write_video(out / names[0], v0[0], clip.fps, lossless=args.lossless)
        write_video(out / names[1], v1[0], clip.fps, lossless=args.lossless)
        lines.append(
            {
                "prompt": row["prompt"],
                "video_0": names[0],
                "video_1": names[1],
                "labels": labels,
                "label": clip_label(labels),
                "segment_seconds": args.segment_seconds,
                "eta": etas[0],
                "seeds": [(args.seed + i) * 1000, (args.seed + i) * 1000 + 1],
                "source": str(path),
            }
        )
    (out / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    print(f"wrote {len(lines)} StructuralDPO pairs with segment labels to {out / 'pairs.jsonl'}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "label-video", help="StructuralDPO video pairs from ground-truth clips + per-segment labels"
    )
    p.add_argument(
        "--structural", action="store_true", help="make StructuralDPO pairs (the only mode so far)"
    )
    p.add_argument("--videos", required=True, help="JSONL of ground-truth clips: {prompt, video}")
    p.add_argument("--model", required=True, help="video pipeline (hub id or local directory)")
    p.add_argument("--family", default="auto")
    p.add_argument("--out", required=True, help="folder for the pair clips and pairs.jsonl")
    p.add_argument(
        "--reward",
        default=None,
        help="reward scoring each segment, higher = better (default toy_flicker; with --judge: vlm_judge)",
    )
    p.add_argument(
        "--judge",
        action="store_true",
        help="label segments with a pairwise judge asked in both orders "
        "(disagreement = tie) instead of comparing per-segment reward scores",
    )
    p.add_argument(
        "--reward-arg", action="append", default=[], help="reward factory argument key=value (repeatable)"
    )
    p.add_argument("--margin", type=float, default=0.0, help="segment score differences within this are ties")
    p.add_argument(
        "--lossless",
        action="store_true",
        help="write the pair clips as lossless RGB H.264 (exact pixels; browsers may not play them) instead of "
        "yuv420p, whose half-resolution chroma costs small clips colour that training then learns",
    )
    p.add_argument("--segment-seconds", type=float, default=1.0)
    p.add_argument("--eta-min", type=float, default=0.65)
    p.add_argument("--eta-max", type=float, default=0.8)
    p.add_argument("--fps", type=float, default=None)
    p.add_argument("--num-frames", type=int, default=None)
    p.add_argument(
        "--resolution", type=int, default=32, help="square frame size when --height/--width are not given"
    )
    p.add_argument("--height", type=int, default=None, help="frame height (Wan 2.1: 480)")
    p.add_argument("--width", type=int, default=None, help="frame width (Wan 2.1: 832)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    add_runtime_args(p, batch_size=1)
    p.set_defaults(func=cmd_label_video)
