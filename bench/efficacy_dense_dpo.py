"""DenseDPO efficacy on toy videos: flicker of the tuned model vs the base, DenseDPO vs vanilla video DPO.

    python bench/efficacy_dense_dpo.py [--model mmalign/toy/assets/toy-video] [--out DIR] [key=value ...]
    python bench/efficacy.py dense_dpo [...]          # dispatches here

Protocol (DESIGN §3, §5; issue 7):

1. Captions ``"a [small|large] <colour> <shape>"`` (45) are split into training and held-out prompts.
2. Clean ground-truth clips (a moving shape, no flicker) of the training prompts -> StructuralDPO pairs from
   the base toy video model (the maths of :func:`mmalign.data.structural.structural_pairs`, batched 16 clips
   at a time with one eta ~ U(0.65, 0.8) per batch; two seeded noises per clip). The base was trained on
   clips that flicker in a random segment; its pairs wobble in brightness/colour in some segments, each clip
   in its own.
3. Labels per segment from the toy flicker reward on each segment's frames (differences within ``--margin``
   are ties); the whole-clip label is their majority (:func:`mmalign.data.segments.clip_label`).
4. Three LoRA runs from ``configs/toy/dense_dpo.yaml`` with the same steps: ``dense`` (all pairs),
   ``vanilla`` (whole-clip DPO on the same pairs; clip ties dropped), ``dense_third`` (DenseDPO on a third
   of the pairs).
5. Paired evaluation on held-out prompts x seeds (same clips and noise for every model). ``--eval-mode t2v``
   (default): text-to-video from pure noise (the shipped toy video model is coherent from noise since
   2026-11-28, see its README); ``sdedit``: video-to-video from held-out clean clips at ``--eval-eta``, the
   setting the pairs come from. Reported: flicker win rate of each tuned model over the base (the clip's worst-segment
   ``toy_flicker`` score, continuous, ties 0.5), flicker rate (worst segment below ``--flicker-threshold``)
   tuned vs base with the interval of its drop, a reward the pairs were not built from (``toy_color``), and
   DenseDPO vs vanilla head to head; paired-bootstrap 95% intervals (:func:`mmalign.toy.evaluate.paired_stats`).

Prints one JSON line per method and writes ``summary.json``, ``pairs/`` and the runs under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "toy" / "dense_dpo.yaml"


def video_prompts() -> list[str]:
    """The 45 toy captions without a position word (the toy video model moves the shape freely)."""
    from mmalign.toy.render import COLORS, SHAPES, SIZES, ShapeSpec

    return [
        ShapeSpec(c, s, z).caption() for z in (None, *sorted(SIZES)) for c in sorted(COLORS) for s in SHAPES
    ]


def split(prompts: list[str], n_eval: int, seed: int) -> tuple[list[str], list[str]]:
    shuffled = list(prompts)
    random.Random(seed).shuffle(shuffled)
    return shuffled[n_eval:], shuffled[:n_eval]


def make_pairs(args: argparse.Namespace, pipe, adapter, prompts: list[str], out: Path, log) -> Path:
    """StructuralDPO pairs of clean ground-truth clips, per-segment flicker labels, written as mp4 + pairs.jsonl."""
    import torch

    from mmalign.data.segments import clip_label
    from mmalign.data.structural import reward_segment_labels
    from mmalign.data.video import write_video
    from mmalign.toy.render import render_video
    from mmalign.toy.rewards import flicker

    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "pairs.jsonl"
    if manifest.is_file() and len(manifest.read_text().splitlines()) == args.pairs:
        log(f"pairs: reusing {manifest}")
        return manifest
    seg_reward = flicker(segments=1)  # called on each segment's frames alone
    rows = []
    for start in range(0, args.pairs, 16):
        idx = list(range(start, min(args.pairs, start + 16)))
        batch_prompts = [prompts[i % len(prompts)] for i in idx]
        gt = torch.stack(
            [
                render_video(p, seed=10_000 + i, frames=args.frames, size=args.size)
                for p, i in zip(batch_prompts, idx)
            ]
        )
        v0, v1, etas = batched_structural_pairs(
            adapter, pipe, gt, batch_prompts, seed=args.seed * 100_000 + start, steps=args.sample_steps
        )
        labels = reward_segment_labels(
            seg_reward,
            v0,
            v1,
            batch_prompts,
            fps=args.fps,
            segment_seconds=args.segment_seconds,
            margin=args.margin,
        )
        for j, i in enumerate(idx):
            names = [f"{i:05d}_0.mp4", f"{i:05d}_1.mp4"]
            write_video(out / names[0], v0[j], args.fps, lossless=True)  # yuv420p costs 32 px clips colour
            write_video(out / names[1], v1[j], args.fps, lossless=True)
            lab = labels[j].tolist()
            rows.append(
                {
                    "prompt": batch_prompts[j],
                    "video_0": names[0],
                    "video_1": names[1],
                    "labels": lab,
                    "label": clip_label(lab),
                    "segment_seconds": args.segment_seconds,
                    "eta": etas[j],
                }
            )
        log(f"pairs: {len(rows)}/{args.pairs}")
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def batched_structural_pairs(
    adapter,
    pipe,
    videos,
    prompts: list[str],
    *,
    seed: int,
    steps: int,
    eta_range: tuple[float, float] = (0.65, 0.8),
):
    """:func:`mmalign.data.structural.structural_pairs` for a batch at once (one eta per batch, drawn from
    ``eta_range``; per-clip seeded noise), which a shared 2-core CPU needs: the library call denoises clip by clip."""
    import torch

    from mmalign.data.structural import denoise_from

    g = torch.Generator().manual_seed(seed)
    x0 = adapter.encode_media(videos.mul(2).sub(1), generator=g)
    cond, uncond = adapter.encode_prompts(list(prompts)), adapter.encode_prompts([""] * len(prompts))
    eta = random.Random(seed).uniform(*eta_range)
    outs = []
    for which in range(2):
        noise = torch.cat(
            [
                torch.randn(
                    x0[i : i + 1].shape, generator=torch.Generator().manual_seed(seed * 1000 + 2 * i + which)
                )
                for i in range(len(prompts))
            ]
        )
        outs.append(
            adapter.decode_latents(
                denoise_from(adapter, pipe, x0, cond, uncond, eta=eta, noise=noise, steps=steps)
            )
        )
    return outs[0], outs[1], [eta] * len(prompts)


def sdedit_videos(args: argparse.Namespace, lora: str | None, prompts: list[str], seeds: list[int]):
    """Video-to-video from held-out clean clips (eta = --eval-eta, noise seeded per clip): the StructuralDPO
    setting on unseen prompts/clips/seeds. Every model gets the same clips and noises."""
    import torch

    from mmalign.data.structural import denoise_from
    from mmalign.pipelines import load_pipeline, make_adapter
    from mmalign.toy.render import render_video

    pipe, family = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    if lora:
        pipe.load_lora_weights(lora)
    adapter = make_adapter(pipe, family)
    out = []
    for start in range(0, len(prompts), 32):
        ps, ss = prompts[start : start + 32], seeds[start : start + 32]
        gt = torch.stack(
            [render_video(p, seed=s, frames=args.frames, size=args.size) for p, s in zip(ps, ss)]
        )
        x0 = adapter.encode_media(gt.mul(2).sub(1), generator=torch.Generator().manual_seed(ss[0]))
        noise = torch.cat([torch.randn(x0[:1].shape, generator=torch.Generator().manual_seed(s)) for s in ss])
        x = denoise_from(
            adapter,
            pipe,
            x0,
            adapter.encode_prompts(ps),
            adapter.encode_prompts([""] * len(ps)),
            eta=args.eval_eta,
            noise=noise,
            steps=args.sample_steps,
        )
        out.append(adapter.decode_latents(x).cpu())
    return torch.cat(out)


def label_counts(rows: list[dict]) -> dict[str, float]:
    segs = [v for r in rows for v in r["labels"]]
    return {
        "pairs": len(rows),
        "segment_non_tie_frac": sum(v != 0 for v in segs) / max(1, len(segs)),
        "clip_ties": sum(r["label"] == 0 for r in rows),
        "pairs_with_both_directions": sum(1 in r["labels"] and -1 in r["labels"] for r in rows),
    }


def train_run(args: argparse.Namespace, name: str, manifest: Path, loss: str, log) -> dict:
    from mmalign.trainers import load_config
    from mmalign.trainers.loop import train

    overrides = [
        f"model.pretrained={args.model}",
        f"model.resolution={args.size}",
        f"data.source={manifest}",
        f"method.loss={loss}",
        f"method.num_frames={args.frames}",
        f"method.segment_seconds={args.segment_seconds}",
        f"train.output_dir={Path(args.out) / 'runs' / name}",
        "train.overwrite=true",  # a re-run of the benchmark replaces its runs
        f"train.max_steps={args.train_steps}",
        f"train.batch_size={args.batch_size}",
        "train.progress=false",
        "train.log_every=10",
        *args.overrides,
    ]
    cfg = load_config(CONFIG, overrides)
    t0 = time.time()
    result = train(cfg)
    s = result.summary
    log(
        f"{name}: {s['steps']} steps in {time.time() - t0:.0f}s on {s['data']['pairs']} pairs; "
        f"final {json.dumps({k: round(v, 4) for k, v in s['final_metrics'].items()})}"
    )
    return {
        "export": s["export"],
        "steps": s["steps"],
        "train_seconds": time.time() - t0,
        "pairs_used": s["data"]["pairs"],
        "final_metrics": s["final_metrics"],
    }


def sample_model(args: argparse.Namespace, lora: str | None, prompts: list[str], seeds: list[int]):
    if args.eval_mode == "sdedit":
        return sdedit_videos(args, lora, prompts, seeds)
    from mmalign.pipelines import load_pipeline
    from mmalign.toy.video_build import generate_videos

    pipe, _ = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    if lora:
        pipe.load_lora_weights(lora)
    return generate_videos(
        pipe,
        prompts,
        seeds,
        frames=args.frames,
        size=args.size,
        steps=args.sample_steps,
        noise_correlation=args.noise_correlation,
    )


def scores(videos, prompts: list[str], args: argparse.Namespace) -> dict:
    from mmalign.toy.rewards import color_match, flicker

    flick = flicker(segments=args.segments)(videos)
    return {
        "flicker": flick,
        "flickers": (flick < args.flicker_threshold).double(),
        "color": color_match()(videos, prompts),
    }


def rounded(x):
    if isinstance(x, float):
        return round(x, 4)
    if isinstance(x, list):
        return [rounded(v) for v in x]
    return x


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "mmalign" / "toy" / "assets" / "toy-video"))
    parser.add_argument("--out", default=str(ROOT / "outputs" / "bench" / "efficacy-dense_dpo"))
    parser.add_argument(
        "--pairs",
        type=int,
        default=120,
        help="StructuralDPO pairs (the third-of-pairs run uses the first third)",
    )
    parser.add_argument("--eval-prompts", type=int, default=15, help="held-out prompts (of 45)")
    parser.add_argument("--seeds-per-prompt", type=int, default=8)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--fps", type=float, default=4.0)
    parser.add_argument(
        "--segment-seconds", type=float, default=0.5, help="8 frames at 4 fps: 4 segments of 2 frames"
    )
    parser.add_argument(
        "--margin", type=float, default=0.1, help="segment flicker-score differences within this are ties"
    )
    parser.add_argument(
        "--flicker-threshold",
        type=float,
        default=0.5,
        help="a clip flickers when its worst segment scores below",
    )
    parser.add_argument("--sample-steps", type=int, default=10, help="DDIM steps for pairs and evaluation")
    parser.add_argument("--train-steps", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--methods", default="dense,vanilla,dense_third")
    parser.add_argument(
        "--eval-mode",
        choices=("sdedit", "t2v"),
        default="t2v",
        help="t2v: text-to-video from pure noise; sdedit: video-to-video from held-out clean clips at --eval-eta",
    )
    parser.add_argument("--eval-eta", type=float, default=0.7)
    parser.add_argument(
        "--noise-correlation",
        type=float,
        default=0.0,
        help="t2v: initial noise whose frames share this variance fraction (0: i.i.d. frames, the default)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument(
        "--base-only",
        action="store_true",
        help="only the base model's flicker rate, score, colour and coherence (coherence_stats) in --eval-mode (is a "
        "video base coherent from noise?), plus base.png (8 clips, one per row); no pairs, no training",
    )
    parser.add_argument(
        "overrides", nargs="*", help="recipe overrides for every run, e.g. train.learning_rate=2e-4"
    )
    args = parser.parse_args(argv)
    if not 0.0 <= args.noise_correlation < 1.0:
        parser.error(f"--noise-correlation {args.noise_correlation} must be in [0, 1)")
    args.segments = round(args.frames / args.fps / args.segment_seconds)
    run(args)
    return 0


def run(args: argparse.Namespace) -> list[dict]:
    import torch

    from mmalign.pipelines import load_pipeline, make_adapter
    from mmalign.toy.evaluate import paired_stats

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t_all = time.time()
    train_prompts, eval_prompts = split(video_prompts(), args.eval_prompts, args.seed)
    if args.base_only:
        from torchvision.utils import save_image

        from mmalign.toy.video_build import coherence_stats

        eval_p = [p for p in eval_prompts for _ in range(args.seeds_per_prompt)]
        eval_s = [1_000_000 + i for i in range(len(eval_p))]
        videos = sample_model(args, None, eval_p, eval_s)
        base = scores(videos, eval_p, args)
        save_image(videos[:: args.seeds_per_prompt][:8].flatten(0, 1), out / "base.png", nrow=args.frames)
        row = {
            "model": args.model,
            "eval_mode": args.eval_mode,
            "flicker_rate": base["flickers"].mean().item(),
            "flicker_score": base["flicker"].mean().item(),
            "color": base["color"].mean().item(),
            **coherence_stats(videos, eval_p),
            "noise_correlation": args.noise_correlation,
            "n": len(eval_p),
            "seconds": time.time() - t_all,
        }
        print(json.dumps({k: rounded(v) for k, v in row.items()}), flush=True)
        return [row]
    pipe, family = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    t0 = time.time()
    manifest = make_pairs(args, pipe, make_adapter(pipe, family), train_prompts, out / "pairs", log)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    third = manifest.with_name("pairs_third.jsonl")
    third.write_text("".join(json.dumps(r) + "\n" for r in rows[: len(rows) // 3]))
    counts = {
        "all": label_counts(rows),
        "third": label_counts(rows[: len(rows) // 3]),
        "seconds": time.time() - t0,
    }
    log(f"pairs: {json.dumps(counts)}")

    eval_p = [p for p in eval_prompts for _ in range(args.seeds_per_prompt)]
    eval_s = [1_000_000 + i for i in range(len(eval_p))]
    t0 = time.time()
    base = scores(sample_model(args, None, eval_p, eval_s), eval_p, args)
    log(
        f"base: flicker rate {base['flickers'].mean():.3f}, flicker score {base['flicker'].mean():.3f}, "
        f"colour {base['color'].mean():.3f} ({time.time() - t0:.0f}s)"
    )
    runs = {"dense": (manifest, "dense"), "vanilla": (manifest, "vanilla"), "dense_third": (third, "dense")}
    results, tuned = [], {}
    for name in args.methods.split(","):
        source, loss = runs[name]
        info = train_run(args, name, source, loss, log)
        t0 = time.time()
        tuned[name] = scores(sample_model(args, info["export"], eval_p, eval_s), eval_p, args)
        flick = paired_stats(tuned[name]["flicker"], base["flicker"])
        rate = paired_stats(-tuned[name]["flickers"], -base["flickers"])  # higher = fewer flickering clips
        color = paired_stats(tuned[name]["color"], base["color"])
        row = {
            "method": name,
            "loss": loss,
            "win_rate": flick["win_rate"],
            "win_rate_ci": flick["win_rate_ci"],
            "flicker_rate": tuned[name]["flickers"].mean().item(),
            "flicker_rate_base": base["flickers"].mean().item(),
            "flicker_rate_drop_ci": rate["mean_diff_ci"],
            "flicker_score": flick["mean_reward_a"],
            "flicker_score_base": flick["mean_reward_b"],
            "color_win_rate": color["win_rate"],
            "color_win_rate_ci": color["win_rate_ci"],
            "color": color["mean_reward_a"],
            "color_base": color["mean_reward_b"],
            "n": flick["n"],
            "pairs_used": info["pairs_used"],
            "steps": info["steps"],
            "seconds": round(info["train_seconds"], 1),
            "eval_seconds": round(time.time() - t0, 1),
        }
        results.append({k: rounded(v) for k, v in row.items()})
        print(json.dumps(results[-1]), flush=True)
    heads = {}
    for a, b in (("dense", "vanilla"), ("dense_third", "vanilla"), ("dense", "dense_third")):
        if a in tuned and b in tuned:
            h = paired_stats(tuned[a]["flicker"], tuned[b]["flicker"])
            heads[f"{a}_vs_{b}"] = {
                "win_rate": rounded(h["win_rate"]),
                "win_rate_ci": rounded(h["win_rate_ci"]),
                "mean_diff": rounded(h["mean_diff"]),
                "mean_diff_ci": rounded(h["mean_diff_ci"]),
            }
            print(json.dumps({"comparison": f"{a}_vs_{b}", **heads[f"{a}_vs_{b}"]}), flush=True)
    summary = {
        "args": {k: v for k, v in vars(args).items()},
        "pairs": counts,
        "methods": results,
        "head_to_head": heads,
        "train_prompts": train_prompts,
        "eval_prompts": eval_prompts,
        "seconds": round(time.time() - t_all, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return results


if __name__ == "__main__":
    sys.exit(main())
