"""Per-user preference data: grouping pairs by user, user-disjoint splits, few-shot groups, user-conditioned batches.

Users come from a manifest's ``user`` column or Pick-a-Pic's ``user_id`` (:attr:`PairRecord.user_id`). PPD's
few-shot groups (``llava_embeddings/pick_a_pick_user_emb.py``): a user's labelled, non-tie pairs, shuffled into
groups of N = 4, at most 20 groups per user.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch

from mmalign.data.images import DataError
from mmalign.data.pairs import PairRecord


def group_by_user(records: Sequence[PairRecord]) -> dict[str, list[PairRecord]]:
    """user id (as a string) -> that user's records, in file order.

    Raises:
        DataError: naming the first row without a user.
    """
    out: dict[str, list[PairRecord]] = {}
    for rec in records:
        if rec.user_id is None or rec.user_id == "":
            raise DataError(
                f"{rec.row}: no 'user' (or Pick-a-Pic 'user_id') value; personalisation needs one per pair"
            )
        out.setdefault(str(rec.user_id), []).append(rec)
    return out


def split_users(
    users: Sequence[str],
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    *,
    seed: int = 0,
    names: Sequence[str] = ("train", "validation", "test"),
) -> dict[str, list[str]]:
    """Seeded user-disjoint split: every user lands in exactly one split.

    Args:
        users: the user ids.
        fractions: share of users per split (normalised); the last split takes the rounding remainder.
        seed: shuffle seed.
        names: split names, one per fraction.
    """
    if len(fractions) != len(names) or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"fractions={list(fractions)} must be non-negative, one per split {list(names)}")
    order = sorted({str(u) for u in users})
    random.Random(seed).shuffle(order)
    total = sum(fractions)
    out, start = {}, 0
    for i, (name, frac) in enumerate(zip(names, fractions)):
        end = len(order) if i == len(names) - 1 else start + round(len(order) * frac / total)
        out[name] = order[start:end]
        start = end
    return out


def usable(rec: PairRecord) -> bool:
    """A shot must be labelled and not a tie (PPD: ``has_label`` and ``are_different``)."""
    return rec.label_0 in (0.0, 1.0)


def fewshot_groups(
    records: Sequence[PairRecord], *, n: int = 4, max_groups: int = 20, seed: int = 0, user: str = ""
) -> list[list[PairRecord]]:
    """Shuffle one user's usable pairs into up to ``max_groups`` disjoint groups of ``n``.

    Raises:
        DataError: when the user has fewer than ``n`` usable pairs (the message names the user and the count).
    """
    pool = [r for r in records if usable(r)]
    if len(pool) < n:
        raise DataError(
            f"user {user!r}: {len(pool)} usable (labelled, non-tie) pair(s), fewer than the {n} shots needed"
        )
    random.Random(f"{seed}:{user}").shuffle(pool)
    return [pool[i : i + n] for i in range(0, min(len(pool) // n, max_groups) * n, n)]


def user_groups(
    records: Sequence[PairRecord],
    *,
    n: int = 4,
    max_groups: int = 20,
    seed: int = 0,
    on_too_few: str = "error",
) -> tuple[dict[str, list[list[PairRecord]]], dict[str, Any]]:
    """Few-shot groups of every user. ``on_too_few="skip"`` counts and lists users with fewer than ``n`` pairs.

    Returns:
        user -> groups, and counts ``{"users", "groups", "skipped_users", "skipped"}``.
    """
    if on_too_few not in ("error", "skip"):
        raise ValueError(f"on_too_few={on_too_few!r}: use error or skip")
    out, skipped = {}, []
    for user, recs in group_by_user(records).items():
        try:
            out[user] = fewshot_groups(recs, n=n, max_groups=max_groups, seed=seed, user=user)
        except DataError:
            if on_too_few == "error":
                raise
            skipped.append(user)
    counts = {
        "users": len(out),
        "groups": sum(len(g) for g in out.values()),
        "skipped_users": len(skipped),
        "skipped": skipped,
    }
    return out, counts


def decode_shots(group: Sequence[PairRecord]) -> list:
    """PairRecords -> :class:`~mmalign.personalize.encoders.Shot` with decoded images in [0, 1].

    Raises:
        DataError: naming the row and file of a missing or corrupt image.
    """
    from torchvision.transforms.functional import pil_to_tensor

    from mmalign.data.images import open_image
    from mmalign.personalize.encoders import Shot

    shots = []
    for rec in group:
        pref = pil_to_tensor(open_image(rec.chosen, where=rec.where("chosen"))).float() / 255
        disp = pil_to_tensor(open_image(rec.rejected, where=rec.where("rejected"))).float() / 255
        shots.append(Shot(rec.prompt, pref, disp, rec.row))
    return shots


# --------------------------------------------------------------------------------------------------
# training data for personal_dpo


class UserPairDataset(torch.utils.data.Dataset):
    """Wraps a pair dataset; each item also gets its user's vector (a random one of the user's shot groups)."""

    def __init__(
        self, base: torch.utils.data.Dataset, records: Sequence[PairRecord], vectors: dict[str, torch.Tensor]
    ):
        self.base, self.records, self.vectors = base, records, vectors

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.base[i]
        if item is None or "skipped" in item:
            return item
        vecs = self.vectors[str(self.records[i].user_id)]
        item["user_vector"] = vecs[int(torch.randint(len(vecs), ()))]
        return item


def personal_pair_data(
    adapter: Any,
    accelerator: Any,
    data: Any,
    user_vectors: str,
    *,
    resolution: int,
    cache_dir: Any,
    model_id: dict[str, Any],
    progress: bool = True,
):
    """Image pairs (as ``diffusion_dpo``) whose users have vectors in ``user_vectors``; batches carry
    ``cond["image_embeds"]`` [B, D]. Pairs of users without a vector are counted and dropped.

    Args:
        adapter, accelerator, data, resolution, cache_dir, model_id, progress: as :func:`mmalign.data.setup.image_pair_data`.
        user_vectors: ``user_vectors.safetensors`` from ``mmalign personalize embed``.
    """
    from mmalign.data.pairs import load_pairs
    from mmalign.data.setup import image_pair_data
    from mmalign.personalize.encoders import load_user_vectors

    vectors, _ = load_user_vectors(user_vectors)
    d = data
    records, _ = load_pairs(
        d.source, format=d.format, split=d.split, keep_ties=d.keep_ties, max_items=d.max_items
    )
    missing_user = [r for r in records if r.user_id is None or r.user_id == ""]
    if missing_user:
        raise DataError(
            f"{missing_user[0].row}: no 'user' (or 'user_id') value; personal_dpo needs one per pair"
        )
    unknown = {str(r.user_id) for r in records} - set(vectors)
    data = image_pair_data(
        adapter,
        accelerator,
        d,
        resolution=resolution,
        cache_dir=cache_dir,
        model_id=model_id,
        progress=progress,
        keep=lambda rec: str(rec.user_id) in vectors,
    )
    base_records = data.dataset.records
    data.dataset = UserPairDataset(data.dataset, base_records, vectors)
    prepare = data.prepare

    def prepare_with_users(raw: dict, device: torch.device) -> dict:
        batch = prepare(raw, device)
        batch["cond"]["image_embeds"] = raw["user_vector"].to(device)
        return batch

    data.prepare = prepare_with_users
    data.counts = {
        **data.counts,
        "users": len({str(r.user_id) for r in base_records}),
        "users_without_vector": len(unknown),
        "pairs_without_user_vector": sum(str(r.user_id) in unknown for r in records),
    }
    return data
