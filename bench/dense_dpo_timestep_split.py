"""Where in the sampling trajectory a tuned toy-video LoRA changes flicker and colour.

    python bench/efficacy_dense_dpo.py --out DIR --seed 1 --methods dense train.learning_rate=3e-4
    python bench/dense_dpo_timestep_split.py DIR/runs/dense/final --seed 1      # one JSON line per split

Text-to-video on the efficacy bench's held-out prompts for ``--seed`` (15 prompts x 8 seeds, 10 DDIM steps, no
CFG), with the LoRA switched on only for the sampling steps whose timestep is at or above (``t>=T``) or below
(``t<T``) each split point, the base elsewhere; every row is compared clip by clip with the base (flicker win rate
and rate, ``toy_color`` win rate with its bootstrap interval).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lora", help="a DenseDPO LoRA (runs/<method>/final)")
    parser.add_argument("--seed", type=int, default=0, help="the efficacy bench's --seed (its prompt split)")
    parser.add_argument("--model", default=None, help="toy video pipeline (default: the shipped toy-video)")
    parser.add_argument("--splits", default="700,400", help="comma-separated timesteps T")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if not Path(args.lora).exists():
        parser.error(f"{args.lora}: not found (a DenseDPO run's final/ LoRA)")

    import torch
    from efficacy_dense_dpo import split, video_prompts

    from mmalign.pipelines import load_pipeline
    from mmalign.toy.evaluate import paired_stats
    from mmalign.toy.rewards import color_match, flicker
    from mmalign.toy.sample import generate
    from mmalign.toy.video_build import DEFAULT_VIDEO_ASSET_DIR

    torch.set_num_threads(args.threads)
    _, eval_prompts = split(video_prompts(), 15, args.seed)
    prompts = [p for p in eval_prompts for _ in range(8)]
    seeds = [1_000_000 + i for i in range(len(prompts))]
    pipe, _ = load_pipeline(args.model or str(DEFAULT_VIDEO_ASSET_DIR))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(args.lora)
    unet, plain_forward = pipe.unet, pipe.unet.forward
    lora_on = {"at": lambda t: True}

    def forward(sample, timestep, *rest, **kwargs):
        t = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
        (unet.enable_adapters if lora_on["at"](t) else unet.disable_adapters)()
        return plain_forward(sample, timestep, *rest, **kwargs)

    unet.forward = forward

    def scores() -> dict:
        videos = generate(pipe, prompts, seeds, guidance_scale=1.0, steps=10, size=32, num_frames=8)
        score = flicker(segments=4)(videos)
        return {"flicker": score, "flickers": (score < 0.5).double(), "color": color_match()(videos, prompts)}

    lora_on["at"] = lambda t: False
    base = scores()
    variants = [("all", lambda t: True)]
    for point in (float(x) for x in args.splits.split(",")):
        variants += [(f"t>={point:g}", lambda t, p=point: t >= p), (f"t<{point:g}", lambda t, p=point: t < p)]
    for name, rule in variants:
        lora_on["at"] = rule
        tuned = scores()
        colour = paired_stats(tuned["color"], base["color"])
        row = {
            "lora_on": name,
            "flicker_win": paired_stats(tuned["flicker"], base["flicker"])["win_rate"],
            "flicker_rate": tuned["flickers"].mean().item(),
            "flicker_rate_base": base["flickers"].mean().item(),
            "colour_win": colour["win_rate"],
            "colour_win_ci": colour["win_rate_ci"],
            "colour": tuned["color"].mean().item(),
            "colour_base": base["color"].mean().item(),
        }
        rounded = {k: [round(x, 3) for x in v] if isinstance(v, list) else v for k, v in row.items()}
        print(
            json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in rounded.items()}),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
