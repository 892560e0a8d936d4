"""Training levers of the quickstart's Diffusion-DPO on one run's pairs: train + evaluate only, one JSON line.

    python bench/efficacy.py --out DIR diffusion_dpo          # once: candidates, pairs, latent cache
    python bench/efficacy_levers.py --from DIR --name beta2500 method.beta=2500
    python bench/efficacy_levers.py --from DIR --name bw --pairing best_worst
    python bench/efficacy_levers.py --from DIR --name m02 --min-margin 0.2 train.max_steps=300

Generating and scoring the 1,408 candidates is the same for every training lever with the same base, so this
reuses the finished quickstart run in DIR: its ``pairs.jsonl`` (every pair above margin 0.05), its candidates
and its latent/text cache (``DIR/cache``). ``--pairing best_worst`` keeps each prompt's largest-margin pair and
``--min-margin M`` the pairs above M: the same pairs, in the same order, that ``mmalign label``'s pairing gives
with those options (both are subsets of the margin-0.05 pairs). The recipe is ``configs/toy/quickstart.yaml``
with the overrides; the evaluation is the quickstart's (48 held-out prompts x 6 seeds, tuned vs base), with the
base's samples generated once and kept in ``DIR/levers/base_eval.pt``. Output:
``{"name", "win_rate", "win_rate_ci", "toy_defect_win_rate", flaw rates with the drop's interval, ...}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def select_pairs(rows: list[dict], pairing: str, min_margin: float) -> list[dict]:
    """The subset of the margin-0.05 pairs that ``pairing`` / ``min_margin`` would have built."""
    if pairing == "best_worst":
        best: dict[str, dict] = {}
        for row in rows:  # the best-vs-worst pair is each prompt's largest-margin pair
            if row["prompt"] not in best or row["margin"] > best[row["prompt"]]["margin"]:
                best[row["prompt"]] = row
        rows = list(best.values())
    return [row for row in rows if row["margin"] > min_margin]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--from", dest="source", required=True, help="a finished `bench/efficacy.py --out` folder"
    )
    parser.add_argument("--name", required=True, help="the variant's name (its run goes to DIR/levers/NAME)")
    parser.add_argument("--pairing", choices=("all", "best_worst"), default="all")
    parser.add_argument("--min-margin", type=float, default=0.05, help="keep pairs above this margin")
    parser.add_argument("--model", default=None, help="the base toy pipeline DIR was built from")
    parser.add_argument(
        "--eval-only", action="store_true", help="evaluate DIR/levers/NAME/run/final again, no training"
    )
    parser.add_argument("overrides", nargs="*", help="recipe overrides, e.g. method.beta=2500")
    args = parser.parse_args(argv)

    import torch

    from mmalign.toy.quickstart import (
        DEFAULT_CONFIG,
        DEFAULT_TOY_MODEL,
        FLAWS,
        QuickstartOptions,
        eval_set,
        evaluate_lora,
    )
    from mmalign.toy.sample import generate, load_toy_pipeline
    from mmalign.trainers import load_config
    from mmalign.trainers.loop import train

    src = Path(args.source).resolve()
    manifest = src / "pairs.jsonl"
    if not manifest.is_file():
        print(f"bench/efficacy_levers.py: {manifest} not found; run bench/efficacy.py --out {src} first")
        return 2
    model = args.model or DEFAULT_TOY_MODEL
    opts = QuickstartOptions()
    t0 = time.time()
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line]
    pairs = select_pairs(rows, args.pairing, args.min_margin)
    source = manifest
    if len(pairs) != len(rows):  # beside the original, so its relative media paths still resolve
        source = src / f"pairs-{args.name}.jsonl"
        source.write_text("".join(json.dumps(row) + "\n" for row in pairs))

    run_dir = src / "levers" / args.name / "run"
    cfg = load_config(
        DEFAULT_CONFIG,
        [
            f"model.pretrained={Path(model).resolve()}",
            f"data.source={source}",
            f"train.output_dir={run_dir}",
            f"data.cache_dir={src / 'cache'}",
            "train.overwrite=true",
            "train.progress=false",
            *args.overrides,
        ],
    )
    if args.eval_only:  # the variant's trained LoRA, evaluated again (e.g. by a newer version of this script)
        summary = {"export": run_dir / "final", "steps": cfg.train.max_steps, "seconds": float("nan")}
    else:
        result = train(cfg)
        summary = getattr(result, "summary", result)

    eval_p, eval_s = eval_set(opts)
    base_eval = src / "levers" / "base_eval.pt"
    if base_eval.is_file():
        before = torch.load(base_eval)
    else:
        before = generate(
            load_toy_pipeline(model),
            eval_p,
            eval_s,
            progress="eval base",
            guidance_scale=opts.guidance_scale,
            steps=opts.steps,
        )
        torch.save(before, base_eval)
    metrics, scored, flags, _ = evaluate_lora(model, summary["export"], before, eval_p, eval_s, opts)
    (run_dir.parent / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    # per-sample scores [tuned, base] per reward, for breakdowns (e.g. win rate on the base's flawed samples)
    torch.save({name: torch.stack(pair) for name, pair in scored.items()}, run_dir.parent / "scores.pt")
    tuned_wins = scored["training_reward"][0] > scored["training_reward"][1]
    flawed = flags["base"][FLAWS[2]]

    def flaw(key: str) -> dict:
        f = metrics["flaws"][key]
        return {
            "base": round(f["rate_b"], 4),
            "tuned": round(f["rate_a"], 4),
            "drop_ci": [round(x, 4) for x in f["drop_ci"]],
            "fixed": f["fixed"],
            "broken": f["broken"],
        }

    rewards = metrics["rewards"]
    row = {
        "name": args.name,
        "win_rate": round(metrics["win_rate"], 4),
        "win_rate_ci": [round(x, 4) for x in metrics["win_rate_ci"]],
        "n": metrics["n"],
        "toy_defect_win_rate": round(rewards["toy_defect"]["win_rate"], 4),
        "toy_color_mean_win_rate": round(rewards["toy_color_mean"]["win_rate"], 4),
        "toy_shape_win_rate": round(rewards["toy_shape (not trained on)"]["win_rate"], 4),
        # where the wins come from: the base samples with a flaw, and the clean ones
        "win_rate_base_flawed": round(tuned_wins[flawed].float().mean().item(), 4),
        "win_rate_base_clean": round(tuned_wins[~flawed].float().mean().item(), 4),
        "mean_reward_tuned": round(metrics["mean_reward_a"]["training_reward"], 4),
        "mean_reward_base": round(metrics["mean_reward_b"]["training_reward"], 4),
        **{name: flaw(key) for name, key in zip(("speckle", "wrong_colour", "either"), FLAWS)},
        "pairs": len(pairs),
        "steps": summary["steps"],
        "train_seconds": round(summary["seconds"], 1),
        "seconds": round(time.time() - t0, 1),
        "pairing": args.pairing,
        "min_margin": args.min_margin,
        "overrides": args.overrides,
    }
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
