"""Self-NPO efficacy on the toy world: NPO-guided sampling vs plain CFG, no preference labels.

    python bench/efficacy_self_npo.py [--model mmalign/toy/assets/toy-sd] [--guidance 3] [--out DIR]

Protocol (same prompts split, seeds and rewards as ``mmalign/toy/quickstart.py``):

1. Self-NPO: train a LoRA negative model on the training prompts only (``configs/toy/self_npo.yaml``).
2. Diffusion-NPO (labelled baseline): sample ``candidates`` images per training prompt from the base at the
   evaluation guidance, score them with the toy training reward, pair best vs worst, train Diffusion-DPO on
   the swapped pairs (``configs/toy/diffusion_npo.yaml``).
3. For each negative model: paired evaluation on held-out prompts and seeds, NPO-guided (the negative LoRA
   in the unconditional CFG branch, alpha = beta = 1) vs plain CFG at the same guidance and steps; win rate
   under the training reward with a paired-bootstrap 95% interval (:func:`mmalign.toy.evaluate.evaluate_models`).

Prints one JSON line per method and writes ``summary.json`` under ``--out``. NPO guidance only acts with CFG, so
``--guidance`` must be > 1 (the quickstart samples at 1.0).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    from mmalign.toy.quickstart import QuickstartOptions
    from mmalign.toy.sample import DEFAULT_TOY_MODEL

    opts = QuickstartOptions()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_TOY_MODEL))
    parser.add_argument("--out", default=str(ROOT / "outputs" / "bench" / "efficacy-self_npo"))
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--steps", type=int, default=opts.steps)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--train-prompts", type=int, default=opts.train_prompts)
    parser.add_argument("--eval-prompts", type=int, default=opts.eval_prompts)
    parser.add_argument("--seeds-per-prompt", type=int, default=opts.eval_seeds_per_prompt)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--methods", default="self_npo,diffusion_npo")
    parser.add_argument(
        "--npo-betas",
        default="1.0,0.5",
        help="comma-separated NPO guidance beta values (the negative delta's scale), one evaluation row each; 1 = the released scripts; 0.5 measured better in most toy rows",
    )
    parser.add_argument("--npo-alpha", type=float, default=1.0, help="NPO guidance alpha (positive offset)")
    parser.add_argument(
        "--pairing",
        choices=("best_worst", "all"),
        default="best_worst",
        help="diffusion_npo: each prompt's best-vs-worst pair, or every candidate pair above margin 0.05",
    )
    parser.add_argument(
        "--tag", default="", help="suffix of each method's folder under --out, to keep several variants"
    )
    parser.add_argument(
        "--reuse-labels",
        action="store_true",
        help="diffusion_npo: reuse the candidates an earlier run in --out sampled and scored at this --guidance",
    )
    parser.add_argument(
        "--random-labels",
        action="store_true",
        help="diffusion_npo control: each pair's order is swapped with probability 1/2 (seed 0), so the negative "
        "learns from the same images with no preference in them",
    )
    parser.add_argument(
        "--real-images",
        action="store_true",
        help="self_npo with the released code's start=real: one clean rendered image per training prompt (the toy "
        "world's real data) in a JSONL manifest, and method.start=real",
    )
    parser.add_argument(
        "overrides", nargs="*", help="recipe overrides for both trainings, e.g. train.max_steps=100"
    )
    args = parser.parse_args(argv)
    if args.real_images and "self_npo" not in args.methods.split(","):
        parser.error("--real-images applies to self_npo (Self-NPO's start=real): add it to --methods")
    if args.guidance <= 1:
        parser.error("--guidance must be > 1: NPO guidance replaces the unconditional branch of CFG")
    rows = run(args)
    for row in rows:
        print(json.dumps(row))
    return 0


def run(args: argparse.Namespace) -> list[dict]:
    import torch

    from mmalign.pipelines.npo import npo_guided_pipeline
    from mmalign.toy.evaluate import evaluate_models
    from mmalign.toy.quickstart import (
        EVAL_SEED_BASE,
        TRAIN_SEED_BASE,
        eval_rewards,
        make_pairs,
        split_prompts,
        training_reward,
    )
    from mmalign.toy.sample import generate, load_toy_pipeline
    from mmalign.trainers import load_config
    from mmalign.trainers.loop import train

    log = lambda s: print(s, file=sys.stderr)  # noqa: E731
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    train_prompts, eval_prompts = split_prompts(args.train_prompts, args.eval_prompts)
    eval_p = [p for p in eval_prompts for _ in range(args.seeds_per_prompt)]
    eval_s = [EVAL_SEED_BASE + i for i in range(len(eval_p))]
    base = load_toy_pipeline(args.model)
    common = [
        f"model.pretrained={args.model}",
        f"model.resolution={args.size}",
        "train.progress=false",
        *args.overrides,
    ]
    rows = []
    for method in args.methods.split(","):
        t0 = time.time()
        label_seconds = 0.0
        run_dir = out / f"{method}{args.tag}"
        scored_file = out / f"diffusion_npo-candidates-cfg{args.guidance:g}.pt"
        extra = []
        if method == "self_npo" and args.real_images:
            from torchvision.utils import save_image

            from mmalign.toy.render import render_image

            (run_dir / "real").mkdir(parents=True, exist_ok=True)
            rows_real = []
            for i, prompt in enumerate(train_prompts):  # clean: no speckle, the prompt's colour
                path = run_dir / "real" / f"{i:04d}.png"
                save_image(render_image(prompt, seed=TRAIN_SEED_BASE + i, size=args.size), path)
                rows_real.append({"prompt": prompt, "image": str(path)})
            source = run_dir / "real.jsonl"
            source.write_text("".join(json.dumps(r) + "\n" for r in rows_real))
            n_data, extra = len(train_prompts), ["method.start=real"]
        elif method == "self_npo":
            source = run_dir / "prompts.txt"
            source.parent.mkdir(parents=True, exist_ok=True)
            source.write_text("\n".join(train_prompts) + "\n")
            n_data = len(train_prompts)
        elif method == "diffusion_npo":
            from torchvision.utils import save_image

            cand_p = [p for p in train_prompts for _ in range(args.candidates)]
            cand_s = [TRAIN_SEED_BASE + i for i in range(len(cand_p))]
            if args.reuse_labels and scored_file.is_file():
                saved = torch.load(scored_file)
                if saved["prompts"] != cand_p:
                    raise SystemExit(f"{scored_file}: other candidates (prompts or --candidates differ)")
                scores, paths = saved["scores"], saved["paths"]
                log(f"{method}: reusing the {len(cand_p)} scored candidates in {scored_file}")
            else:
                log(f"{method}: sampling and scoring {len(cand_p)} candidates at CFG {args.guidance}")
                images = generate(
                    base, cand_p, cand_s, guidance_scale=args.guidance, steps=args.steps, size=args.size
                )
                scores = training_reward()(images, cand_p).float().cpu()
                folder = out / f"candidates-cfg{args.guidance:g}"  # one folder per guidance, as scored_file
                folder.mkdir(parents=True, exist_ok=True)
                paths = []
                for i, img in enumerate(images):
                    paths.append(str(folder / f"{i:05d}.png"))
                    save_image(img, paths[-1])
                torch.save({"prompts": cand_p, "scores": scores, "paths": paths}, scored_file)
            pairs = make_pairs(cand_p, scores, paths, 0.05, pairing=args.pairing)
            if not pairs:
                raise RuntimeError("no candidate pair has a reward margin > 0.05; raise --candidates")
            if args.random_labels:
                coin = torch.rand(len(pairs), generator=torch.Generator().manual_seed(0)) < 0.5
                for pair, swap in zip(pairs, coin.tolist()):
                    if swap:
                        pair["chosen"], pair["rejected"] = pair["rejected"], pair["chosen"]
            source = run_dir / "pairs.jsonl"
            run_dir.mkdir(parents=True, exist_ok=True)
            source.write_text("".join(json.dumps(p) + "\n" for p in pairs))
            n_data = len(pairs)
            label_seconds = time.time() - t0
        else:
            raise ValueError(f"unknown method {method!r}: self_npo or diffusion_npo")
        cfg = load_config(
            ROOT / "configs" / "toy" / f"{method}.yaml",
            [
                *common,
                *extra,
                f"data.source={source}",
                f"train.output_dir={run_dir / 'run'}",
                "train.overwrite=true",
            ],
        )
        log(f"{method}: training on {n_data} {'prompts' if method == 'self_npo' else 'pairs'}")
        summary = train(cfg).summary
        from mmalign.pipelines.npo import disable_npo_guidance

        for npo_beta in [float(b) for b in args.npo_betas.split(",")]:
            guided = npo_guided_pipeline(base, summary["export"], alpha=args.npo_alpha, beta=npo_beta)
            torch.manual_seed(0)
            metrics = evaluate_models(
                guided,
                base,
                eval_p,
                eval_s,
                eval_rewards(),
                run_dir / f"eval-beta{npo_beta:g}",
                guidance_scale=args.guidance,
                steps=args.steps,
                size=args.size,
                label_a=f"{method}-guided",
                label_b="CFG",
                log=log,
            )
            disable_npo_guidance(guided)
            rows.append(
                {
                    "method": method,
                    "labels_used": method != "self_npo",
                    "data_items": n_data,
                    "win_rate": round(metrics["win_rate"], 4),
                    "win_rate_ci": [round(x, 4) for x in metrics["win_rate_ci"]],
                    "n": metrics["n"],
                    "guidance": args.guidance,
                    "npo_alpha": args.npo_alpha,
                    "npo_beta": npo_beta,
                    "pairing": args.pairing if method == "diffusion_npo" else None,
                    "random_labels": args.random_labels if method == "diffusion_npo" else None,
                    "overrides": list(args.overrides),
                    "sample_steps": args.steps,
                    "train_steps": summary["steps"],
                    "train_seconds": round(summary["seconds"], 1),
                    "label_seconds": round(label_seconds, 1),
                    "mean_reward_guided": round(metrics["mean_reward_a"]["training_reward"], 4),
                    "mean_reward_cfg": round(metrics["mean_reward_b"]["training_reward"], 4),
                    "color_correct_guided": round(metrics["mean_reward_a"]["toy_color_correct"], 4),
                    "color_correct_cfg": round(metrics["mean_reward_b"]["toy_color_correct"], 4),
                    "total_seconds": round(time.time() - t0, 1),
                }
            )
    (out / f"summary{args.tag}.json").write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    sys.exit(main())
