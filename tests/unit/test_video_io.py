"""read_video / write_video on a clip the test writes itself; backends agree; sampling; corrupt files."""

from __future__ import annotations

import pytest
import torch

from mmalign.data.images import DataError
from mmalign.data.video import available_backends, read_video, sample_indices, write_video
from mmalign.toy.render import render_video

pytest.importorskip("av")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    frames = render_video("a red circle", seed=3, frames=16, size=32, flicker_segment=1)
    path = write_video(tmp_path_factory.mktemp("video") / "clip.mp4", frames, fps=8)
    return path, frames


def test_roundtrip_close_to_the_written_frames(clip):
    path, frames = clip
    video = read_video(path, backend="pyav")
    assert video.frames.shape == (16, 3, 32, 32) and video.frames.dtype == torch.float32
    assert video.fps == pytest.approx(8.0)
    assert (video.frames - frames).abs().mean().item() < 0.03  # near-lossless H.264
    assert video.timestamps.tolist() == pytest.approx([i / 8 for i in range(16)])


def test_lossless_writes_exact_pixels_that_yuv420p_would_blur(tmp_path):
    from mmalign.toy.rewards import color_match

    frames = render_video("a small red circle", seed=3, frames=4, size=32)
    exact = (frames * 255).round().to(torch.uint8)
    odd = exact[..., :31, :29]  # rgb24 needs no even sides, so no padding either
    for backend in available_backends():
        for original in (exact, odd):
            path = write_video(
                tmp_path / f"{backend}-{original.shape[-1]}.mp4", original, fps=4, lossless=True
            )
            got = (read_video(path, backend=backend).frames * 255).round().to(torch.uint8)
            assert torch.equal(got, original), backend
    # the default (yuv420p) keeps chroma at half resolution: a small shape loses colour on a round trip
    blurred = read_video(write_video(tmp_path / "yuv.mp4", frames, fps=4), backend="pyav").frames
    prompt = ["a small red circle"]
    assert color_match()(blurred[None], prompt) < color_match()(frames[None], prompt) - 0.05  # 0.71 vs 0.83


def test_backends_agree(clip):
    path, _ = clip
    backends = available_backends()
    if len(backends) < 2:
        pytest.skip(f"only {backends} installed")
    ref = read_video(path, backend=backends[0])
    for other in backends[1:]:
        got = read_video(path, backend=other)
        assert got.fps == pytest.approx(ref.fps)
        assert (got.frames - ref.frames).abs().max().item() <= 2 / 255  # same decoder, same frames


def test_sampling_modes(clip):
    path, _ = clip
    v = read_video(path, fps=4, backend="pyav")
    assert v.frames.shape[0] == 8 and v.fps == 4.0
    assert v.timestamps.tolist() == pytest.approx([k / 4 for k in range(8)])
    full = read_video(path, backend="pyav").frames
    assert torch.equal(v.frames, full[::2])
    v = read_video(path, num_frames=5, backend="pyav")
    assert v.timestamps.tolist() == pytest.approx(
        [0, 4 / 8, 8 / 8, 11 / 8, 15 / 8]
    )  # round(linspace(0, 15, 5))
    v = read_video(path, fps=4, num_frames=3, backend="pyav")
    assert v.frames.shape[0] == 3 and torch.equal(v.frames, full[0:6:2])
    # 10 frames at 30 fps last 1/3 s: ticks at 0, 0.1, 0.2 s at 10 fps -> frames 0, 3, 6
    assert sample_indices(10, 30.0, fps=10) == ([0, 3, 6], 10.0)
    with pytest.raises(DataError, match="clip.mp4.*only 8"):
        read_video(path, fps=4, num_frames=9, backend="pyav")


@pytest.mark.parametrize("backend", ["pyav", "decord"])
def test_corrupt_and_missing_files_name_the_file(tmp_path, backend):
    if backend not in available_backends():
        pytest.skip(f"{backend} not installed")
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00not a video" * 64)
    with pytest.raises(DataError, match="broken.mp4"):
        read_video(bad, backend=backend)
    with pytest.raises(DataError, match="missing.mp4.*not found"):
        read_video(tmp_path / "missing.mp4", backend=backend)


def test_unknown_backend():
    with pytest.raises(ValueError, match="decord"):
        read_video("x.mp4", backend="ffmpeg-cli")
