"""``mmalign`` command line: train | validate | ls | generate | score | label | eval | toy | quickstart.

Each subcommand is a function taking the parsed arguments and returning an exit code. Configs errors,
data errors and training errors print one clear line and exit 2 instead of a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

# Subcommand modules, each exposing register(subparsers). Explicit, in the order `--help` lists them.
COMMAND_MODULES = ["mmalign.commands.train", "mmalign.rewards.cli", "mmalign.commands.label_video", "mmalign.commands.cache",
                   "mmalign.toy.cli", "mmalign.commands.annotate"]


def cmd_generate(args: argparse.Namespace) -> int:
    import torch
    from torchvision.utils import save_image

    from mmalign.pipelines import load_pipeline

    pipe, _ = load_pipeline(args.model, family=args.family)
    if args.lora:
        pipe.load_lora_weights(args.lora)
    if args.negative_lora:
        from mmalign.pipelines.npo import enable_npo_guidance

        enable_npo_guidance(pipe, args.negative_lora, alpha=args.npo_alpha, beta=args.npo_beta)
    pipe.set_progress_bar_config(disable=False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = args.prompt * args.n
    images = []
    for i, prompt in enumerate(prompts):
        gen = torch.Generator().manual_seed(args.seed + i)
        img = pipe(prompt, num_inference_steps=args.steps, guidance_scale=args.guidance, generator=gen,
                   height=args.height, width=args.width, output_type="pt").images
        save_image(img.float(), out / f"{i:05d}.png")
        images.append(img)
    save_image(torch.cat(images).float(), out / "grid.png", nrow=min(8, len(images)))
    print(f"wrote {len(images)} images and grid.png to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmalign", description="Preference-tune diffusers image and video models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="sample images from a pipeline (optionally with a LoRA or NPO guidance)")
    p.add_argument("--model", required=True, help="hub id or local pipeline directory")
    p.add_argument("--family", default="auto")
    p.add_argument("--lora", help="LoRA directory from `mmalign train` (final/)")
    p.add_argument("--negative-lora", help="negative LoRA for NPO guidance")
    p.add_argument("--npo-alpha", type=float, default=1.0)
    p.add_argument("--npo-beta", type=float, default=1.0, help="negative = base + alpha (positive - base) + beta delta; alpha=beta=1 as the released scripts")
    p.add_argument("--prompt", action="append", required=True)
    p.add_argument("--n", type=int, default=1, help="images per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--out", default="outputs/generate")
    p.set_defaults(func=cmd_generate)

    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from mmalign.config import ConfigError
    from mmalign.data.images import DataError

    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except (ConfigError, DataError) as err:
        print(f"mmalign {args.command}: error: {err}", file=sys.stderr)
        code = 2
    except Exception as err:
        from mmalign.trainers.loop import TrainingError

        if not isinstance(err, TrainingError):
            raise
        print(f"mmalign {args.command}: training stopped: {err}", file=sys.stderr)
        code = 3
    if __name__ == "__main__" or argv is None:
        sys.exit(code)
    return code


if __name__ == "__main__":
    main()
