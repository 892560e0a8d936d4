"""Implicit preference accuracy of a tuned LoRA under forward noising, one JSON line out.

    python bench/implicit_accuracy.py --model DIR --lora RUN/final --pairs pairs.jsonl [--resolution 32] [--draws 8]

For every pair and ``--draws`` draws of (timestep, noise) shared by winner and loser, as Diffusion-DPO trains,
the pair counts as ranked right when the tuned model lowers its denoising error relative to the base more on the
winner than on the loser: ``(err_tuned_w - err_base_w) < (err_tuned_l - err_base_l)``. 0.5 means no preference
was learned *under forward noising*; a method that trains on other noisy inputs (Inversion-DPO's inverted x_t)
can score high there and near 0.5 here (issue 13). The base is the same network with the LoRA disabled.
The row also splits the draws into timestep bands: the accuracy per band and the relative change of the tuned
model's denoising error on winners and on losers (``err_change_w``/``_l``; > 0 means it denoises them worse).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# Timestep bands of the per-band rows: where in the schedule the tuned model ranks the pairs, and how its plain
# denoising error on winners and losers moved against the base's (err_change = tuned / base - 1).
BANDS = ((0, 100), (100, 300), (300, 600), (600, 1000))


def implicit_accuracy(
    model: str, lora: str, pairs: str, *, resolution: int = 32, draws: int = 8, seed: int = 0, batch: int = 32
) -> dict:
    from mmalign.config import ModelConfig
    from mmalign.data.pairs import PairDataset, collate_pairs, load_pairs
    from mmalign.data.setup import prepare_pair_batch
    from mmalign.pipelines import load_model
    from mmalign.trainers.common import TrainModels, noised_pairs, pair_errors, repeat_cond

    pipe, _, adapter = load_model(ModelConfig(pretrained=model, resolution=resolution))
    pipe.load_lora_weights(lora)
    denoiser = getattr(pipe, adapter.denoiser_name)
    models = TrainModels(adapter, denoiser)
    records, _ = load_pairs(pairs)
    data = PairDataset(records, resolution, random_flip=False, joint_crop=adapter.micro_conditioning)
    torch.manual_seed(seed)
    right, total = 0, 0
    # per band: right, n, tuned err w, base err w, tuned err l, base err l
    sums = {band: torch.zeros(6) for band in BANDS}
    with torch.no_grad():
        for start in range(0, len(data), batch):
            raw = collate_pairs([data[i] for i in range(start, min(start + batch, len(data)))])
            for _ in range(draws):
                b = prepare_pair_batch(raw, adapter, None, 0.0, resolution, torch.device("cpu"))
                noisy = noised_pairs(adapter, b["latents_w"], b["latents_l"])
                m_w, m_l, r_w, r_l = pair_errors(
                    models, noisy["xt"], noisy["t"], repeat_cond(b["cond"]), noisy["target"]
                )
                ok = (m_w - r_w) < (m_l - r_l)
                right += int(ok.sum())
                total += m_w.shape[0]
                t = noisy["t"][: m_w.shape[0]].cpu()
                for lo, hi in BANDS:
                    sel = (t >= lo) & (t < hi)
                    sums[lo, hi] += (
                        torch.stack(
                            [
                                ok[sel].sum(),
                                sel.sum(),
                                m_w[sel].sum(),
                                r_w[sel].sum(),
                                m_l[sel].sum(),
                                r_l[sel].sum(),
                            ]
                        )
                        .float()
                        .cpu()
                    )
    bands = [
        {
            "t": [lo, hi],
            "n": int(v[1]),
            "implicit_acc": round(float(v[0] / v[1]), 4),
            "err_change_w": round(float(v[2] / v[3] - 1), 4),
            "err_change_l": round(float(v[4] / v[5] - 1), 4),
        }
        for (lo, hi), v in sums.items()
        if v[1] > 0
    ]
    return {
        "implicit_acc_forward": round(right / total, 4),
        "n": total,
        "pairs": len(data),
        "draws": draws,
        "bands": bands,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the base pipeline (directory or hub id)")
    parser.add_argument("--lora", required=True, help="the tuned LoRA (a run's final/ directory)")
    parser.add_argument("--pairs", required=True, help="a pair manifest (prompt, chosen, rejected)")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--draws", type=int, default=8, help="(timestep, noise) draws per pair")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    row = implicit_accuracy(
        args.model, args.lora, args.pairs, resolution=args.resolution, draws=args.draws, seed=args.seed
    )
    print(json.dumps({"lora": args.lora, **row}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
