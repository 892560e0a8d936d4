"""``mmalign personalize``: user vectors from few shots (``embed``), a PAL-B reward head (``fit``), user-disjoint
splits (``split``); and the user options of ``mmalign generate`` (``--user-shots FILE`` / ``--user USERS:ID``).

Examples::

    mmalign personalize split pairs.jsonl --out-dir splits/            # user-disjoint train/validation/test
    mmalign personalize fit splits/train.jsonl --features pickscore --out pal_head/
    mmalign personalize embed splits/train.jsonl --encoder pal --encoder-arg head=pal_head --out users.safetensors
    mmalign train configs/sd15/personal_dpo.yaml method.user_vectors=users.safetensors data.source=splits/train.jsonl
    mmalign generate --model ... --user-adapter outputs/personal/final --user-shots my_choices.jsonl --prompt "..."
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmalign.commands.options import trained_path
from mmalign.utils import parse_key_values

if TYPE_CHECKING:
    import torch


def _one_line_errors(fn):
    """Bad input (unknown user, too few shots, a corrupt image ...) -> one line naming it, exit code 2."""
    import functools
    import sys

    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (ValueError, KeyError, FileNotFoundError) as err:
            msg = err.args[0] if isinstance(err, KeyError) and err.args else err
            print(f"mmalign personalize {args.personalize_command}: error: {msg}", file=sys.stderr)
            return 2

    return run


@_one_line_errors
def cmd_embed(args: argparse.Namespace) -> int:
    from mmalign.data.pairs import load_pairs
    from mmalign.data.users import decode_shots, user_groups
    from mmalign.personalize.encoders import embed_users, get_encoder, save_user_vectors

    records, _ = load_pairs(args.pairs, keep_ties=True)
    if args.split:
        from mmalign.data.users import group_by_user, split_users

        fractions = [float(x) for x in args.split_fractions.split(",")]
        split = split_users(list(group_by_user(records)), fractions, seed=args.split_seed)
        if args.split not in split:
            raise ValueError(f"--split {args.split!r}: use one of {list(split)}")
        members = set(split[args.split])
        records = [r for r in records if str(r.user_id) in members]
    if args.user:
        records = [r for r in records if str(r.user_id) in set(args.user)]
        if not records:
            raise ValueError(f"{args.pairs}: no pairs of user(s) {args.user}")
    groups, counts = user_groups(
        records, n=args.shots, max_groups=args.max_groups, seed=args.seed, on_too_few=args.on_too_few
    )
    if not groups:
        raise ValueError(
            f"{args.pairs}: no user has {args.shots} usable pairs ({counts['skipped_users']} user(s) skipped)"
        )
    encoder = get_encoder(args.encoder, **parse_key_values(args.encoder_arg, flag="--encoder-arg"))
    shots = {u: [decode_shots(g) for g in gs] for u, gs in groups.items()}
    cache = None if args.no_cache else (args.cache_dir or str(Path(args.out).parent / ".user_cache"))
    vectors, profiles, hits = embed_users(encoder, shots, cache_dir=cache, progress=not args.quiet)
    path = save_user_vectors(args.out, vectors, encoder, profiles)
    print(
        json.dumps(
            {
                "out": str(path),
                "users": len(vectors),
                "groups": counts["groups"],
                "encoded": hits["encoded"],
                "cached": hits["cached"],
                "skipped_users": counts["skipped_users"],
                "dim": next(iter(vectors.values())).shape[-1] if vectors else None,
            }
        )
    )
    return 0


@_one_line_errors
def cmd_fit(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from mmalign.data.pairs import load_pairs
    from mmalign.data.users import decode_shots, group_by_user
    from mmalign.personalize.features import get_features
    from mmalign.personalize.pal import prompt_features, save_pal, train_pal
    from mmalign.personalize.shots import stack_images

    records, _ = load_pairs(args.pairs)
    by_user = group_by_user(records)
    users = sorted(by_user)
    features = get_features(args.features, **parse_key_values(args.features_arg, flag="--features-arg"))
    fw, fl, idx, prompts = [], [], [], []
    flat = [(i, r) for i, u in enumerate(users) for r in by_user[u]]
    for start in tqdm(range(0, len(flat), args.batch_size), desc="features", disable=args.quiet):
        chunk = flat[start : start + args.batch_size]
        shots = decode_shots([r for _, r in chunk])
        fw.append(features.images(stack_images([s.preferred for s in shots])).float())
        fl.append(features.images(stack_images([s.dispreferred for s in shots])).float())
        idx += [i for i, _ in chunk]
        prompts += [s.prompt for s in shots]
    fw, fl = torch.cat(fw), torch.cat(fl)
    text = prompt_features(features, prompts)
    model = train_pal(
        fw,
        fl,
        text,
        torch.tensor(idx),
        len(users),
        dim=args.dim,
        k=args.k,
        epochs=args.epochs,
        lr=args.lr,
        seed=args.seed,
        progress=not args.quiet,
    )
    with torch.no_grad():
        logits = model.user_logits[torch.tensor(idx)]
        acc = (model.score(fw, text, logits) > model.score(fl, text, logits)).float().mean().item()
    save_pal(
        model,
        args.out,
        users,
        {
            "features": args.features,
            "features_kwargs": parse_key_values(args.features_arg, flag="--features-arg"),
        },
    )
    print(
        json.dumps(
            {
                "out": args.out,
                "users": len(users),
                "pairs": len(fw),
                "k": args.k,
                "train_accuracy": round(acc, 4),
            }
        )
    )
    return 0


@_one_line_errors
def cmd_split(args: argparse.Namespace) -> int:
    from mmalign.data.pairs import _iter_manifest
    from mmalign.data.users import split_users
    from mmalign.personalize.shots import row_user

    src = Path(args.pairs)
    rows = list(_iter_manifest(src))
    missing = [w for w, r in rows if row_user(r) is None]
    if missing:
        raise ValueError(f"{missing[0]}: no 'user' (or 'user_id') value")
    fractions = [float(x) for x in args.fractions.split(",")]
    split = split_users([row_user(r) for _, r in rows], fractions, seed=args.seed)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, users in split.items():
        members = set(users)
        picked = [r for _, r in rows if row_user(r) in members]
        base = src.parent.resolve()
        for r in picked:  # keep image paths valid from the new folder
            for key in ("chosen", "rejected", "image_0", "image_1", "jpg_0", "jpg_1"):
                if isinstance(r.get(key), str) and r[key] and not Path(r[key]).is_absolute():
                    r[key] = str(base / r[key])
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in picked))
        counts[name] = {"users": len(users), "pairs": len(picked)}
    print(json.dumps({"out_dir": str(out), "seed": args.seed, **counts}))
    return 0


# --------------------------------------------------------------------------------------------------
# mmalign generate --user-shots / --user


def encoder_from_fingerprint(fp: dict[str, Any]):
    """Rebuild the encoder that made a generator's training vectors, from the fingerprint its adapter recorded."""
    from mmalign.personalize.encoders import get_encoder

    name = fp.get("encoder")
    if name == "mean_diff":
        return get_encoder(
            "mean_diff", features=fp["features"], features_kwargs=fp.get("features_kwargs") or {}
        )
    if name == "pal":
        ep, lr, bs, seed = fp.get("fit", [20, 5e-3, 1, 0])
        return get_encoder("pal", head=fp["head"], fit_epochs=ep, fit_lr=lr, fit_batch_size=bs, seed=seed)
    if name == "vlm":
        return get_encoder(
            "vlm", model=fp["model"], layer=fp.get("layer", -1), max_new_tokens=fp.get("max_new_tokens", 1024)
        )
    raise ValueError(f"cannot rebuild user encoder from {fp!r}")


def user_vector(adapter_meta: dict[str, Any], *, user_shots: str | None, user: str | None) -> torch.Tensor:
    """The user vector for generation: from a shots file (embedded by the adapter's encoder) or ``USERS:ID``."""
    from mmalign.personalize.encoders import load_user_vectors

    if user_shots:
        from mmalign.personalize.shots import read_shots

        shots = read_shots(user_shots, user=user)
        if not shots:
            raise ValueError(f"{user_shots}: no labelled, non-tie pairs to use as shots")
        return encoder_from_fingerprint(adapter_meta.get("encoder") or {}).encode(shots).vector
    if not user or ":" not in user:
        raise ValueError("--user needs USERS.safetensors:ID (or give --user-shots FILE)")
    path, _, uid = user.rpartition(":")
    vectors, _ = load_user_vectors(path)
    if uid not in vectors:
        raise ValueError(
            f"{path}: unknown user {uid!r} ({len(vectors)} users, e.g. {', '.join(list(vectors)[:5])})"
        )
    return vectors[uid].float().mean(0)  # the mean over the user's shot groups


def user_pipeline_kwargs(pipe: Any, args: argparse.Namespace, *, guidance: bool) -> dict[str, Any]:
    """Load ``--user-adapter`` into ``pipe`` and return the ``ip_adapter_image_embeds`` for the chosen user."""
    from mmalign.personalize.attention import load_user_adapter, user_embeds_for_pipeline

    if not (args.user_shots or args.user):
        return {}
    if not args.user_adapter:
        raise ValueError(
            "--user/--user-shots need --user-adapter DIR (the final/ folder of a personal_dpo run)"
        )
    meta = load_user_adapter(pipe, args.user_adapter, scale=args.user_scale)
    u = user_vector(meta, user_shots=args.user_shots, user=args.user)
    if u.shape[-1] != meta.get("user_dim", u.shape[-1]):
        raise ValueError(f"user vector has {u.shape[-1]} dims but the adapter expects {meta['user_dim']}")
    return {"ip_adapter_image_embeds": [user_embeds_for_pipeline(u, guidance=guidance)]}


def add_generate_user_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--user-adapter", type=trained_path, help="user adapter (final/ of a personal_dpo run)")
    p.add_argument(
        "--user-shots", help="a new person's choices (pair manifest; with --user ID, only that user's rows)"
    )
    p.add_argument(
        "--user",
        help="USERS.safetensors:ID (from `mmalign personalize embed`), or the row filter for --user-shots",
    )
    p.add_argument(
        "--user-scale", type=float, default=1.0, help="strength of the user path (0 = the base model)"
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "personalize",
        help="user vectors, PAL-B reward heads and user-disjoint splits",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="personalize_command", required=True)

    e = sub.add_parser("embed", help="users' shots -> user vectors (+ profile texts for vlm)")
    e.add_argument("pairs", help="pair manifest (or Pick-a-Pic data) with a user / user_id column")
    e.add_argument("--encoder", default="mean_diff", help="mean_diff | pal | vlm (see `mmalign ls`)")
    e.add_argument(
        "--encoder-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="e.g. features=pickscore, head=pal_head/, model=llava-hf/..., layer=-1",
    )
    e.add_argument("--out", required=True, help="user_vectors.safetensors")
    e.add_argument("--user", action="append", help="only these user id(s)")
    e.add_argument("--split", help="only the users of this user-disjoint split (train | validation | test)")
    e.add_argument(
        "--split-fractions", default="0.8,0.1,0.1", help="train,validation,test shares of the users"
    )
    e.add_argument(
        "--split-seed", type=int, default=0, help="seed of the user split (same as `personalize split`)"
    )
    e.add_argument("--shots", type=int, default=4, help="pairs per group (PPD: 4)")
    e.add_argument("--max-groups", type=int, default=20, help="groups per user (PPD: 20)")
    e.add_argument(
        "--on-too-few",
        choices=["error", "skip"],
        default="error",
        help="users with fewer usable pairs than --shots",
    )
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--cache-dir", help="per-user embedding cache (default: .user_cache beside --out)")
    e.add_argument("--no-cache", action="store_true")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_embed)

    f = sub.add_parser("fit", help="train a PAL-B head (per-user reward, `pal` encoder) on seen users' pairs")
    f.add_argument("pairs")
    f.add_argument("--features", default="clip_score", help="CLIP-family reward name or module:function")
    f.add_argument(
        "--features-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="e.g. model=yuvalkirstain/PickScore_v1",
    )
    f.add_argument("--out", required=True, help="head directory")
    f.add_argument("--k", type=int, default=2, help="prototypes (PAL default 2)")
    f.add_argument("--dim", type=int, default=512, help="embedding width (PAL default 512)")
    f.add_argument("--epochs", type=int, default=30)
    f.add_argument("--lr", type=float, default=1e-3)
    f.add_argument("--batch-size", type=int, default=64, help="pairs per feature batch")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--quiet", action="store_true")
    f.set_defaults(func=cmd_fit)

    s = sub.add_parser("split", help="user-disjoint train/validation/test manifests (seeded)")
    s.add_argument("pairs", help="JSONL/CSV pair manifest with a user column")
    s.add_argument("--out-dir", required=True)
    s.add_argument("--fractions", default="0.8,0.1,0.1")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_split)
