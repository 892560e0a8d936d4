"""Toy rewards on known images: exact answers because the world's drawing rules are known."""

import pytest
import torch

from mmalign.toy.render import render_image, render_video, sample_dataset
from mmalign.toy.rewards import (
    color_correct,
    color_match,
    defect_energy,
    flicker,
    mean_color_match,
    shape_match,
)


def test_red_circle_matches_red_not_blue():
    img = torch.stack([render_image("a red circle", seed=s) for s in range(4)])
    red = color_match()(img, ["a red circle"] * 4)
    blue = color_match()(img, ["a blue circle"] * 4)
    assert red.shape == (4,)
    assert (red > 0.75).all() and (blue < 0.05).all()
    assert color_correct()(img, ["a red circle"] * 4).tolist() == [1.0] * 4
    assert color_correct()(img, ["a blue circle"] * 4).tolist() == [0.0] * 4


def test_color_match_is_continuous_between_right_and_wrong():
    right = render_image("a red square", seed=1)
    wrong = render_image("a red square", seed=1, wrong_color=True)
    cols = ((right.amax(0) - right.amin(0)) > 0.3).nonzero()[:, 1]
    mid = int(cols.float().mean().round())
    half = right.clone()
    half[:, :, mid:] = wrong[:, :, mid:]  # right colour on the shape's left half, wrong on its right half
    scores = color_match()(torch.stack([right, half, wrong]), ["a red square"] * 3)
    assert scores[0] > scores[1] > scores[2]
    assert 0.25 < scores[1] < 0.65


def test_blank_image_scores_zero_colour():
    blank = torch.full((1, 3, 32, 32), 0.9)
    assert color_match()(blank, ["a red circle"]).item() == pytest.approx(0.0, abs=1e-6)


def test_speckle_lowers_defect_reward_monotonically():
    img = render_image("a blue triangle", seed=0)
    batch = torch.stack(
        [img] + [render_image("a blue triangle", seed=0, speckle=a) for a in (0.02, 0.05, 0.1)]
    )
    scores = defect_energy()(batch, ["a blue triangle"] * 4)
    assert scores[0] > 0.8
    assert (scores[:-1] > scores[1:]).all()
    assert scores[2] < 0.3


def test_shape_match_prefers_the_drawn_shape():
    images, rows = sample_dataset(60, seed=3)
    right = shape_match()(images, [r.caption for r in rows])
    swap = {"circle": "triangle", "square": "triangle", "triangle": "square"}
    wrong = shape_match()(images, [f"a {r.spec.color} {swap[r.spec.shape]}" for r in rows])
    assert (right > wrong).float().mean() > 0.95
    assert right.mean() > 0.7


def test_video_rewards_accept_5d_media():
    video = render_video("a green circle", seed=0, frames=8)[None]
    assert color_match()(video, ["a green circle"]).item() > 0.75
    assert defect_energy()(video, ["a green circle"]).item() > 0.8


def test_flicker_segment_is_detected():
    clean = render_video("a purple square", seed=1, frames=16)
    flick = render_video("a purple square", seed=1, frames=16, flicker_segment=1, segments=4)
    videos = torch.stack([clean, flick])
    per_seg = flicker(segments=4, per_segment=True)(videos, ["a purple square"] * 2)
    assert per_seg.shape == (2, 4)
    assert (per_seg[0] > 0.9).all()
    assert per_seg[1].argmin().item() == 1 and per_seg[1, 1] < 0.1
    assert per_seg[1, 3] > 0.9  # far from the flicker
    clip = flicker(segments=4)(videos, ["a purple square"] * 2)
    assert clip[0] > 0.9 > 0.1 > clip[1]
    with pytest.raises(ValueError, match="videos"):
        flicker()(clean, None)


def test_prompt_count_must_match_and_registry_names_factories():
    img = render_image("a red circle", seed=0)[None]
    with pytest.raises(ValueError, match="prompts"):
        color_match()(img, ["a red circle", "a red circle"])
    from mmalign.rewards import get_reward

    for name in ("toy_color", "toy_color_correct", "toy_defect", "toy_shape", "toy_flicker"):
        assert callable(get_reward(name)), name
    assert get_reward("toy_color")(img, ["a red circle"]).item() > 0.75


def test_mean_colour_match_by_hand_and_robust_to_soft_edges():
    from mmalign.toy.render import COLORS

    # a flat square of exactly the prompt colour on grey: mean colour = target -> exp(0) = 1
    img = torch.full((1, 3, 32, 32), 0.5)
    img[0, :, 8:24, 8:24] = torch.tensor(COLORS["red"]).view(3, 1, 1)
    assert mean_color_match()(img, ["a red square"]).item() == pytest.approx(1.0, abs=1e-5)
    # shift the whole shape by d in one channel: score = exp(-d^2 / (2 sigma^2))
    shifted = img.clone()
    shifted[0, 1, 8:24, 8:24] += 0.1
    assert mean_color_match()(shifted, ["a red square"]).item() == pytest.approx(
        torch.exp(torch.tensor(-0.01 / 0.08)).item(), abs=1e-4
    )
    # blur the edges (average with the grey background): the per-pixel score drops more than the mean-colour one
    blurred = torch.nn.functional.avg_pool2d(img, 3, stride=1, padding=1, count_include_pad=False)
    drop_pixels = color_match()(img, ["a red square"]) - color_match()(blurred, ["a red square"])
    drop_mean = mean_color_match()(img, ["a red square"]) - mean_color_match()(blurred, ["a red square"])
    assert drop_pixels.item() > drop_mean.item() >= 0
