"""``mmalign toy build | render | sample`` and ``mmalign quickstart`` (``eval`` is ``mmalign/commands/eval.py``).

``register(subparsers)`` is called by :mod:`mmalign.cli`; each action is a function of the parsed
arguments returning an exit code.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mmalign.toy import DEFAULT_TOY_MODEL, DEFAULT_VIDEO_ASSET_DIR, QUICKSTART_CONFIG, QUICKSTART_GUIDANCE


def cmd_toy_build(args: argparse.Namespace) -> int:
    from mmalign.toy.build import ToyBuildConfig, toy_build

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
    images = generate(
        pipe, prompts, seeds, guidance_scale=args.guidance, steps=args.steps, progress="toy sample"
    )
    stats = toy_stats(images, prompts)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images[: args.grid], nrow=15, scale=args.scale).save(out)
    stats.update(n=args.n, guidance_scale=args.guidance, steps=args.steps)
    print(json.dumps(stats))
    print(f"wrote {out} (prompts in order: {', '.join(prompts[:3])}, ...)")
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from mmalign.commands.eval import is_toy_model
    from mmalign.commands.options import resolve_recipe
    from mmalign.pipelines import resolve_pretrained
    from mmalign.toy.quickstart import quickstart

    if not is_toy_model(resolve_pretrained(args.model)):
        print(
            f"mmalign quickstart: error: --model {args.model} is not a toy-world pipeline (a folder `mmalign toy build` "
            "wrote, with toy_build.json): the quickstart's prompts and rewards are the toy world's shapes and "
            "colours. For another model, chain generate -> score -> label -> train -> eval (README)",
            file=sys.stderr,
        )
        return 2
    quickstart(args.out, model=args.model, config=resolve_recipe(args.config), overrides=args.overrides)
    return 0


def cmd_toy_build_video(args: argparse.Namespace) -> int:
    from mmalign.toy.video_build import cmd_toy_build_video as build_video

    return build_video(args)


def _add_build_video_parser(actions: argparse._SubParsersAction) -> None:
    """Add ``build-video`` to the ``mmalign toy`` actions."""
    p = actions.add_parser(
        "build-video",
        help="train motion modules (and the UNet) on the toy image model -> the toy video "
        "pipeline (AnimateDiff, about 20-30 min, 2 cores)",
    )
    p.add_argument(
        "--out",
        required=True,
        help=f"output directory (to replace the shipped weights, pass {DEFAULT_VIDEO_ASSET_DIR} explicitly)",
    )
    p.add_argument("--base", default=str(DEFAULT_TOY_MODEL), help="toy image pipeline whose parts are reused")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a ToyVideoBuildConfig field")
    p.set_defaults(func=cmd_toy_build_video)


def register(subparsers) -> None:
    """Add ``toy`` with its ``build``, ``render`` and ``sample`` actions to ``mmalign``'s subparsers."""
    toy = subparsers.add_parser("toy", help="the toy shapes world: build its pipeline, render, sample")
    actions = toy.add_subparsers(dest="toy_command", required=True)

    p = actions.add_parser(
        "build", help="pretrain the tiny toy StableDiffusionPipeline (about 10-25 min, 2 cores)"
    )
    p.add_argument(
        "--out",
        required=True,
        help=f"output directory (to replace the shipped weights, pass {DEFAULT_TOY_MODEL} explicitly)",
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
    p.add_argument("--model", default=str(DEFAULT_TOY_MODEL))
    p.add_argument("--lora", help="LoRA directory to load first")
    p.add_argument("--n", type=int, default=450, help="samples, cycling over the 225 toy captions")
    p.add_argument("--seed", type=int, default=50_000)
    p.add_argument("--guidance", type=float, default=QUICKSTART_GUIDANCE)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--grid", type=int, default=60, help="images in the PNG")
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--out", default="outputs/toy/sample.png")
    p.set_defaults(func=cmd_toy_sample)

    _add_build_video_parser(actions)

    p = subparsers.add_parser(
        "quickstart",
        help="toy workflow end to end: generate -> score -> pairs -> Diffusion-DPO -> eval -> report",
    )
    p.add_argument("--out", default="outputs/quickstart")
    p.add_argument(
        "--model",
        default=str(DEFAULT_TOY_MODEL),
        help="a toy-world pipeline (`mmalign toy build`; default: shipped)",
    )
    p.add_argument("--config", default=str(QUICKSTART_CONFIG))
    p.add_argument("overrides", nargs="*", help="recipe overrides, e.g. train.max_steps=100")
    p.set_defaults(func=cmd_quickstart)
