"""Per-user data: the user column, grouping, user-disjoint splits, few-shot groups and their errors."""

from __future__ import annotations

import json

import pytest

from mmalign.data.images import DataError
from mmalign.data.pairs import PairRecord, load_pairs
from mmalign.data.users import fewshot_groups, group_by_user, split_users, user_groups


def rec(user, i, label=1.0):
    return PairRecord(f"p{i}", f"a{i}.png", f"b{i}.png", f"m.jsonl:{i}", label, user)


def test_user_column_and_pickapic_user_id_are_read(tmp_path):
    rows = [
        {"prompt": "a", "chosen": "x.png", "rejected": "y.png", "user": "alice"},
        {"caption": "b", "jpg_0": "x.png", "jpg_1": "y.png", "label_0": 0, "user_id": 42},
    ]
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records, _ = load_pairs(path)
    assert [r.user_id for r in records] == ["alice", 42]
    assert set(group_by_user(records)) == {"alice", "42"}


def test_split_is_user_disjoint_seeded_and_complete():
    users = [f"u{i}" for i in range(103)]
    split = split_users(users, (0.8, 0.1, 0.1), seed=3)
    sets = [set(v) for v in split.values()]
    assert sum(len(s) for s in sets) == 103 and set().union(*sets) == set(users)
    assert all(not (a & b) for i, a in enumerate(sets) for b in sets[i + 1 :])
    assert split == split_users(list(reversed(users)), (0.8, 0.1, 0.1), seed=3)
    assert split != split_users(users, (0.8, 0.1, 0.1), seed=4)
    assert len(split["train"]) == 82


def test_fewshot_groups_use_only_labelled_non_tie_pairs_and_cap_groups():
    records = [rec("u", i) for i in range(90)] + [rec("u", 100 + i, 0.5) for i in range(10)]
    groups = fewshot_groups(records, n=4, max_groups=20, seed=0, user="u")
    assert len(groups) == 20 and all(len(g) == 4 for g in groups)
    flat = [r.row for g in groups for r in g]
    assert len(set(flat)) == 80 and all(r.label_0 != 0.5 for g in groups for r in g)
    assert groups == fewshot_groups(records, n=4, max_groups=20, seed=0, user="u")


def test_too_few_pairs_is_a_clear_error_or_a_counted_skip():
    records = (
        [rec("rich", i) for i in range(8)] + [rec("poor", 50 + i) for i in range(3)] + [rec("poor", 60, 0.5)]
    )
    with pytest.raises(DataError, match="user 'poor': 3 usable .* fewer than the 4 shots"):
        user_groups(records, n=4)
    groups, counts = user_groups(records, n=4, on_too_few="skip")
    assert set(groups) == {"rich"} and counts["skipped_users"] == 1 and counts["skipped"] == ["poor"]


def test_a_pair_without_user_is_named():
    with pytest.raises(DataError, match="m.jsonl:7: no 'user'"):
        group_by_user([rec("a", 1), rec(None, 7)])
