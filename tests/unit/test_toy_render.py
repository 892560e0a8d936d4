"""The toy renderer: determinism, captions, defects, video motion and flicker."""

import pytest
import torch

from mmalign.toy.render import (
    BACKGROUND,
    COLORS,
    TOY_WORDS,
    ShapeSpec,
    all_captions,
    image_grid,
    parse_caption,
    render_image,
    render_video,
    sample_dataset,
    segment_frames,
)


def test_same_seed_same_pixels_other_seed_other_layout():
    a = render_image("a red circle", seed=3)
    assert torch.equal(a, render_image("a red circle", seed=3))
    assert not torch.equal(a, render_image("a red circle", seed=4))
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32
    assert 0 <= a.min() and a.max() <= 1


def test_dataset_is_reproducible_and_defect_rates_follow_options():
    x1, rows1 = sample_dataset(200, seed=1, p_speckle=0.5, p_wrong_color=0.25)
    x2, rows2 = sample_dataset(200, seed=1, p_speckle=0.5, p_wrong_color=0.25)
    assert torch.equal(x1, x2) and rows1 == rows2
    assert 0.35 < sum(r.speckle > 0 for r in rows1) / 200 < 0.65
    assert 0.15 < sum(r.wrong_color for r in rows1) / 200 < 0.35


def test_captions_round_trip_and_use_only_toy_words():
    spec = ShapeSpec("blue", "square", size="small", position="left")
    assert spec.caption() == "a small blue square on the left"
    assert parse_caption(spec.caption()) == spec
    for caption in [*all_captions(), spec.caption()]:
        assert set(caption.split()) <= set(TOY_WORDS)
    with pytest.raises(ValueError, match="colour"):
        parse_caption("a cat")
    with pytest.raises(ValueError, match="unknown colour"):
        ShapeSpec("pink", "circle")


def _shape_color(image):
    sat = image.amax(0) - image.amin(0)
    return image[:, sat > 0.4].mean(dim=1)


def test_shape_has_prompt_colour_unless_wrong_colour_defect():
    red = torch.tensor(COLORS["red"])
    clean = render_image("a red circle", seed=0)
    wrong = render_image("a red circle", seed=0, wrong_color=True)
    assert (_shape_color(clean) - red).abs().max() < 0.06
    assert (_shape_color(wrong) - red).abs().max() > 0.2
    background = clean[:, 0, 0]  # corner pixel of a centred shape
    assert torch.allclose(background, torch.tensor(BACKGROUND))


def test_size_and_position_words_change_the_drawing():
    def area(img):
        return ((img.amax(0) - img.amin(0)) > 0.3).float().sum()

    assert area(render_image("a large red square", seed=0)) > 2 * area(
        render_image("a small red square", seed=0)
    )
    left = render_image("a red circle on the left", seed=0)
    cols = ((left.amax(0) - left.amin(0)) > 0.3).nonzero()[:, 1].float()
    assert cols.mean() < 14


def test_speckle_changes_only_a_fraction_of_pixels():
    clean = render_image("a green triangle", seed=2)
    noisy = render_image("a green triangle", seed=2, speckle=0.05)
    changed = (clean - noisy).abs().amax(0) > 1e-6
    assert 0.02 < changed.float().mean() < 0.08


def test_video_moves_the_shape_and_flicker_hits_one_segment():
    video = render_video("a yellow square", seed=5, frames=16)
    assert video.shape == (16, 3, 32, 32)
    assert torch.equal(video, render_video("a yellow square", seed=5, frames=16))

    def centroid(frame):
        mask = (frame.amax(0) - frame.amin(0)) > 0.3
        return mask.nonzero().float().mean(0)

    assert (centroid(video[0]) - centroid(video[-1])).norm() > 3  # pixels travelled
    flick = render_video("a yellow square", seed=5, frames=16, flicker_segment=2, segments=4)
    diff = (flick - video).abs().mean(dim=(1, 2, 3))
    assert (diff[8:12] > 0.05).all() and (diff[:8] == 0).all() and (diff[12:] == 0).all()
    with pytest.raises(ValueError):
        render_video("a red circle", seed=0, flicker_segment=4, segments=4)


def test_segment_frames_cover_all_frames():
    parts = segment_frames(10, 3)
    assert [i for r in parts for i in r] == list(range(10))
    assert all(len(r) >= 3 for r in parts)


def test_image_grid_size():
    images, _ = sample_dataset(10, seed=0)
    grid = image_grid(images, nrow=4, scale=2, pad=1)
    assert grid.size == (2 * (4 * 33 + 1), 2 * (3 * 33 + 1))
