"""What a Diffusion-NPO negative learns where NPO guidance queries it: the empty prompt.

    python bench/efficacy_self_npo.py --out DIR --methods diffusion_npo [--tag T ...]   # the negatives
    python bench/npo_null_branch.py DIR/diffusion_npo DIR/diffusion_npo_T ...           # one JSON line each

For each run folder (its ``pairs.jsonl`` and ``run/final`` LoRA), on the quickstart's held-out prompts and seeds:

- the palette colour of the pairs' chosen and rejected images, and how often each matches its prompt;
- the dominant colour of the negative's own samples at the empty prompt without CFG (the branch NPO guidance
  replaces) against the base's, seed by seed (``uncond_same_colour``);
- NPO-guided sampling against plain CFG at ``--guidance``: colour-correct rates, and which prompt colours the
  negative fixes or breaks (and what the broken samples turn into).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path


def colour_counts(names) -> dict:
    return dict(collections.Counter(str(n) for n in names).most_common())


def main(argv: list[str] | None = None) -> int:
    from mmalign.toy.sample import DEFAULT_TOY_MODEL

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="bench/efficacy_self_npo.py diffusion_npo run folders")
    parser.add_argument("--model", default=str(DEFAULT_TOY_MODEL))
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args(argv)
    for run in map(Path, args.runs):
        for need in (run / "pairs.jsonl", run / "run" / "final"):
            if not need.exists():
                parser.error(f"{need}: not found (a bench/efficacy_self_npo.py diffusion_npo run folder?)")

    import torch
    from torchvision.io import read_image

    from mmalign.pipelines.npo import disable_npo_guidance, npo_guided_pipeline
    from mmalign.toy.quickstart import EVAL_SEED_BASE, QuickstartOptions, split_prompts
    from mmalign.toy.render import parse_caption
    from mmalign.toy.rewards import dominant_color
    from mmalign.toy.sample import generate, load_toy_pipeline

    opts = QuickstartOptions()
    _, eval_prompts = split_prompts(opts.train_prompts, opts.eval_prompts)
    prompts = [p for p in eval_prompts for _ in range(opts.eval_seeds_per_prompt)]
    seeds = [EVAL_SEED_BASE + i for i in range(len(prompts))]
    want = [parse_caption(p).color for p in prompts]
    kw = {"steps": args.steps, "size": args.size}
    base = load_toy_pipeline(args.model)
    cfg_names = dominant_color(generate(base, prompts, seeds, guidance_scale=args.guidance, **kw))
    null_base = dominant_color(generate(base, [""] * len(prompts), seeds, guidance_scale=1.0, **kw))
    for run in map(Path, args.runs):
        lora = str(run / "run" / "final")
        pairs = [json.loads(line) for line in (run / "pairs.jsonl").read_text().splitlines()]
        row: dict = {"run": run.name, "pairs": len(pairs)}
        for side in ("chosen", "rejected"):
            images = torch.stack([read_image(p[side])[:3].float() / 255 for p in pairs])
            names = dominant_color(images)
            hits = [n == parse_caption(p["prompt"]).color for n, p in zip(names, pairs)]
            row[f"{side}_colour_correct"] = round(sum(hits) / len(hits), 3)
            row[f"{side}_colours"] = colour_counts(names)
        negative = load_toy_pipeline(args.model)
        negative.load_lora_weights(lora)
        null_neg = dominant_color(generate(negative, [""] * len(prompts), seeds, guidance_scale=1.0, **kw))
        row["uncond_base_colours"] = colour_counts(null_base)
        row["uncond_negative_colours"] = colour_counts(null_neg)
        row["uncond_same_colour"] = round(sum(a == b for a, b in zip(null_base, null_neg)) / len(prompts), 3)
        guided = npo_guided_pipeline(base, lora, alpha=1.0, beta=1.0)
        g_names = dominant_color(generate(guided, prompts, seeds, guidance_scale=args.guidance, **kw))
        disable_npo_guidance(guided)
        trio = list(zip(want, g_names, cfg_names))
        row["guided_colour_correct"] = round(sum(g == w for w, g, _ in trio) / len(trio), 3)
        row["cfg_colour_correct"] = round(sum(c == w for w, _, c in trio) / len(trio), 3)
        row["fixed_by_prompt_colour"] = colour_counts(w for w, g, c in trio if g == w and c != w)
        row["broken_by_prompt_colour"] = colour_counts(w for w, g, c in trio if g != w and c == w)
        row["broken_into"] = colour_counts(g for w, g, c in trio if g != w and c == w)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
