"""Personalisation efficacy on the toy world (issue 11): unseen users, 4 shots each, under each user's hidden reward.

Protocol (mmalign/toy/users.py): 48 training users and 16 unseen users with conflicting hidden preferences on
the shape's position and size. The toy base samples candidates for training prompts; each training user labels
pairs among them with their own reward; user vectors come from few-shot groups of 4 of their pairs. A
user-conditioned generator (personal_dpo, through the one training loop) is trained per encoder, and a pooled
Diffusion-DPO LoRA on the same pairs without users. Each unseen user gives 4 shots (pairs of base candidates of
other prompts, labelled by their reward); their vector conditions the generator on held-out prompts and seeds,
paired with the base (same noise). Reported (paired bootstrap 95% intervals, ties 0.5):

- ``win_rate``: personalised (``--main`` encoder) vs base;
- ``vs_pooled``: personalised vs pooled Diffusion-DPO;
- ``vs_shuffled``: the user's own vector vs another unseen user's vector (a seeded derangement; same generator);
- ``vs_opposite``: the user's own vector vs that of the unseen user who prefers the opposite sides on both axes;
- ``mean_gain``: the mean reward gain over the base (reward units = within-prompt standard deviations);
- ``encoders``: the same numbers for every encoder;
- ``pal_accuracy`` vs ``shared_accuracy``: PAL-B fitted from the 4 shots vs one shared reward (K=1) on the
  unseen users' held-out pairs.

Run: ``nice python bench/efficacy_personal.py`` (prints one JSON line; ``--out`` keeps the files). A recipe variant:
``--encoders mean_diff --set train.learning_rate=3e-4`` (its own run folder; candidates, pairs, the pooled model and
the base/pooled samples of the same ``--out`` are reused). BENCHMARKS.md has the measured levers.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FEATURES = "mmalign.toy.users:toy_features"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def save_images(images: torch.Tensor, folder: Path, start: int = 0) -> list[str]:
    from mmalign.toy.render import to_pil

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, im in enumerate(images):
        p = folder / f"{start + i:05d}.png"
        to_pil(im).save(p)
        paths.append(str(p))
    return paths


def train_or_reuse(cfg, train) -> dict:
    """Train, or reuse a finished run of the same resolved config (a rerun after a crash skips training)."""
    from mmalign.config import to_dict

    out = Path(cfg.train.output_dir)
    stamp = json.dumps(to_dict(cfg), sort_keys=True, default=str)
    if (
        (out / "summary.json").is_file()
        and (out / "bench_config.json").is_file()
        and (out / "bench_config.json").read_text() == stamp
    ):
        log(f"reusing the finished run {out}")
        return json.loads((out / "summary.json").read_text())
    summary = train(cfg).summary
    (out / "bench_config.json").write_text(stamp)
    return summary


def run_name(encoder: str, overrides: list[str]) -> str:
    """The personalised generator's run folder: one per encoder and set of recipe overrides."""
    if not overrides:
        return f"run_{encoder}"
    import hashlib

    return f"run_{encoder}_" + hashlib.sha256("\n".join(overrides).encode()).hexdigest()[:8]


def cached_samples(folder: Path, spec: dict, make) -> torch.Tensor:
    """Evaluation samples that do not depend on the personalised generator (base, pooled), kept beside their spec:
    a rerun with another personal_dpo variant (``--set``) reuses them instead of sampling again."""
    stamp = json.dumps(spec, sort_keys=True, default=str)
    if (folder / "spec.json").is_file() and (folder / "spec.json").read_text() == stamp:
        return torch.load(folder / "images.pt")
    images = make()
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(images, folder / "images.pt")
    (folder / "spec.json").write_text(stamp)
    return images


class one_thread:
    """Tiny ops (PAL fitting, small MLPs) run faster on one thread than on two contended ones."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)


def shuffled_partners(ids: list[str], *, seed: int = 0) -> dict[str, str]:
    """A seeded derangement: every user gets another, randomly drawn, user's vector (the shuffled control)."""
    rng = random.Random(f"shuffle:{seed}")
    while True:
        perm = ids[:]
        rng.shuffle(perm)
        if all(a != b for a, b in zip(ids, perm)):
            return dict(zip(ids, perm))


def reload_png(images: torch.Tensor) -> torch.Tensor:
    """Round to 8 bits as the PNG files hold them (shots and pairs are read back from PNG)."""
    return (images * 255).round() / 255


def measure(args) -> dict:
    from mmalign.toy.render import all_captions
    from mmalign.toy.sample import generate, load_toy_pipeline
    from mmalign.toy.users import attributes

    pipe = load_toy_pipeline()
    prompts = [p for p in all_captions() for _ in range(8)]
    images = generate(
        pipe, prompts, list(range(len(prompts))), guidance_scale=args.guidance, steps=args.steps
    )
    out = {}
    for k, v in attributes(images).items():
        if k == "mass":
            continue
        out[k] = {
            "mean": round(v.mean().item(), 3),
            "std": round(v.std().item(), 3),
            "within_prompt_std": round(v.view(-1, 8).std(1).mean().item(), 3),
        }
    return {"measure": out, "n": len(prompts)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/bench_personal")
    ap.add_argument("--encoders", default="mean_diff,pal,vlm")
    ap.add_argument("--main", default="mean_diff", help="encoder whose numbers are the top-level ones")
    ap.add_argument("--train-prompts", type=int, default=64)
    ap.add_argument("--shot-prompts", type=int, default=24)
    ap.add_argument("--eval-prompts", type=int, default=48)
    ap.add_argument("--candidates", type=int, default=6)
    ap.add_argument("--prompts-per-user", type=int, default=16)
    ap.add_argument("--eval-per-user", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20, help="sampler steps")
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--scale", type=float, default=1.0, help="user path scale at sampling")
    ap.add_argument("--pal-k", type=int, default=8)
    ap.add_argument(
        "--vlm-groups", type=int, default=3, help="shot groups per training user for the (slow) vlm encoder"
    )
    ap.add_argument(
        "--shuffled-all",
        action="store_true",
        help="the shuffled-vector control for every encoder (default: --main only)",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override of configs/toy/personal_dpo.yaml for the personalised generators (repeatable)",
    )
    ap.add_argument("--measure", action="store_true", help="only measure how the base's samples vary")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    if args.measure:
        print(json.dumps(measure(args)))
        return
    t_start = time.time()
    result = run(args)
    result["seconds"] = round(time.time() - t_start, 1)
    print(json.dumps(result))


def run(args) -> dict:
    from mmalign.data.pairs import load_pairs
    from mmalign.data.users import decode_shots, user_groups
    from mmalign.personalize.attention import load_user_adapter, user_embeds_for_pipeline
    from mmalign.personalize.encoders import embed_users, get_encoder, save_user_vectors
    from mmalign.personalize.pal import fit_user, load_head, save_pal, train_pal
    from mmalign.toy.evaluate import paired_stats
    from mmalign.toy.quickstart import all_toy_prompts
    from mmalign.toy.sample import DEFAULT_TOY_MODEL, generate, load_toy_pipeline
    from mmalign.toy.users import label_pairs, population, toy_features
    from mmalign.trainers import load_config
    from mmalign.trainers.loop import train

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    timings: dict[str, float] = {}
    encoders = [e for e in args.encoders.split(",") if e]
    train_users, unseen_users = population(seed=args.seed)
    prompts = all_toy_prompts()
    rng.shuffle(prompts)
    train_prompts = prompts[: args.train_prompts]
    shot_prompts = prompts[args.train_prompts : args.train_prompts + args.shot_prompts]
    eval_prompts = prompts[args.train_prompts + args.shot_prompts :][: args.eval_prompts]
    base = load_toy_pipeline()
    sample = dict(guidance_scale=args.guidance, steps=args.steps)

    # 1. candidates of the base for training prompts and for unseen users' shots
    t0 = time.time()
    c_prompts = [p for p in train_prompts + shot_prompts for _ in range(args.candidates)]
    c_seeds = [10_000 + i for i in range(len(c_prompts))]
    log(f"1 candidates: {len(c_prompts)} images")
    stamp = out / "candidates" / "spec.json"
    spec = json.dumps({"prompts": c_prompts, "seeds": c_seeds, **sample})
    if stamp.is_file() and stamp.read_text() == spec:  # same protocol: reuse the PNGs of an earlier run
        from mmalign.rewards.score import load_media

        paths = [str(out / "candidates" / f"{i:05d}.png") for i in range(len(c_prompts))]
        cands = torch.stack([load_media(p)[0] for p in paths])
    else:
        cands = reload_png(generate(base, c_prompts, c_seeds, **sample))
        paths = save_images(cands, out / "candidates")
        stamp.write_text(spec)
    groups = [list(range(i, i + args.candidates)) for i in range(0, len(c_prompts), args.candidates)]
    train_groups, shot_groups = groups[: len(train_prompts)], groups[len(train_prompts) :]
    timings["candidates"] = time.time() - t0

    # 2. training users label pairs (each on their own subset of training prompts)
    rows = []
    for user in train_users:
        mine = rng.sample(train_groups, args.prompts_per_user)
        for a, b, prompt in label_pairs(user, cands, c_prompts, mine, rng=rng):
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": Path(paths[a]).relative_to(out).as_posix(),
                    "rejected": Path(paths[b]).relative_to(out).as_posix(),
                    "user": user.id,
                }
            )
    manifest = out / "pairs.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pooled_manifest = out / "pairs_pooled.jsonl"
    pooled_manifest.write_text(
        "".join(json.dumps({k: v for k, v in r.items() if k != "user"}) + "\n" for r in rows)
    )
    log(f"2 {len(rows)} pairs from {len(train_users)} training users")

    # unseen users: 4 shots from shot prompts, held-out pairs (for reward accuracy) from the rest
    unseen_shots, unseen_heldout = {}, {}
    for user in unseen_users:
        pairs = label_pairs(user, cands, c_prompts, shot_groups, max_pairs_per_group=1, rng=rng)
        rng.shuffle(pairs)
        unseen_shots[user.id], unseen_heldout[user.id] = pairs[:4], pairs[4:]
        if len(pairs) < 8:
            raise RuntimeError(
                f"unseen user {user.id}: only {len(pairs)} labelled pairs among the shot candidates"
            )
    from mmalign.personalize.encoders import Shot

    def shots_of(uid: str) -> list:
        return [Shot(p, cands[a], cands[b], f"{uid}:{i}") for i, (a, b, p) in enumerate(unseen_shots[uid])]

    # 3. PAL-B head on the training users' pairs (encoder `pal` and the per-user reward), and a shared K=1 reward
    t0 = time.time()
    small = one_thread()
    small.__enter__()
    records, _ = load_pairs(manifest)
    feats = toy_features()
    index = {p: i for i, p in enumerate(paths)}
    cw = torch.tensor([index[str(r.chosen)] for r in records])
    cl = torch.tensor([index[str(r.rejected)] for r in records])
    all_feats = feats.images(cands)
    uid = {u.id: i for i, u in enumerate(train_users)}
    users_idx = torch.tensor([uid[str(r.user_id)] for r in records])
    text = torch.ones(len(records), 1)
    pal_model = train_pal(
        all_feats[cw],
        all_feats[cl],
        text,
        users_idx,
        len(train_users),
        dim=64,
        k=args.pal_k,
        epochs=40,
        lr=3e-3,
        seed=args.seed,
        progress=False,
    )
    head_dir = save_pal(
        pal_model,
        out / "pal_head",
        [u.id for u in train_users],
        {"features": FEATURES, "features_kwargs": {}},
    )
    shared = train_pal(
        all_feats[cw],
        all_feats[cl],
        text,
        torch.zeros(len(records), dtype=torch.long),
        1,
        dim=64,
        k=1,
        epochs=40,
        lr=3e-3,
        seed=args.seed,
        progress=False,
    )
    timings["pal"] = time.time() - t0

    pal_head = load_head(head_dir)
    acc_pal, acc_shared = [], []
    for user in unseen_users:
        s = unseen_shots[user.id]
        h = unseen_heldout[user.id]
        fw, fl = all_feats[[a for a, _, _ in s]], all_feats[[b for _, b, _ in s]]
        logits = fit_user(pal_model, fw, fl, torch.ones(len(s), 1), seed=args.seed)
        hw, hl = all_feats[[a for a, _, _ in h]], all_feats[[b for _, b, _ in h]]
        ones = torch.ones(len(h), 1)
        with torch.no_grad():
            acc_pal += (
                (
                    pal_model.score(hw, ones, logits.expand(len(h), -1))
                    > pal_model.score(hl, ones, logits.expand(len(h), -1))
                )
                .float()
                .tolist()
            )
            z = torch.zeros(len(h), 1)
            acc_shared += (shared.score(hw, ones, z) > shared.score(hl, ones, z)).float().tolist()
    del pal_head
    log(
        f"3 PAL-B from 4 shots: accuracy {sum(acc_pal) / len(acc_pal):.3f} on {len(acc_pal)} held-out pairs of unseen users; "
        f"one shared reward (K=1): {sum(acc_shared) / len(acc_shared):.3f}"
    )
    small.__exit__()

    # 4. evaluation sets: held-out prompts and seeds per unseen user; the base's images once
    ev_prompts, ev_seeds, ev_user = [], [], []
    for j, user in enumerate(unseen_users):
        for i in range(args.eval_per_user):
            ev_prompts.append(eval_prompts[(j * args.eval_per_user + i) % len(eval_prompts)])
            ev_seeds.append(500_000 + j * 1000 + i)
            ev_user.append(user)
    by_user = {u.id: [i for i, x in enumerate(ev_user) if x.id == u.id] for u in unseen_users}
    ids = [u.id for u in unseen_users]
    shuffled_of = shuffled_partners(ids, seed=args.seed)
    # the user whose preferred sides are the opposite on both axes (population() cycles the 4 sign patterns)
    opposite_of = {ids[i]: ids[i ^ 3] for i in range(len(ids)) if (i ^ 3) < len(ids)}

    def hidden(images: torch.Tensor) -> torch.Tensor:
        return torch.cat([ev_user[i].reward(images[i : i + 1]) for i in range(len(images))])

    def sample_users(pipe, vectors: dict[str, torch.Tensor]) -> torch.Tensor:
        out_imgs = torch.zeros(len(ev_prompts), 3, 32, 32)
        for u in unseen_users:
            idx = by_user[u.id]
            emb = user_embeds_for_pipeline(
                vectors[u.id][None].expand(len(idx), -1), guidance=args.guidance > 1
            )
            out_imgs[idx] = generate(
                pipe,
                [ev_prompts[i] for i in idx],
                [ev_seeds[i] for i in idx],
                ip_adapter_image_embeds=[emb],
                **sample,
            )
        return out_imgs

    t0 = time.time()
    base_imgs = cached_samples(
        out / "eval_base",
        {"prompts": ev_prompts, "seeds": ev_seeds, **sample},
        lambda: generate(base, ev_prompts, ev_seeds, **sample),
    )
    r_base = hidden(base_imgs)
    timings["evaluate"] = time.time() - t0

    def toward_user(images: torch.Tensor) -> dict[str, float]:
        """Mean signed shift vs the base, in within-prompt std units, toward each user's preferred side."""
        from mmalign.toy.users import AXES, BASE_STATS, attributes

        a, b = attributes(images), attributes(base_imgs)
        out = {}
        for j, k in enumerate(AXES):
            sign = torch.tensor([1.0 if u.weights[j] > 0 else -1.0 for u in ev_user])
            out[k] = round(((a[k] - b[k]) * sign).mean().item() / BASE_STATS[k][1], 3)
        return out

    def ci(stats: dict) -> list[float]:
        return [round(x, 4) for x in stats["win_rate_ci"]]

    # 5. per encoder (the main one first): embed users, train personal_dpo, evaluate; then the pooled model
    recs_by_user, _ = load_pairs(manifest)
    results: dict[str, dict] = {}
    r_personal_of: dict[str, torch.Tensor] = {}
    pooled: dict[str, object] = {}
    order = [args.main] + [e for e in encoders if e != args.main] if args.main in encoders else encoders
    for name in order:
        t0 = time.time()
        if name == "mean_diff":
            enc = get_encoder("mean_diff", features=FEATURES)
        elif name == "pal":
            enc = get_encoder("pal", head=str(head_dir))
        elif name == "vlm":
            from mmalign.toy.tiny_rewards import build_tiny_vlm

            vlm_dir = out / "tiny_vlm"
            if not (vlm_dir / "config.json").is_file():
                build_tiny_vlm(vlm_dir)
            enc = get_encoder("vlm", model=str(vlm_dir), max_new_tokens=8, device="cpu")
        else:
            raise SystemExit(f"unknown encoder {name}")
        max_groups = args.vlm_groups if name == "vlm" else 20
        grouped, counts = user_groups(
            recs_by_user, n=4, max_groups=max_groups, seed=args.seed, on_too_few="skip"
        )
        shots = {u: [decode_shots(g) for g in gs] for u, gs in grouped.items()}
        with one_thread():
            vectors, profiles, _ = embed_users(enc, shots, cache_dir=out / "user_cache", progress=False)
            unseen = {
                u.id: embed_users(
                    enc, {u.id: [shots_of(u.id)]}, cache_dir=out / "user_cache", progress=False
                )[0][u.id][0]
                for u in unseen_users
            }
        vec_path = save_user_vectors(out / f"user_vectors_{name}.safetensors", vectors, enc, profiles)
        timings[f"embed_{name}"] = time.time() - t0
        t0 = time.time()
        cfg = load_config(
            ROOT / "configs/toy/personal_dpo.yaml",
            [
                f"model.pretrained={DEFAULT_TOY_MODEL}",
                f"data.source={manifest}",
                f"method.user_vectors={vec_path}",
                f"train.output_dir={out / run_name(name, args.set)}",
                f"data.cache_dir={out / 'cache'}",
                f"train.max_steps={args.train_steps}",
                "train.progress=false",
                *args.set,
            ],
        )
        log(f"5 {name}: {counts['users']} users ({counts['skipped_users']} skipped), training personal_dpo")
        summary = train_or_reuse(cfg, train)
        timings[f"train_{name}"] = time.time() - t0
        t0 = time.time()
        pipe = load_toy_pipeline()
        load_user_adapter(pipe, summary["export"], scale=args.scale)
        personal_imgs = sample_users(pipe, unseen)
        torch.save(personal_imgs, out / run_name(name, args.set) / "eval_images.pt")
        r_personal = r_personal_of[name] = hidden(personal_imgs)
        vs_base = paired_stats(r_personal, r_base)
        results[name] = {
            "win_rate": round(vs_base["win_rate"], 4),
            "win_rate_ci": ci(vs_base),
            "mean_reward": round(r_personal.mean().item(), 3),
            "mean_gain": round(vs_base["mean_diff"], 4),
            "mean_gain_ci": [round(x, 4) for x in vs_base["mean_diff_ci"]],
            "shift_toward_user": toward_user(personal_imgs),
            "train_seconds": round(summary["seconds"], 1),
            "final_metrics": {k: round(v, 4) for k, v in summary["final_metrics"].items()},
        }
        if name == args.main or args.shuffled_all:
            wrong = {u: unseen[shuffled_of[u]] for u in ids}
            vs_shuffled = paired_stats(r_personal, hidden(sample_users(pipe, wrong)))
            results[name].update(
                vs_shuffled=round(vs_shuffled["win_rate"], 4), vs_shuffled_ci=ci(vs_shuffled)
            )
            if len(opposite_of) == len(ids):
                flipped = {u: unseen[opposite_of[u]] for u in ids}
                vs_opposite = paired_stats(r_personal, hidden(sample_users(pipe, flipped)))
                results[name].update(
                    vs_opposite=round(vs_opposite["win_rate"], 4), vs_opposite_ci=ci(vs_opposite)
                )
        timings[f"evaluate_{name}"] = time.time() - t0
        log(f"5 {name}: {results[name]}")
        (out / "partial.json").write_text(json.dumps({"encoders": results, "timings": timings}, indent=1))

        if not pooled:  # the pooled Diffusion-DPO LoRA on the same pairs, without users
            t0 = time.time()
            cfg = load_config(
                ROOT / "configs/toy/quickstart.yaml",
                [
                    f"model.pretrained={DEFAULT_TOY_MODEL}",
                    f"data.source={pooled_manifest}",
                    f"train.output_dir={out / 'run_pooled'}",
                    f"data.cache_dir={out / 'cache'}",
                    f"train.max_steps={args.train_steps}",
                    "data.random_flip=false",
                    "train.progress=false",
                ],
            )
            pipe = load_toy_pipeline()
            pooled_summary = train_or_reuse(cfg, train)
            pipe.load_lora_weights(pooled_summary["export"])
            pooled_imgs = cached_samples(
                out / "eval_pooled",
                {"prompts": ev_prompts, "seeds": ev_seeds, **sample, "run": pooled_summary},
                lambda pipe=pipe: generate(pipe, ev_prompts, ev_seeds, **sample),
            )
            pooled["r"] = hidden(pooled_imgs)
            pooled["shift"] = toward_user(pooled_imgs)
            pooled["vs_base"] = paired_stats(pooled["r"], r_base)
            timings["pooled"] = time.time() - t0
        for done in results:
            vs_pooled = paired_stats(r_personal_of[done], pooled["r"])
            results[done].update(vs_pooled=round(vs_pooled["win_rate"], 4), vs_pooled_ci=ci(vs_pooled))
        (out / "partial.json").write_text(
            json.dumps(
                {
                    "encoders": results,
                    "pal_accuracy": sum(acc_pal) / len(acc_pal),
                    "shared_accuracy": sum(acc_shared) / len(acc_shared),
                },
                indent=1,
            )
        )
    pooled_vs_base = pooled["vs_base"]
    pooled_shift = pooled["shift"]

    main_name = args.main if args.main in results else order[0]
    m = results[main_name]
    pal_acc = torch.tensor(acc_pal)
    shared_acc = torch.tensor(acc_shared)
    acc_stats = paired_stats(pal_acc, shared_acc)
    return {
        "benchmark": "efficacy_personal",
        "main_encoder": main_name,
        "win_rate": m["win_rate"],
        "win_rate_ci": m["win_rate_ci"],
        "vs_pooled": m["vs_pooled"],
        "vs_pooled_ci": m["vs_pooled_ci"],
        "vs_shuffled": m.get("vs_shuffled"),
        "vs_shuffled_ci": m.get("vs_shuffled_ci"),
        "vs_opposite": m.get("vs_opposite"),
        "vs_opposite_ci": m.get("vs_opposite_ci"),
        "mean_gain": m["mean_gain"],
        "mean_gain_ci": m["mean_gain_ci"],
        "shift_toward_user": m["shift_toward_user"],
        "pooled_shift_toward_user": pooled_shift,
        "pooled_vs_base": round(pooled_vs_base["win_rate"], 4),
        "pooled_vs_base_ci": [round(x, 4) for x in pooled_vs_base["win_rate_ci"]],
        "encoders": results,
        "pal_accuracy": round(pal_acc.mean().item(), 4),
        "shared_accuracy": round(shared_acc.mean().item(), 4),
        "pal_minus_shared_ci": [round(x, 4) for x in acc_stats["mean_diff_ci"]],
        "heldout_pairs": len(acc_pal),
        "n": len(ev_prompts),
        "unseen_users": len(unseen_users),
        "train_users": len(train_users),
        "pairs": len(rows),
        "shots": 4,
        "guidance": args.guidance,
        "sampler_steps": args.steps,
        "train_steps": args.train_steps,
        "overrides": args.set,
        "timings": {k: round(v, 1) for k, v in timings.items()},
    }


if __name__ == "__main__":
    main()
