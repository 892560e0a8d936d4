"""``mmalign toy build | render | sample``, ``mmalign eval`` and ``mmalign quickstart``.

``register(subparsers)`` is called by :mod:`mmalign.cli`; each action is a function of the parsed
arguments returning an exit code.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mmalign.toy.build import DEFAULT_ASSET_DIR, ToyBuildConfig
from mmalign.toy.sample import QUICKSTART_GUIDANCE, QUICKSTART_STEPS


def cmd_toy_build(args: argparse.Namespace) -> int:
    from mmalign.toy.build import toy_build

    overrides = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep or key not in ToyBuildConfig.__dataclass_fields__:
            fields = ", ".join(ToyBuildConfig.__dataclass_fields__)
            print(f"mmalign toy build: bad --set {item!r}; use KEY=VALUE with KEY one of: {fields}")
            return 2
        kind = type(getattr(ToyBuildConfig(), key))
        overrides[key] = kind(value)
    overrides.setdefault("seed", args.seed)
    toy_build(args.out, **overrides)
    print(f"toy pipeline written to {args.out}")
    return 0


def cmd_toy_render(args: argparse.Namespace) -> int:
    import torch

    from mmalign.toy.render import image_grid, render_video, sample_dataset, sample_spec

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.video:
        clips = []
        for i in range(args.n):
            segment = i % args.segments if args.flicker else None
            spec = sample_spec(args.seed + i)
            clips.append(
                render_video(
                    spec,
                    seed=args.seed + i,
                    frames=args.frames,
                    flicker_segment=segment,
                    segments=args.segments,
                )
            )
        grid = image_grid(torch.cat(clips), nrow=args.frames, scale=args.scale)
        captions = [sample_spec(args.seed + i).caption() for i in range(args.n)]
    else:
        images, rows = sample_dataset(
            args.n, seed=args.seed, p_speckle=args.p_speckle, p_wrong_color=args.p_wrong_color
        )
        grid = image_grid(images, nrow=args.nrow, scale=args.scale)
        captions = [r.caption for r in rows]
    grid.save(out)
    out.with_suffix(".txt").write_text("\n".join(captions) + "\n")
    print(f"wrote {out} (captions in {out.with_suffix('.txt')})")
    return 0


def cmd_toy_sample(args: argparse.Namespace) -> int:
    from mmalign.toy.quickstart import all_toy_prompts
    from mmalign.toy.render import image_grid
    from mmalign.toy.sample import generate, load_toy_pipeline, toy_stats

    pipe = load_toy_pipeline(args.model)
    if args.lora:
        pipe.load_lora_weights(args.lora)
    captions = all_toy_prompts()
    prompts = [captions[i % len(captions)] for i in range(args.n)]
    seeds = [args.seed + i for i in range(args.n)]
    images = generate(pipe, prompts, seeds, guidance_scale=args.guidance, steps=args.steps)
    stats = toy_stats(images, prompts)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images[: args.grid], nrow=15, scale=args.scale).save(out)
    stats.update(n=args.n, guidance_scale=args.guidance, steps=args.steps)
    print(json.dumps(stats))
    print(f"wrote {out} (prompts in order: {', '.join(prompts[:3])}, ...)")
    return 0


def _load_model(path: str, lora: str | None, family: str):
    from mmalign.toy.sample import load_toy_pipeline

    if family == "auto" and Path(path, "model_index.json").is_file():
        pipe = load_toy_pipeline(path)
    else:
        from mmalign.pipelines import load_pipeline

        pipe, _ = load_pipeline(path, family=family)
        pipe.set_progress_bar_config(disable=True)
    if lora:
        pipe.load_lora_weights(lora)
    return pipe


def cmd_eval(args: argparse.Namespace) -> int:
    from mmalign.rewards import get_reward
    from mmalign.toy.evaluate import evaluate_models, markdown_table
    from mmalign.toy.quickstart import EVAL_SEED_BASE, QuickstartOptions, eval_rewards, split_prompts

    if args.prompts:
        prompts = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    else:
        opts = QuickstartOptions()
        prompts = split_prompts(opts.train_prompts, opts.eval_prompts, opts.split_seed)[1]
    eval_p = [p for p in prompts for _ in range(args.seeds_per_prompt)]
    eval_s = [args.seed + i for i in range(len(eval_p))] if args.seed is not None else None
    if eval_s is None:
        eval_s = [EVAL_SEED_BASE + i for i in range(len(eval_p))]
    rewards = {name: get_reward(name) for name in args.reward} if args.reward else eval_rewards()
    pipe_a = _load_model(args.model_a, args.lora_a, args.family)
    pipe_b = _load_model(args.model_b or args.model_a, args.lora_b, args.family)
    if args.negative_lora_a:  # NPO guidance on (A) vs off (B): A shares B's weights, only its CFG branch differs
        from mmalign.pipelines.npo import npo_guided_pipeline

        pipe_a = npo_guided_pipeline(pipe_b, args.negative_lora_a, alpha=args.npo_alpha, beta=args.npo_beta)
        args.label_a = args.label_a or f"NPO-guided ({Path(args.negative_lora_a).name})"
    label_a = args.label_a or (f"{Path(args.lora_a).name} LoRA" if args.lora_a else Path(args.model_a).name)
    label_b = args.label_b or (
        f"{Path(args.lora_b).name} LoRA" if args.lora_b else Path(args.model_b or args.model_a).name
    )
    metrics = evaluate_models(
        pipe_a,
        pipe_b,
        eval_p,
        eval_s,
        rewards,
        args.out,
        guidance_scale=args.guidance,
        steps=args.steps,
        size=args.size,
        label_a=label_a,
        label_b=label_b,
    )
    print(markdown_table(metrics, label_a, label_b))
    print(f"wrote {args.out}/metrics.json, table.md, grid.png")
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from mmalign.toy.quickstart import quickstart

    quickstart(args.out, model=args.model, config=args.config, overrides=args.overrides)
    return 0


def register(subparsers) -> None:
    """Add ``toy`` with its ``build``, ``render`` and ``sample`` actions to ``mmalign``'s subparsers."""
    toy = subparsers.add_parser("toy", help="the toy shapes world: build its pipeline, render, sample")
    actions = toy.add_subparsers(dest="toy_command", required=True)

    p = actions.add_parser(
        "build", help="pretrain the tiny toy StableDiffusionPipeline (about 10-25 min, 2 cores)"
    )
    p.add_argument(
        "--out", default=str(DEFAULT_ASSET_DIR), help="output directory (default: the shipped assets)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a ToyBuildConfig field")
    p.set_defaults(func=cmd_toy_build)

    p = actions.add_parser("render", help="draw a grid PNG of toy images (or videos, one per row)")
    p.add_argument("--out", default="outputs/toy/render.png")
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nrow", type=int, default=8)
    p.add_argument("--scale", type=int, default=4, help="pixel upscaling of the PNG")
    p.add_argument("--p-speckle", type=float, default=0.0)
    p.add_argument("--p-wrong-color", type=float, default=0.0)
    p.add_argument("--video", action="store_true", help="render clips, one row of frames each")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--flicker", action="store_true", help="add a flicker in one segment of each clip")
    p.add_argument("--segments", type=int, default=4)
    p.set_defaults(func=cmd_toy_render)

    p = actions.add_parser(
        "sample", help="sample the toy pipeline on every caption; print colour/defect rates"
    )
    p.add_argument("--model", default=str(DEFAULT_ASSET_DIR))
    p.add_argument("--lora", help="LoRA directory to load first")
    p.add_argument("--n", type=int, default=450, help="samples, cycling over the 225 toy captions")
    p.add_argument("--seed", type=int, default=50_000)
    p.add_argument("--guidance", type=float, default=QUICKSTART_GUIDANCE)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--grid", type=int, default=60, help="images in the PNG")
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--out", default="outputs/toy/sample.png")
    p.set_defaults(func=cmd_toy_sample)

    from mmalign.toy.video_build import add_build_video_parser

    add_build_video_parser(actions)

    from mmalign.toy.quickstart import DEFAULT_CONFIG

    p = subparsers.add_parser(
        "eval", help="compare model A with model B on paired prompts/seeds: win rate, reward means, 95%% CI"
    )
    p.add_argument("--model-a", default=str(DEFAULT_ASSET_DIR), help="pipeline of A (default: the toy base)")
    p.add_argument("--lora-a", help="LoRA loaded into A (e.g. a run's final/)")
    p.add_argument("--model-b", help="pipeline of B (default: same as A)")
    p.add_argument("--lora-b", help="LoRA loaded into B")
    p.add_argument("--negative-lora-a", help="NPO guidance on/off: A = B with this negative LoRA in its CFG branch")
    p.add_argument("--npo-alpha", type=float, default=1.0)
    p.add_argument("--npo-beta", type=float, default=1.0)
    p.add_argument("--family", default="auto")
    p.add_argument("--label-a")
    p.add_argument("--label-b")
    p.add_argument(
        "--prompts", help="text file, one prompt per line (default: the quickstart's held-out toy prompts)"
    )
    p.add_argument("--seeds-per-prompt", type=int, default=6)
    p.add_argument(
        "--seed", type=int, default=None, help="first seed (default: the quickstart's evaluation seeds)"
    )
    p.add_argument(
        "--reward",
        action="append",
        help="registry name; repeat for a suite, the first is primary (default: the quickstart suite)",
    )
    p.add_argument("--guidance", type=float, default=QUICKSTART_GUIDANCE)
    p.add_argument("--steps", type=int, default=QUICKSTART_STEPS)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--out", default="outputs/eval")
    p.set_defaults(func=cmd_eval)

    p = subparsers.add_parser(
        "quickstart",
        help="toy workflow end to end: generate -> score -> pairs -> Diffusion-DPO -> eval -> report",
    )
    p.add_argument("--out", default="outputs/quickstart")
    p.add_argument("--model", default=str(DEFAULT_ASSET_DIR))
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("overrides", nargs="*", help="recipe overrides, e.g. train.max_steps=100")
    p.set_defaults(func=cmd_quickstart)
