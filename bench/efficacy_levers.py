"""Training levers of the quickstart's Diffusion-DPO on one run's pairs: train + evaluate only, one JSON line.

    python bench/efficacy.py --out DIR diffusion_dpo          # once: candidates, pairs, latent cache
    python bench/efficacy_levers.py --from DIR --name beta2500 method.beta=2500
    python bench/efficacy_levers.py --from DIR --name bw --pairing best_worst
    python bench/efficacy_levers.py --from DIR --name m02 --min-margin 0.2 train.max_steps=300
    python bench/efficacy_levers.py --from DIR --name inv --config configs/toy/inversion_dpo.yaml --eval-at 100,200

Generating and scoring the 1,408 candidates is the same for every training lever with the same base, so this
reuses the finished quickstart run in DIR: its ``pairs.jsonl`` (every pair above margin 0.05), its candidates
and its latent/text cache (``DIR/cache``). ``--pairing best_worst`` keeps each prompt's largest-margin pair and
``--min-margin M`` the pairs above M: the same pairs, in the same order, that ``mmalign label``'s pairing gives
with those options (both are subsets of the margin-0.05 pairs). The recipe is ``configs/toy/quickstart.yaml``
with the overrides; the evaluation is the quickstart's (48 held-out prompts x 6 seeds, tuned vs base), with the
base's samples generated once and kept in ``DIR/levers/base_eval.pt``. Output:
``{"name", "win_rate", "win_rate_ci", "toy_defect_win_rate", flaw rates with the drop's interval, ...}``.

``--config`` trains another pair recipe on the same pairs (e.g. ``configs/toy/inversion_dpo.yaml``; its
inversion cache goes beside the latent cache). ``--eval-at 100,200`` also evaluates the run's checkpoints at
those steps (one JSON line each, ``"step"`` set): win rate against steps for one training run.
"""

from __future__ import annotations

import argparse
import json
import math
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
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="the protocol's QuickstartOptions, as DIR was run with (e.g. guidance_scale=1.0)",
    )
    parser.add_argument("--config", default=None, help="the recipe (default: the quickstart's)")
    parser.add_argument(
        "--eval-at",
        default="",
        help="comma-separated steps whose checkpoints are evaluated too, e.g. 100,200",
    )
    parser.add_argument("overrides", nargs="*", help="recipe overrides, e.g. method.beta=2500")
    args = parser.parse_args(argv)

    import torch

    from mmalign.toy.quickstart import (
        DEFAULT_CONFIG,
        DEFAULT_TOY_MODEL,
        QuickstartOptions,
        eval_set,
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
    try:
        opts = QuickstartOptions.from_items(args.option)
    except ValueError as err:
        parser.error(f"--option: {err}")
    t0 = time.time()
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line]
    pairs = select_pairs(rows, args.pairing, args.min_margin)
    source = manifest
    if len(pairs) != len(rows):  # beside the original, so its relative media paths still resolve
        source = src / f"pairs-{args.name}.jsonl"
        source.write_text("".join(json.dumps(row) + "\n" for row in pairs))

    run_dir = src / "levers" / args.name / "run"
    eval_at = sorted({int(x) for x in args.eval_at.split(",") if x.strip()})
    checkpointing = (
        [f"train.checkpoint_every={math.gcd(*eval_at)}", f"train.checkpoints_total_limit={len(eval_at) + 1}"]
        if eval_at
        else []
    )
    cfg = load_config(
        args.config or DEFAULT_CONFIG,
        [
            f"model.pretrained={Path(model).resolve()}",
            f"data.source={source}",
            f"train.output_dir={run_dir}",
            f"data.cache_dir={src / 'cache'}",
            "train.overwrite=true",
            "train.progress=false",
            *checkpointing,
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
    points = [
        (step, export_checkpoint(run_dir, step, model, cfg)) for step in eval_at if step < summary["steps"]
    ]
    for step, lora in [*points, (summary["steps"], summary["export"])]:
        row = evaluate(model, lora, before, eval_p, eval_s, opts, run_dir.parent / f"step-{step}")
        row = {
            "name": args.name,
            "step": step,
            **row,
            "pairs": len(pairs),
            "steps": summary["steps"],
            "train_seconds": round(summary["seconds"], 1),
            "seconds": round(time.time() - t0, 1),
            "pairing": args.pairing,
            "min_margin": args.min_margin,
            "config": str(args.config or DEFAULT_CONFIG),
            "options": args.option,
            "overrides": args.overrides,
        }
        print(json.dumps(row), flush=True)
    return 0


def export_checkpoint(run_dir: Path, step: int, model: str, cfg) -> Path:
    """The LoRA of ``run_dir``'s checkpoint at ``step``, exported as ``train`` exports its final one."""
    from safetensors.torch import load_file

    from mmalign.toy.sample import load_toy_pipeline
    from mmalign.trainers.checkpoint import CHECKPOINT_PREFIX, TRAINABLE_FILE
    from mmalign.trainers.loop import add_lora, export

    ckpt = run_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{step}"
    pipe = load_toy_pipeline(model)
    add_lora(pipe.unet, cfg.lora)
    result = pipe.unet.load_state_dict(load_file(ckpt / TRAINABLE_FILE), strict=False)
    lora_keys = {k for k, _ in pipe.unet.named_parameters() if "lora_" in k}
    if result.unexpected_keys or lora_keys & set(result.missing_keys):
        raise RuntimeError(f"{ckpt}: does not hold this recipe's LoRA ({result})")
    return export(pipe, pipe.unet, "unet", cfg, run_dir.parent / f"step-{step}" / "lora")


def evaluate(model, lora, before, eval_p, eval_s, opts, out: Path) -> dict:
    """The quickstart's evaluation of ``lora`` against the base's samples ``before``; the row's metrics."""
    import torch

    from mmalign.toy.quickstart import FLAWS, evaluate_lora

    out.mkdir(parents=True, exist_ok=True)
    metrics, scored, flags, _ = evaluate_lora(model, lora, before, eval_p, eval_s, opts)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    # per-sample scores [tuned, base] per reward, for breakdowns (e.g. win rate on the base's flawed samples)
    torch.save({name: torch.stack(pair) for name, pair in scored.items()}, out / "scores.pt")
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
    return {
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
    }


if __name__ == "__main__":
    sys.exit(main())
