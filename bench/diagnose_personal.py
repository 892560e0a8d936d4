"""Diagnostics over an ``efficacy_personal.py --out DIR`` folder: do the user vectors carry the person, and does the
trained generator's prediction change with the vector? (BENCHMARKS.md "Personalisation efficacy".)

- vectors: a ridge readout fitted on the training users' group vectors, scored on the unseen users' 4-shot vectors
  (sign of each hidden weight, correlation); mean cosine between users by how many preferred sides they share;
- generator (``--run run_mean_diff``): L2 change of the UNet's noise prediction when the user vector is added, between
  users with opposite sides, and for the text (prompt vs empty), at a few timesteps.

Run: ``python bench/diagnose_personal.py --out outputs/bench_personal --run run_mean_diff`` (seconds, one thread).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def unseen_vectors(out: Path, fingerprint: dict) -> dict[str, torch.Tensor]:
    """The unseen users' 4-shot vectors from the bench's embedding cache (one entry per user and encoder)."""
    from safetensors import safe_open

    found = {}
    for p in (out / "user_cache").glob("*.safetensors"):
        with safe_open(str(p), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("user", "").startswith("u") and json.loads(meta.get("encoder", "{}")) == fingerprint:
                found[meta["user"]] = f.get_tensor("vector")
    return found


def vectors_report(out: Path, encoder: str) -> tuple[dict, dict[str, torch.Tensor]]:
    from mmalign.personalize.encoders import load_user_vectors
    from mmalign.toy.users import population

    train_users, unseen_users = population(seed=0)
    weights = {u.id: torch.tensor(u.weights) for u in train_users + unseen_users}
    vecs, fingerprint = load_user_vectors(out / f"user_vectors_{encoder}.safetensors")
    unseen = unseen_vectors(out, fingerprint)
    ids, uids = sorted(vecs), sorted(unseen)
    x = torch.cat([vecs[u] for u in ids])
    y = torch.stack([weights[u] for u in ids for _ in range(len(vecs[u]))])
    readout = torch.linalg.solve(x.T @ x + torch.eye(x.shape[1]), x.T @ y)
    xu, yu = torch.stack([unseen[u] for u in uids]), torch.stack([weights[u] for u in uids])
    pred = xu @ readout
    report: dict = {"train_users": len(ids), "unseen_users": len(uids), "readout_on_unseen": {}}
    for j, k in enumerate(("w_x", "w_y", "w_size")):
        report["readout_on_unseen"][k] = {
            "corr": round(torch.corrcoef(torch.stack([pred[:, j], yu[:, j]]))[0, 1].item(), 3),
            "sign_right": f"{int((pred[:, j].sign() == yu[:, j].sign()).sum())}/{len(uids)}",
        }
    for label, group, vs in (
        ("train", ids, {u: vecs[u].mean(0) for u in ids}),
        ("unseen", uids, unseen),
    ):
        v = F.normalize(torch.stack([vs[u] for u in group]), dim=1)
        cos = v @ v.T
        signs = torch.stack([weights[u][:2].sign() for u in group])
        agree = signs @ signs.T  # +2 same sides, 0 one differs, -2 opposite
        off = ~torch.eye(len(group), dtype=torch.bool)
        report[f"cos_{label}"] = {
            name: round(cos[(agree == a) & off].mean().item(), 3)
            for name, a in (("same_sides", 2), ("one_side_differs", 0), ("opposite_sides", -2))
        }
    return report, unseen


@torch.no_grad()
def generator_report(out: Path, run: str, unseen: dict[str, torch.Tensor]) -> dict:
    from mmalign.personalize.attention import load_user_adapter
    from mmalign.toy.sample import load_toy_pipeline

    pipe = load_toy_pipeline()
    load_user_adapter(pipe, out / run / "final")
    unet, tok = pipe.unet, pipe.tokenizer

    def encode(texts):
        ids = tok(
            texts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
        )
        return pipe.text_encoder(ids.input_ids)[0]

    prompts = ["a red circle", "a blue square", "a green triangle", "a small yellow circle"]
    text, empty = encode(prompts), encode([""] * len(prompts))
    uids = sorted(unseen)
    own = torch.stack([unseen[uids[i]] for i in range(4)])
    opposite = torch.stack([unseen[uids[i ^ 3]] for i in range(4)])  # population() cycles the 4 sign patterns
    lat = torch.randn(4, unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))

    def eps(c, u, t):
        return unet(lat, t, encoder_hidden_states=c, added_cond_kwargs={"image_embeds": [u[:, None]]}).sample

    def norm(d):
        return round(d.flatten(1).norm(dim=1).mean().item(), 4)

    rows = {}
    for t in (900, 600, 300, 50):
        tt = torch.full((4,), t)
        zero = eps(text, torch.zeros_like(own), tt)
        with_user = eps(text, own, tt)
        rows[t] = {
            "user_vs_none": norm(with_user - zero),
            "user_vs_opposite_user": norm(with_user - eps(text, opposite, tt)),
            "text_vs_empty": norm(zero - eps(empty, torch.zeros_like(own), tt)),
            "prediction": norm(zero),
        }
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/bench_personal", help="the bench's --out folder")
    ap.add_argument("--encoder", default="mean_diff")
    ap.add_argument(
        "--run", default="", help="a personalised generator's run folder in --out (e.g. run_mean_diff)"
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    if not (out / f"user_vectors_{args.encoder}.safetensors").is_file():
        raise SystemExit(
            f"{out}: no user_vectors_{args.encoder}.safetensors (run bench/efficacy_personal.py first)"
        )
    report, unseen = vectors_report(out, args.encoder)
    if args.run:
        report["generator"] = generator_report(out, args.run, unseen)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
