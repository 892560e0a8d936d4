"""mmalign annotate: manifests -> items, the labels store and assignment, export, agreement statistics."""

from __future__ import annotations

import json
import math

import pytest
from annotate_media import write_candidates, write_video_pairs
from conftest import write_pair_images

from mmalign.annotate.export import cohen_kappa, export_labels, fleiss_kappa, label_stats
from mmalign.annotate.items import load_items
from mmalign.annotate.store import Conflict, LabelStore, active_labels, read_labels
from mmalign.data.images import DataError
from mmalign.data.pairs import load_pairs
from mmalign.data.segments import load_video_pairs


@pytest.fixture
def pairs(tmp_path):
    return write_pair_images(tmp_path / "imgs", n=6)


def label(store, who, item, choice="left", lid=None, segments=None, now=0.0):
    lid = lid or f"{who}-{item}-{choice}"[:64].replace(".", "_")
    return store.submit(
        label_id=lid, annotator=who, item_id=item, choice=choice, segments=segments, elapsed_ms=1500, now=now
    )


# --------------------------------------------------------------------------------------------------
# manifests -> items


def test_pair_manifest_items_and_bad_rows(pairs, tmp_path):
    items = load_items(pairs)
    assert len(items) == 6 and {it.kind for it in items} == {"image"} and len({it.id for it in items}) == 6
    assert items[0].columns == ("chosen", "rejected") and items[0].media[0].endswith("img0_red.png")
    same = load_items(pairs)
    assert [it.id for it in same] == [it.id for it in items]  # stable ids: labels survive a restart
    assert items[0].scores is None
    labelled = pairs.with_name("labelled.jsonl")  # `mmalign label` output: the reward chose `chosen`
    rows = [{**json.loads(r), "margin": 0.25} for r in pairs.read_text().splitlines()]
    labelled.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_items(labelled)[0].scores == (0.25, 0.0)

    rows = pairs.read_text().splitlines()
    missing = tmp_path / "imgs" / "missing.jsonl"
    missing.write_text(
        rows[0] + "\n" + json.dumps({"prompt": "p", "chosen": "nope.png", "rejected": "img0_red.png"}) + "\n"
    )
    with pytest.raises(DataError, match=r"missing\.jsonl:2 \(chosen\): file not found: .*nope\.png"):
        load_items(missing)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not a png at all")
    broken = tmp_path / "imgs" / "broken.jsonl"
    broken.write_text(json.dumps({"prompt": "p", "chosen": "img0_red.png", "rejected": "broken.png"}) + "\n")
    with pytest.raises(DataError, match=r"broken\.jsonl:1 \(rejected\): cannot decode image"):
        load_items(broken)
    import io

    import numpy as np
    from PIL import Image

    jpeg = (
        io.BytesIO()
    )  # a JPEG cut short after its header: PIL's verify() passes it, training's decode does not
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(
        jpeg, "JPEG"
    )
    (tmp_path / "imgs" / "cut.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) * 6 // 10])
    broken.write_text(json.dumps({"prompt": "p", "chosen": "img0_red.png", "rejected": "cut.jpg"}) + "\n")
    with pytest.raises(DataError, match=r"broken\.jsonl:1 \(rejected\): cannot decode image .*cut\.jpg"):
        load_items(broken)
    nocol = tmp_path / "imgs" / "nocol.jsonl"
    nocol.write_text(json.dumps({"prompt": "p", "picture": "img0_red.png"}) + "\n")
    with pytest.raises(DataError, match=r"nocol\.jsonl:1: expected a pair manifest"):
        load_items(nocol)


def test_media_manifest_draws_seeded_pairs_within_groups(tmp_path):
    manifest = write_candidates(tmp_path / "cands", groups=3, per_group=4)
    items = load_items(manifest, seed=1)
    assert len(items) == 6  # n//2 disjoint pairs per group
    for it in items:
        a, b = (p.rsplit("/", 1)[-1][:2] for p in it.media)
        assert a == b  # both from one group
        assert it.scores is not None  # the only numeric column ("clip") is the reward
    per_group = {}
    for it in items:
        per_group.setdefault(it.prompt, []).extend(it.media)
    assert all(len(set(v)) == 4 for v in per_group.values())  # each candidate shown once
    assert [it.id for it in load_items(manifest, seed=1)] == [it.id for it in items]
    assert [it.media for it in load_items(manifest, seed=2)] != [it.media for it in items]
    assert len(load_items(manifest, pairs_per_group=-1)) == 3 * 6


def test_video_items_get_segments(tmp_path):
    manifest = write_video_pairs(tmp_path / "vids", n=1)
    (item,) = load_items(manifest, segment_seconds=1.0)
    assert item.kind == "video" and item.duration == pytest.approx(3.0, abs=0.2)
    assert len(item.segments) == 3 and item.segments[0] == [0.0, 1.0] and item.segment_seconds == 1.0
    (two,) = load_items(manifest, segment_seconds=1.5)
    assert two.segments == [[0.0, 1.5], [1.5, 3.0]]

    (tmp_path / "vids" / "bad.mp4").write_bytes(b"\x00" * 64)
    bad = tmp_path / "vids" / "bad.csv"  # CSV manifests work the same way
    bad.write_text("prompt,video_0,video_1\na clip,v0_0.mp4,bad.mp4\n")
    with pytest.raises(DataError, match=r"bad\.csv:2 \(video_1\): cannot read video"):
        load_items(bad)


# --------------------------------------------------------------------------------------------------
# store and assignment


def brute_progress(store, who):
    """The progress counter recomputed from the label records alone."""
    recs = active_labels(read_labels(store.path))
    non_skip = {}
    for r in recs:
        non_skip[r["item"]] = non_skip.get(r["item"], 0) + (r["choice"] != "skip")
    mine = {r["item"] for r in recs if r["annotator"] == who}
    complete = {i for i, n in non_skip.items() if n >= store.overlap}
    left = sum(1 for it in store.items if it.id not in mine and it.id not in complete)
    return {
        "mine": len(mine),
        "left_for_me": left,
        "complete": len(complete),
        "total": len(store.items),
        "overlap": store.overlap,
    }


def test_overlap_assignment_nobody_twice_and_leases(pairs, tmp_path):
    items = load_items(pairs)
    store = LabelStore(tmp_path / "labels.jsonl", items, overlap=2)
    # three people take turns until nothing is left; leases keep a third person off an item two hold
    first = store.next_item("p1", now=0)
    assert store.next_item("p1", now=1) is first  # a reload shows the same item
    assert store.next_item("p2", now=1) is first
    assert store.next_item("p3", now=1) is not first  # two leases already cover overlap 2
    assert store.next_item("p3", now=10_000) is first  # leases expire (600 s)
    done = {"p1": 0, "p2": 0, "p3": 0}
    for _ in range(100):
        progressed = False
        for who in done:
            it = store.next_item(who, now=20_000)
            if it is not None:
                label(
                    store,
                    who,
                    it.id,
                    "skip" if done[who] == 1 else "tie" if done[who] % 3 == 0 else "left",
                    now=20_000,
                )
                done[who] += 1
                assert all(store.progress(w) == brute_progress(store, w) for w in done)
                progressed = True
        if not progressed:
            break
    recs = active_labels(read_labels(store.path))
    per_item = {}
    for r in recs:
        if r["choice"] != "skip":
            per_item.setdefault(r["item"], []).append(r["annotator"])
    skips = [(r["item"], r["annotator"]) for r in recs if r["choice"] == "skip"]
    assert len(skips) == 3 and all(who not in per_item[item] for item, who in skips)
    assert sorted(per_item) == sorted(it.id for it in items)
    for item, who in per_item.items():  # 2 people each, unless skips left fewer than 2 who could label it
        assert len(who) == len(set(who)) == min(2, 3 - sum(i == item for i, _ in skips)), (item, who, skips)
    with pytest.raises(Conflict, match="already labelled"):
        label(store, recs[0]["annotator"], recs[0]["item"], lid="another-id-1")
    full = next(i for i, v in per_item.items() if "p3" not in v)
    with pytest.raises(Conflict, match="already has 2 label"):
        label(store, "p3", full, lid="another-id-2")


def test_sides_are_randomised_and_recorded_relative_to_a(pairs, tmp_path):
    items = load_items(pairs)
    store = LabelStore(tmp_path / "labels.jsonl", items, overlap=1)
    # seeded per (annotator, item); item ids hash the media's absolute paths, so over 6 items one annotator's
    # flips were all equal in 1 tmp dir of 32 (a flaky test): 20 annotators x 6 items make that 2^-119
    flips = [store.flipped(f"annotator-{k}", it.id) for k in range(20) for it in items]
    assert any(flips) and not all(flips)
    assert flips == [store.flipped(f"annotator-{k}", it.id) for k in range(20) for it in items]  # stable
    for it in items:
        rec, new = label(store, "alice", it.id, "left")
        assert new and rec["left"] == ("b" if store.flipped("alice", it.id) else "a")
        assert rec["choice"] == rec["left"]  # "left" means whatever was shown on the left


def test_idempotent_submit_restart_torn_line_and_undo(pairs, tmp_path):
    items = load_items(pairs)
    path = tmp_path / "labels.jsonl"
    store = LabelStore(path, items, overlap=1)
    rec, new = label(store, "a1", items[0].id, "right", lid="label-0001")
    again, new_again = label(store, "a1", items[0].id, "right", lid="label-0001")  # the retried POST
    assert new and not new_again and again == rec
    label(store, "a1", items[1].id, "skip", lid="label-0002")
    with pytest.raises(Conflict, match="another label"):
        label(store, "a2", items[2].id, "left", lid="label-0001")
    store.close()
    assert len(path.read_text().splitlines()) == 2

    # a write cut by SIGKILL: the torn tail was never acknowledged; a restart drops it and goes on
    with path.open("a") as fh:
        fh.write('{"type":"label","label_id":"torn-123')
    store = LabelStore(path, items, overlap=1)
    assert store.torn == len('{"type":"label","label_id":"torn-123') and path.read_text().endswith("\n")
    assert set(store.labels) == {"label-0001", "label-0002"}
    assert store.next_item("a1").id == items[2].id  # 0 labelled, 1 skipped: neither comes back to a1
    assert store.next_item("a2").id == items[1].id  # a skip does not count towards the overlap
    back = store.undo(annotator="a1", label_id="label-0001")
    assert back.id == items[0].id and store.next_item("a1").id == items[0].id
    assert store.progress("a1") == brute_progress(store, "a1") and store.progress("a1")["complete"] == 0
    store.undo(annotator="a1", label_id="label-0001")  # retried undo: no second record
    with pytest.raises(KeyError):
        store.undo(annotator="a2", label_id="label-0002")  # not theirs
    label(store, "a1", items[0].id, "left", lid="label-0003")
    store.close()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["type"] for r in lines] == ["label", "label", "undo", "label"]
    restarted = LabelStore(path, items, overlap=1)
    assert restarted.counts == store.counts and restarted.seen == store.seen

    path.write_text(path.read_text() + "garbage\n")
    with pytest.raises(DataError, match=r"labels\.jsonl:5: not valid JSON"):
        LabelStore(path, items)


def test_a_failed_write_leaves_no_half_line(pairs, tmp_path, monkeypatch):
    import os

    items = load_items(pairs)
    store = LabelStore(tmp_path / "labels.jsonl", items)
    label(store, "w", items[0].id, lid="label-0001")
    before = store.path.read_bytes()
    real_write = os.write

    def half_write(fd, data):  # the disk fills up mid-line
        return real_write(fd, data[: len(data) // 2])

    with monkeypatch.context() as m:
        m.setattr(os, "write", half_write)
        with pytest.raises(OSError, match="short write"):
            label(store, "w", items[1].id, lid="label-0002")
    assert store.path.read_bytes() == before and "label-0002" not in store.labels
    label(store, "w", items[1].id, lid="label-0002")  # the retry lands on a clean line
    store.close()
    assert [r["label_id"] for r in read_labels(store.path)] == ["label-0001", "label-0002"]


def test_video_labels_need_every_segment(tmp_path):
    items = load_items(write_video_pairs(tmp_path / "vids", n=1))
    store = LabelStore(tmp_path / "labels.jsonl", items)
    it = items[0]
    with pytest.raises(ValueError, match="has 3 segments; got 2"):
        label(store, "v", it.id, "left", segments=["left", "tie"])
    rec, _ = label(store, "v", it.id, "left", segments=["left", "tie", "right"])
    a_left = rec["left"] == "a"
    assert rec["segment_labels"] == ([1, 0, -1] if a_left else [-1, 0, 1])


# --------------------------------------------------------------------------------------------------
# export and stats


def test_export_reads_back_with_the_training_readers(pairs, tmp_path):
    items = load_items(pairs)
    store = LabelStore(tmp_path / "labels.jsonl", items, overlap=3)
    votes = {"x": ["left", "left", "right"], "y": ["tie", "skip", "left"], "z": ["right", "left", "tie"]}
    for who, choices in votes.items():
        for it, choice in zip(items[:3], choices):
            label(store, who, it.id, choice)
    store.close()
    out = tmp_path / "export" / "pairs.jsonl"
    counts = export_labels(store.path, out)
    assert counts == {"labels": 9, "skips": 1, "items": 3, "rows": 8, "no_majority": 0}
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert {r["user"] for r in rows} == {"x", "y", "z"}
    records, c = load_pairs(out, keep_ties=True)
    assert c["rows"] == 8 and len(records) == 8
    assert {r.user_id for r in records} == {"x", "y", "z"}
    # each exported row says what the person chose, in terms of the original files
    by_key = {(r["user"], r["item"]): r for r in rows}
    for who, choices in votes.items():
        for it, choice in zip(items[:3], choices):
            if choice == "skip":
                assert (who, it.id) not in by_key
                continue
            a_left = not store.flipped(who, it.id)
            expected = 0.5 if choice == "tie" else float((choice == "left") == a_left)
            assert by_key[(who, it.id)]["label_0"] == expected
    counts = export_labels(store.path, out, majority=True)
    assert counts["rows"] + counts["no_majority"] == 3
    for r in (json.loads(x) for x in out.read_text().splitlines()):
        assert r["votes"] >= 2 and "user" not in r


def test_video_export_is_what_dense_dpo_reads(tmp_path):
    items = load_items(write_video_pairs(tmp_path / "vids", n=2))
    store = LabelStore(tmp_path / "labels.jsonl", items, overlap=2)
    for who in ("u1", "u2"):
        for it in items:
            label(store, who, it.id, "left", segments=["left", "left", "tie"])
    store.close()
    out = tmp_path / "video_export.jsonl"
    export_labels(store.path, out)
    recs = load_video_pairs(out)
    assert len(recs) == 4 and all(len(r.labels) == 3 and r.segment_seconds == 1.0 for r in recs)
    for r in recs:
        assert r.labels[2] == 0 and r.labels[0] == r.labels[1] == r.clip_label
    export_labels(store.path, out, majority=True)
    assert all(len(r.labels) == 3 for r in load_video_pairs(out))
    stats = label_stats(store.path)
    assert stats["segment_agreement"]["units"] == 6

    images = load_items(write_pair_images(tmp_path / "imgs", n=1))
    mixed = LabelStore(tmp_path / "mixed.jsonl", items + images)
    label(mixed, "u1", items[0].id, "tie", segments=["tie", "left", "tie"])
    label(mixed, "u1", images[0].id, "right")
    mixed.close()
    with pytest.raises(DataError, match="holds image and video labels; export each with --kind"):
        export_labels(mixed.path, out)
    assert (
        export_labels(mixed.path, out, kind="image")["rows"] == 1
        and len(load_pairs(out, keep_ties=True)[0]) == 1
    )
    assert (
        export_labels(mixed.path, out, kind="video")["rows"] == 1 and load_video_pairs(out)[0].labels[1] != 0
    )


def test_kappas_on_hand_worked_numbers():
    # p_o = 4/6, p_e = (3*3 + 2*3 + 1*0)/36 = 15/36 -> (24 - 15)/(36 - 15) = 9/21
    assert cohen_kappa(list("aabbat"), list("abbbaa")) == pytest.approx(9 / 21)
    assert cohen_kappa(list("ab"), list("ab")) == 1.0
    # Fleiss (1971) as worked on Wikipedia: 10 subjects, 14 raters, 5 categories -> 0.210
    table = [
        [0, 0, 0, 0, 14],
        [0, 2, 6, 4, 2],
        [0, 0, 3, 5, 6],
        [0, 3, 9, 2, 0],
        [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0],
        [3, 2, 6, 3, 0],
        [2, 5, 3, 2, 2],
        [6, 5, 2, 1, 0],
        [0, 2, 2, 3, 7],
    ]
    assert fleiss_kappa(table) == pytest.approx(0.20993, abs=1e-4)
    assert math.isnan(fleiss_kappa([[2, 0], [2, 0]]))


def test_stats_counts_times_agreement_and_reward(tmp_path):
    items = load_items(write_candidates(tmp_path / "c", groups=4, per_group=2))
    store = LabelStore(tmp_path / "labels.jsonl", items, overlap=2)
    # both people pick the higher-scored candidate (score = candidate index k) on every item
    for who in ("ann", "bob"):
        for it in items:
            a_better = it.scores[0] > it.scores[1]
            a_left = not store.flipped(who, it.id)
            label(store, who, it.id, "left" if a_better == a_left else "right")
    store.close()
    stats = label_stats(store.path)
    assert stats["people"]["ann"]["labels"] == 4 and stats["people"]["bob"]["median_s"] == 1.5
    assert stats["agreement"]["raters"] == ["ann", "bob"] and stats["agreement"]["percent_agreement"] == 1.0
    assert stats["reward_agreement"]["rate"] == 1.0 and stats["reward_agreement"]["labels"] == 8
