"""Segment labels -> latent-frame labels for each temporal compression; manifest parsing and the skip rule."""

from __future__ import annotations

import json

import pytest
import torch

from mmalign.data.images import DataError
from mmalign.data.segments import (
    clip_label,
    consistent_labels,
    frame_segments,
    keep_record,
    labels_from_scores,
    latent_frame_groups,
    latent_labels,
    load_video_pairs,
    num_segments,
)


def fps_segments(n: int, fps: float, s: float = 1.0) -> torch.Tensor:
    return frame_segments(torch.arange(n) / fps, s, duration=n / fps)


def test_causal_4x_nine_frames_three_latents():
    assert [list(r) for r in latent_frame_groups(9, 4)] == [[0], [1, 2, 3, 4], [5, 6, 7, 8]]
    # 9 frames at 4 fps with 1 s segments: frames 0-3 seg 0, 4-7 seg 1, frame 8 seg 2 -> 2 segments (round(2.25))
    seg = fps_segments(9, 4)
    assert seg.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1]
    # latent 1 holds frames 1-4 (segments 0 and 1): straddles -> tie
    assert latent_labels([1, -1], seg, 4, straddle="tie").tolist() == [1, 0, -1]
    assert latent_labels([1, 1], seg, 4, straddle="tie").tolist() == [1, 0, 1]
    assert latent_labels([1, 1], seg, 4, straddle="agree").tolist() == [1, 1, 1]


def test_compression_one_is_one_label_per_frame():
    seg = fps_segments(6, 2)  # 3 segments of 2 frames
    assert latent_labels([1, 0, -1], seg, 1).tolist() == [1, 1, 0, 0, -1, -1]


def test_paper_arithmetic_121_frames_24fps():
    seg = fps_segments(121, 24)
    assert (
        num_segments(121 / 24) == 5 and int(seg.max()) == 4
    )  # frame 120 joins segment 4, no one-frame segment
    lab = latent_labels([1, -1, 1, -1, 1], seg, 4, straddle="tie")
    assert lab.numel() == 31
    # latent j covers frames 4j-3..4j; segment boundaries at frames 24, 48, 72, 96 fall in latents 6, 12, 18, 24
    assert [j for j in range(31) if lab[j] == 0] == [6, 12, 18, 24]
    assert lab[:6].tolist() == [1] * 6 and lab[7:12].tolist() == [-1] * 5


def test_mochi_6x_and_ltx_8x():
    assert len(latent_frame_groups(7, 6)) == 2  # Mochi: 7 frames -> 2 latents
    seg = fps_segments(13, 6)  # 6 fps: frames 0-5 seg 0, 6-11 seg 1, 12 -> seg 1 (round(13/6) = 2)
    assert latent_labels([-1, 1], seg, 6, straddle="tie").tolist() == [
        -1,
        0,
        1,
    ]  # latent 1 = frames 1-6 straddles
    seg = fps_segments(17, 8)  # LTX 8x: latents {0}, {1..8}, {9..16}; segments 0-7, 8-16
    assert latent_labels([1, -1], seg, 8, straddle="tie").tolist() == [1, 0, -1]


def test_majority_gives_a_straddling_latent_the_label_of_three_of_its_four_frames():
    seg = fps_segments(9, 4)  # latent 1 = frames 1-4: three in segment 0, one in segment 1
    assert latent_labels([1, -1], seg, 4).tolist() == [1, 1, -1]  # majority is the default
    assert latent_labels([1, -1], seg, 4, straddle="majority").tolist() == [1, 1, -1]
    # a 2-2 split between different labels is a tie; between equal labels it keeps the label
    two_two = torch.tensor([0, 0, 0, 1, 1])  # latent 1 = frames 1-4: segments 0, 0, 1, 1
    assert latent_labels([1, -1], two_two, 4, straddle="majority").tolist() == [1, 0]
    assert latent_labels([1, 1], two_two, 4, straddle="majority").tolist() == [1, 1]


@pytest.mark.parametrize(
    ("frames", "fps", "ties_before"), [(49, 8, 5), (81, 16, 4)], ids=["cogvideox", "wan"]
)
def test_majority_leaves_no_tie_when_every_segment_is_labelled(frames, fps, ties_before):
    """The recipes' 1-second segments fall one frame into a causal 4x latent: tie mode ties 5/13 (CogVideoX) and
    4/21 (Wan) latents of fully labelled clips; majority ties none."""
    seg = fps_segments(frames, fps)
    labels = [1 if i % 2 == 0 else -1 for i in range(int(seg.max()) + 1)]
    assert int((latent_labels(labels, seg, 4, straddle="tie") == 0).sum()) == ties_before
    assert int((latent_labels(labels, seg, 4) == 0).sum()) == 0


def test_non_causal_grouping():
    assert [list(r) for r in latent_frame_groups(8, 4, causal=False)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert latent_labels([1, -1], fps_segments(8, 4), 4, causal=False).tolist() == [1, -1]


def test_too_few_labels_raises():
    with pytest.raises(ValueError, match="segment labels"):
        latent_labels([1], fps_segments(8, 4), 1)


def test_clip_label_majority_and_reward_labels():
    assert clip_label([1, 1, -1, 0]) == 1 and clip_label([1, -1]) == 0 and clip_label([-1, 0, 0]) == -1
    s0 = torch.tensor([[0.9, 0.5, 0.1]])
    s1 = torch.tensor([[0.1, 0.52, 0.8]])
    assert labels_from_scores(s0, s1, margin=0.05).tolist() == [[1, 0, -1]]
    # judge asked (0, 1) says [first, second, first, tie]; asked (1, 0) says [second, second, first, tie]
    first = torch.tensor([1, -1, 1, 0])
    swapped = torch.tensor([-1, -1, 1, 0])
    assert consistent_labels(first, swapped).tolist() == [1, 0, 0, 0]


def test_manifest_and_skip_rule(tmp_path):
    rows = [
        {
            "prompt": "a red circle",
            "video_0": "a.mp4",
            "video_1": "b.mp4",
            "labels": [1, 0, 0, 0, 0],
        },  # 20% -> skipped
        {
            "prompt": "a red circle",
            "video_0": "a.mp4",
            "video_1": "b.mp4",
            "labels": [1, -1, 0, 0, 0],
        },  # 40% kept
        {
            "prompt": "a red circle",
            "video_0": "a.mp4",
            "video_1": "b.mp4",
            "labels": [1, -1, 0, 0, 0],
            "label": -1,
        },
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recs = load_video_pairs(path)
    assert recs[0].video_0 == str(tmp_path / "a.mp4")
    assert [keep_record(r, dense=True) for r in recs] == [False, True, True]
    assert [keep_record(r, dense=False) for r in recs] == [True, False, True]  # vanilla: clip ties dropped
    path.write_text(json.dumps({"prompt": "x", "video_0": "a", "video_1": "b", "labels": [2]}) + "\n")
    with pytest.raises(DataError, match=r"pairs.jsonl:1.*\+1 / 0 / -1"):
        load_video_pairs(path)
    path.write_text(json.dumps({"prompt": "x", "video_0": "a", "labels": [1]}) + "\n")
    with pytest.raises(DataError, match="video_1"):
        load_video_pairs(path)


def test_explicit_segments_label_the_frames_they_cover(tmp_path):
    """A row's explicit ``segments`` (what ``mmalign annotate export`` writes when the manifest gave them) place
    each label on the frames of its own interval; a label count that is not the segment count is refused by row,
    where a 1 s segment rule would have trained one label and dropped the others."""
    from mmalign.data.segments import decode_video_pair, explicit_frame_segments
    from mmalign.data.video import write_video
    from mmalign.toy.render import render_video

    assert explicit_frame_segments(torch.arange(9) / 16, [(0, 0.1), (0.1, 0.2), (0.2, 0.562)]).tolist() == [
        0,
        0,
        1,
        1,
        2,
        2,
        2,
        2,
        2,
    ]  # frames at 0, 1/16, ... s
    for i in (0, 1):
        write_video(tmp_path / f"{i}.mp4", render_video("a red circle", seed=i, frames=9, size=16), 16)
    row = {"prompt": "p", "video_0": "0.mp4", "video_1": "1.mp4", "labels": [1, -1, 1]}
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({**row, "segments": [[0, 0.1], [0.1, 0.2], [0.2, 0.562]]}) + "\n")
    (rec,) = load_video_pairs(path)
    assert rec.segments == [(0, 0.1), (0.1, 0.2), (0.2, 0.562)] and "segments" not in rec.extra
    shape = dict(height=16, width=16, fps=None, num_frames=None, segment_seconds=1.0)
    decoded = decode_video_pair(rec, compression=1, causal=False, **shape)
    assert decoded["labels"].tolist() == [1, 1, -1, -1, 1, 1, 1, 1, 1]  # the annotator's -1 is kept
    causal = decode_video_pair(rec, compression=4, causal=True, **shape)  # latents: {0}, {1-4}, {5-8}
    assert causal["labels"].tolist() == [1, 0, 1]  # frames 1-4 are 1, -1, -1, 1: a 2-2 split is a tie

    for bad, match in (
        ([[0, 0.1], [0.1, 0.562]], "3 labels but 2 segments"),
        ([[0, 0.1], [0.05, 0.2], [0.2, 0.5]], "segment 1 = \\[0.05, 0.2\\] must start"),
        ("nonsense", "segments must be a list of \\[start, end\\] seconds"),
    ):
        path.write_text(json.dumps({**row, "segments": bad}) + "\n")
        with pytest.raises(DataError, match=f"pairs.jsonl:1: {match}"):
            load_video_pairs(path)
