"""Rule rewards on hand-built images and videos."""

from __future__ import annotations

import math

import pytest
import torch

from mmalign.rewards import get_reward


def solid(rgb, h=8, w=8):
    return torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, h, w).clone()


def test_brightness_saturation_contrast_by_hand():
    red = solid([1.0, 0.0, 0.0])
    grey = solid([0.5, 0.5, 0.5])
    x = torch.cat([red, grey])
    assert torch.allclose(get_reward("brightness")(x, ["", ""]), torch.tensor([0.299, 0.5]))
    assert torch.allclose(get_reward("saturation")(x, ["", ""]), torch.tensor([1.0, 0.0]))
    assert torch.allclose(get_reward("brightness", target=0.5)(x, ["", ""]), torch.tensor([-0.201, 0.0]))
    half = torch.zeros(1, 3, 4, 4)
    half[..., :, :2] = 1.0  # luma 0 and 1 in equal parts: RMS contrast 0.5
    assert torch.allclose(get_reward("contrast")(half, [""]), torch.tensor([0.5]))


def test_sharpness_and_colorfulness_order():
    flat = solid([0.5, 0.5, 0.5], 16, 16)
    checker = ((torch.arange(16).view(-1, 1) + torch.arange(16)) % 2).float().expand(1, 3, 16, 16)
    s = get_reward("sharpness")(torch.cat([flat, checker]), ["", ""])
    assert s[0] == 0 and s[1] > 1.0
    c = get_reward("colorfulness")(torch.cat([flat, solid([1.0, 0.0, 0.0], 16, 16)]), ["", ""])
    # red: rg = 1, yb = 0.5, no spread -> 0.3 * sqrt(1 + 0.25)
    assert c[0] == 0 and math.isclose(float(c[1]), 0.3 * math.sqrt(1.25), rel_tol=1e-5)


def test_color_match_reads_the_prompt_and_reports_confidence():
    r = get_reward("color_match")
    x = torch.cat([solid([1.0, 0.0, 0.0]), solid([0.0, 0.0, 1.0]), solid([1.0, 0.0, 0.0])])
    prompts = ["a red circle", "a red circle", "a circle"]
    s = r(x, prompts)
    assert math.isclose(float(s[0]), 1.0, abs_tol=1e-6)
    assert math.isclose(float(s[1]), 1 - math.sqrt(2) / math.sqrt(3), rel_tol=1e-5)
    assert s[2] == 0
    assert torch.equal(r.confidence(x, prompts), torch.tensor([1.0, 1.0, 0.0]))


def test_jpeg_size_prefers_detail_and_compressibility_is_its_negative():
    torch.manual_seed(0)
    x = torch.cat([solid([0.5, 0.5, 0.5], 32, 32), torch.rand(1, 3, 32, 32)])
    size = get_reward("jpeg_size")(x, ["", ""])
    assert size[1] > size[0] > 0
    assert torch.equal(get_reward("jpeg_compressibility")(x, ["", ""]), -size)


def test_resolution_and_aspect_ratio():
    x = torch.zeros(2, 3, 256, 512)
    assert torch.allclose(get_reward("resolution", min_side=512)(x, ["", ""]), torch.tensor([0.5, 0.5]))
    assert torch.allclose(get_reward("aspect_ratio", target=2.0)(x, ["", ""]), torch.ones(2))
    assert math.isclose(float(get_reward("aspect_ratio")(x, [""])[0]), 0.5, rel_tol=1e-6)  # exp(-log 2)


def test_duration_and_frame_rate_use_fps():
    v = torch.zeros(1, 16, 3, 4, 4)
    assert math.isclose(float(get_reward("duration", target_seconds=2.0)(v, [""], fps=8)), 1.0)
    assert math.isclose(
        float(get_reward("duration", target_seconds=3.0, fps=8)(v, [""])), math.exp(-1.0), rel_tol=1e-6
    )
    assert math.isclose(float(get_reward("frame_rate", target_fps=16)(v, [""], fps=8)), 0.5)
    with pytest.raises(ValueError, match="fps"):
        get_reward("duration")(v, [""])


def test_flicker_and_motion_per_clip_and_per_segment():
    t = 8
    v = torch.zeros(1, t, 3, 2, 2)
    v[0, 5] = 1.0  # one bright frame in the second half
    flick = get_reward("flicker")(v, [""])
    # second differences: at frames 4, 5, 6 -> |1|, |-2|, |1| over 6 interior frames
    assert torch.allclose(flick, torch.tensor([-4.0 / 6]))
    per_seg = get_reward("flicker", segment_frames=4)(v, [""])
    assert per_seg.shape == (1, 2)
    # interior frames 1..6: segment 0 holds frames 1-3 (0), segment 1 holds 4-6 (1, 2, 1)
    assert torch.allclose(per_seg, torch.tensor([[0.0, -4.0 / 3]]))
    seg_by_seconds = get_reward("flicker", segment_seconds=1.0)(v, [""], fps=4)
    assert torch.equal(seg_by_seconds, per_seg)

    ramp = torch.linspace(0, 1, t).view(1, t, 1, 1, 1).expand(1, t, 3, 2, 2)
    assert torch.allclose(get_reward("flicker")(ramp, [""]), torch.zeros(1), atol=1e-6)  # smooth change
    assert torch.allclose(get_reward("motion")(ramp, [""]), torch.tensor([1.0 / (t - 1)]))
    with pytest.raises(ValueError, match="videos"):
        get_reward("motion")(torch.zeros(1, 3, 4, 4), [""])


def test_per_segment_scores_count_segments_as_dense_dpo():
    """The S scores of a clip line up with its S DenseDPO/annotate segments (a short tail joins the last one)."""
    from mmalign.data.segments import num_segments

    for frames, fps in ((81, 16), (49, 8), (24, 10), (9, 8), (20, 8)):
        v = torch.rand(1, frames, 3, 2, 2)
        scores = get_reward("flicker", segment_seconds=1.0)(v, [""], fps=fps)
        assert scores.shape[-1] == num_segments(frames / fps, 1.0), (frames, fps)
        assert (scores != 0).all()  # every segment holds measured frames (no empty tail reading "steady")


def test_image_rules_average_video_frames():
    v = torch.stack([solid([0.0, 0.0, 0.0])[0], solid([1.0, 1.0, 1.0])[0]]).unsqueeze(0)
    assert torch.allclose(get_reward("brightness")(v, [""]), torch.tensor([0.5]))
