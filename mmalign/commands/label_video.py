"""``mmalign label-video --structural``: StructuralDPO video pairs from ground-truth clips, labelled per segment
by a reward (:mod:`mmalign.data.structural`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from mmalign.commands.options import add_runtime_args

VIDEO_KEYS = ("video", "path", "media", "file")  # a clip's column; `path` is what `mmalign generate` writes


def cmd_label_video(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from mmalign.data.images import DataError
    from mmalign.data.manifest import ResumableRows, read_rows
    from mmalign.data.segments import clip_label, fit_frames
    from mmalign.data.structural import reward_segment_labels, structural_pairs
    from mmalign.data.video import read_video, write_video
    from mmalign.pipelines import check_num_frames, detect_family, make_adapter, resolve_pretrained
    from mmalign.pipelines.runtime import load_for_inference
    from mmalign.rewards import get_reward
    from mmalign.utils import parse_key_values

    if not args.structural:
        raise DataError("label-video currently makes StructuralDPO pairs only: pass --structural")
    src = Path(args.videos)
    if not src.is_file():
        raise DataError(f"--videos {src}: file not found")
    rows = []
    for where, row in read_rows(src):
        key = next((k for k in VIDEO_KEYS if row.get(k)), None)
        if not str(row.get("prompt") or "").strip() or key is None:
            raise DataError(f"{where}: a row needs a prompt and a video (one of {', '.join(VIDEO_KEYS)})")
        path = Path(str(row[key]))
        rows.append((where, str(row["prompt"]), path if path.is_absolute() else src.parent / path))
    try:
        reward_kwargs = parse_key_values(args.reward_arg, flag="--reward-arg")
    except ValueError as err:
        raise DataError(str(err)) from None
    reward = get_reward(args.reward or ("vlm_judge" if args.judge else "toy_flicker"), **reward_kwargs)
    if args.judge and not hasattr(reward, "compare_segments"):
        raise DataError(
            f"--judge needs a pairwise judge (e.g. --reward vlm_judge); {args.reward!r} has no compare_segments"
        )
    if args.num_frames is not None:  # a length the pipeline's VAE would change, before any weight loads
        try:
            family = args.family if args.family != "auto" else detect_family(args.model)
            check_num_frames(resolve_pretrained(args.model), family, args.num_frames)
        except ValueError as err:
            raise DataError(str(err)) from None
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
    settings = {  # what shapes a pair besides its clip and seed, so a resumed run keeps only pairs made the same way
        "model": str(args.model),
        "family": args.family,
        "segment_seconds": args.segment_seconds,
        "reward": args.reward or ("vlm_judge" if args.judge else "toy_flicker"),
        "reward_args": list(args.reward_arg),
        "judge": args.judge,
        "margin": args.margin,
        "eta_range": [args.eta_min, args.eta_max],
        "steps": args.steps,
        "guidance": args.guidance,
        "fps": args.fps,
        "num_frames": args.num_frames,
        "size": [height, width],
        "lossless": args.lossless,
    }
    pairs = ResumableRows(out / "pairs.jsonl", resume=not args.overwrite)
    done = {}
    for row in pairs.previous:
        i = row.get("index")
        if (
            isinstance(i, int)
            and 0 <= i < len(rows)
            and row.get("source") == str(rows[i][2])
            and row.get("prompt") == rows[i][1]
            and row.get("seed") == args.seed + i
            and row.get("settings") == settings
            and all((out / str(row.get(k))).is_file() for k in ("video_0", "video_1"))
        ):
            done[i] = row
    pairs.start(done[i] for i in sorted(done))
    if done:
        print(f"label-video: {len(done)} of {len(rows)} pairs already in {out} (same settings)")
    lines = dict(done)
    todo = [i for i in range(len(rows)) if i not in done]
    for i in tqdm(todo, desc="StructuralDPO pairs", unit="clip", disable=args.no_progress):
        where, prompt, path = rows[i]
        try:
            clip = read_video(path, fps=args.fps, num_frames=args.num_frames)
        except DataError as err:
            raise DataError(f"{where}: {err}") from None
        frames = fit_frames(clip.frames, height, width).add(1).div(2)[None]
        v0, v1, etas = structural_pairs(
            adapter,
            pipe,
            frames,
            [prompt],
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
                    [prompt],
                    segment_frames=max(1, round(clip.fps * args.segment_seconds)),
                    fps=clip.fps,
                )[0]
                .long()
                .tolist()
            )
        else:
            try:
                labels = reward_segment_labels(
                    reward,
                    v0,
                    v1,
                    [prompt],
                    fps=clip.fps,
                    segment_seconds=args.segment_seconds,
                    margin=args.margin,
                )[0].tolist()
            except ValueError as err:  # the reward's own settings do not fit a segment (e.g. too few frames)
                raise DataError(
                    f"{where}: --reward {settings['reward']} on --segment-seconds {args.segment_seconds:g} "
                    f"({v0.shape[1]} frames at {clip.fps:g} fps): {err}"
                ) from None
        names = [f"{i:06d}_0.mp4", f"{i:06d}_1.mp4"]
        write_video(out / names[0], v0[0], clip.fps, lossless=args.lossless)
        write_video(out / names[1], v1[0], clip.fps, lossless=args.lossless)
        lines[i] = {
            "prompt": prompt,
            "video_0": names[0],
            "video_1": names[1],
            "labels": labels,
            "label": clip_label(labels),
            "segment_seconds": args.segment_seconds,
            "eta": etas[0],
            "seeds": [(args.seed + i) * 1000, (args.seed + i) * 1000 + 1],
            "source": str(path),
            "index": i,
            "seed": args.seed + i,
            "settings": settings,
        }
        pairs.append([lines[i]])
    pairs.finish(lines[i] for i in range(len(rows)))
    print(f"wrote {len(rows)} StructuralDPO pairs with segment labels to {out / 'pairs.jsonl'}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "label-video", help="StructuralDPO video pairs from ground-truth clips + per-segment labels"
    )
    p.add_argument(
        "--structural", action="store_true", help="make StructuralDPO pairs (the only mode so far)"
    )
    p.add_argument(
        "--videos",
        required=True,
        help="JSONL or CSV of ground-truth clips: {prompt, video} (or a `generate` manifest: {prompt, path})",
    )
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
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="make every pair again (default: keep those a previous run with the same settings wrote)",
    )
    add_runtime_args(p, batch_size=1)
    p.set_defaults(func=cmd_label_video)
