"""Tensor preprocessing vs each model's own PIL processor, differentiability, and the transformers-5 shim."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmalign.rewards.preprocess import (
    ImageTransform,
    as_tensor,
    pad_to_square,
    transform_from_hf_processor,
    video_to_frames,
)

SIZES = [(45, 60), (80, 50), (200, 150), (32, 32)]


def _smooth_image(h: int, w: int, seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = (rng.random((h // 4 + 1, w // 4 + 1, 3)) * 255).astype(np.uint8)
    img = Image.fromarray(base).resize((w, h), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div(255)[None]
    return img, x


def _pil_clip_processor():
    import transformers

    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return cls(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


@pytest.mark.parametrize("hw", SIZES)
def test_shortest_side_crop_matches_transformers_pil_processor(hw):
    img, x = _smooth_image(*hw, seed=hw[0])
    proc = _pil_clip_processor()
    ref = torch.from_numpy(np.asarray(proc(images=img, return_tensors="np")["pixel_values"]))
    out = transform_from_hf_processor(proc)(x)
    assert out.shape == ref.shape == (1, 3, 32, 32)
    # PIL resizes uint8 pixels: differences stay around one grey level / std
    assert (out - ref).abs().max() < 0.03
    assert (out - ref).abs().mean() < 0.01


@pytest.mark.parametrize("hw", SIZES)
@pytest.mark.parametrize("mode", ["shortest", "longest"])
def test_matches_open_clip_pil_transform(hw, mode):
    import open_clip

    img, x = _smooth_image(*hw, seed=hw[1])
    ref = open_clip.image_transform(32, is_train=False, resize_mode=mode)(img)[None]
    out = ImageTransform(32, mode, crop_rounding="round")(x)
    assert (out - ref).abs().max() < 0.03
    assert (out - ref).abs().mean() < 0.01


def test_letterbox_pads_with_black_before_normalising():
    x = torch.ones(1, 3, 16, 32)  # wide white image -> 16x32 content centred in 32x32
    tf = ImageTransform(32, "longest")
    out = tf(x)
    mean = torch.tensor(tf.mean).view(3, 1)
    std = torch.tensor(tf.std).view(3, 1)
    assert torch.allclose(out[0, :, 0, :], ((0 - mean) / std).expand(3, 32))  # pad row
    assert torch.allclose(out[0, :, 16, :], ((1 - mean) / std).expand(3, 32))  # content row
    assert pad_to_square(torch.zeros(1, 1, 3, 5), 6).shape == (1, 1, 6, 6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_cpu_resizes_like_float32(dtype):
    """torch has no CPU antialiased-bicubic kernel in half precision: the resize runs in float32 there and the
    result comes back in the caller's dtype (a bf16 reward on CPU used to raise NotImplementedError)."""
    _, x = _smooth_image(45, 60, seed=3)
    for mode in ("shortest", "squash", "longest"):
        tf = ImageTransform(32, mode)
        out = tf(x.to(dtype))
        assert out.dtype == dtype and out.shape == (1, 3, 32, 32)
        torch.testing.assert_close(out.float(), tf(x), atol=3e-2, rtol=0)


def test_gradient_reaches_input_pixels():
    x = torch.rand(2, 3, 40, 56, requires_grad=True)
    for mode in ("shortest", "longest", "squash"):
        x.grad = None
        ImageTransform(24, mode)(x).square().sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0


def test_as_tensor_accepts_tensor_and_output_object():
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    emb = torch.randn(2, 8)
    assert as_tensor(emb) is emb
    wrapped = BaseModelOutputWithPooling(last_hidden_state=torch.randn(2, 3, 8), pooler_output=emb)
    assert as_tensor(wrapped) is emb
    with pytest.raises(TypeError):
        as_tensor(object())


def test_video_to_frames_flattens_time():
    v = torch.rand(2, 5, 3, 8, 8)
    frames, t = video_to_frames(v)
    assert t == 5 and frames.shape == (10, 3, 8, 8)
    assert torch.equal(frames[5], v[1, 0])
    with pytest.raises(ValueError, match="expected images"):
        video_to_frames(torch.rand(3, 8, 8))
