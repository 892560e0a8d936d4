"""Every CLIP-family reward on tiny random-init models of its real architecture, saved and loaded back.

The factories load from the temporary directories exactly as from a hub id; the expected scores are
recomputed here by hand from the models' own PIL processors and forward passes.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmalign.rewards import get_reward
from mmalign.toy.tiny_rewards import (
    build_tiny_aesthetic_head,
    build_tiny_hf_clip,
    build_tiny_hps_checkpoint,
    build_tiny_open_clip,
)

PROMPTS = ["a red circle", "a photo of a blue square", "a red circle"]


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    return build_tiny_hf_clip(tmp_path_factory.mktemp("hf-clip"), logit_scale=math.log(50.0))


@pytest.fixture(scope="module")
def oc_dir(tmp_path_factory):
    return build_tiny_open_clip(tmp_path_factory.mktemp("oc-clip"))


@pytest.fixture(scope="module")
def hps_dir(tmp_path_factory, oc_dir):
    d = tmp_path_factory.mktemp("hps")
    build_tiny_hps_checkpoint(d / "HPS_v2.1_compressed.pt", oc_dir, seed=7)
    return d


def uint8_images(n: int, h: int = 32, w: int = 32, seed: int = 0):
    """Images exactly representable in uint8, as PIL list and as a [n,3,h,w] tensor in [0, 1]."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    arrs = [(rng.random((h, w, 3)) * 255).astype(np.uint8) for _ in range(n)]
    tensor = torch.stack([torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in arrs])
    return [Image.fromarray(a) for a in arrs], tensor


def _hf_reference_cos(model_dir, pil_images, prompts):
    import transformers
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(model_dir).eval()
    proc_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    pixels = proc_cls.from_pretrained(model_dir)(images=pil_images, return_tensors="pt")["pixel_values"]
    tok = AutoTokenizer.from_pretrained(model_dir)(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(pixel_values=pixels, **tok)
    img, txt = F.normalize(out.image_embeds, dim=-1), F.normalize(out.text_embeds, dim=-1)
    return (img * txt).sum(-1), model


def test_pickscore_is_temperature_times_cosine(hf_clip):
    pil, x = uint8_images(3)
    reward = get_reward("pickscore", model=str(hf_clip), processor=str(hf_clip), device="cpu")
    cos, model = _hf_reference_cos(hf_clip, pil, PROMPTS)
    assert math.isclose(reward.scale, 50.0, rel_tol=1e-5)  # exp(logit_scale) with logit_scale = log 50
    assert torch.allclose(reward(x, PROMPTS), 50.0 * cos, atol=1e-4)


def test_pickscore_video_is_mean_over_frames_and_nonsquare_matches_processor(hf_clip):
    reward = get_reward("pickscore", model=str(hf_clip), processor=str(hf_clip), device="cpu")
    _, frames = uint8_images(4, seed=3)
    video = frames.view(2, 2, 3, 32, 32)
    per_frame = reward(frames, ["a cat", "a cat", "a dog", "a dog"]).view(2, 2).mean(1)
    assert torch.allclose(reward(video, ["a cat", "a dog"]), per_frame, atol=1e-5)
    pil, x = uint8_images(2, 48, 40, seed=4)  # resize + crop path
    cos, _ = _hf_reference_cos(hf_clip, pil, PROMPTS[:2])
    assert torch.allclose(reward(x, PROMPTS[:2]), 50.0 * cos, atol=0.05 * 50)


def test_reward_gradient_reaches_pixels_and_model_is_frozen(hf_clip):
    reward = get_reward("pickscore", model=str(hf_clip), processor=str(hf_clip), device="cpu")
    x = torch.rand(2, 3, 40, 36, requires_grad=True)
    reward(x, PROMPTS[:2]).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_clip_score_transformers_backend(hf_clip):
    pil, x = uint8_images(3, seed=1)
    cos, _ = _hf_reference_cos(hf_clip, pil, PROMPTS)
    reward = get_reward("clip_score", model=str(hf_clip), device="cpu")
    assert torch.allclose(reward(x, PROMPTS), 100 * cos.clamp_min(0), atol=1e-3)
    raw = get_reward("clip_score", model=str(hf_clip), scale=2.5, clamp_negative=False, device="cpu")
    assert torch.allclose(raw(x, PROMPTS), 2.5 * cos, atol=1e-4)


def _open_clip_reference(model_name, prompts, pil, state_dict=None, resize_mode="shortest"):
    import open_clip

    model = open_clip.create_model(model_name).eval()
    if state_dict is not None:
        model.load_state_dict(state_dict)
    tf = open_clip.image_transform(model.visual.image_size, is_train=False, resize_mode=resize_mode)
    tok = open_clip.get_tokenizer(model_name)
    with torch.no_grad():
        img = model.encode_image(torch.stack([tf(p) for p in pil]), normalize=True)
        txt = model.encode_text(tok(prompts), normalize=True)
    return (img * txt).sum(-1)


def test_clip_score_open_clip_backend(oc_dir):
    name = f"local-dir:{oc_dir}"
    pil, x = uint8_images(3, seed=2)
    reward = get_reward(
        "clip_score", model=name, backend="open_clip", scale=1.0, clamp_negative=False, device="cpu"
    )
    assert torch.allclose(reward(x, PROMPTS), _open_clip_reference(name, PROMPTS, pil), atol=1e-4)


def test_hpsv2_loads_checkpoint_strictly_and_scores_raw_cosine(oc_dir, hps_dir):
    name = f"local-dir:{oc_dir}"
    reward = get_reward("hpsv2.1", checkpoint=str(hps_dir), model=name, device="cpu")
    state = torch.load(hps_dir / "HPS_v2.1_compressed.pt", weights_only=True)["state_dict"]
    pil, x = uint8_images(3, 24, 32, seed=5)  # non-square: letterbox (longest side + pad) path
    expected = _open_clip_reference(name, PROMPTS, pil, state, resize_mode="longest")
    got = reward(x, PROMPTS)
    assert torch.allclose(got, expected, atol=0.02)
    base = get_reward(
        "clip_score", model=name, backend="open_clip", scale=1.0, clamp_negative=False, device="cpu"
    )
    assert not torch.allclose(got, base(x, PROMPTS), atol=1e-3)  # HPS weights, not the base ones, are in use
    assert torch.all(got.abs() <= 1.0)  # a cosine
    # square input: no resize, exact formula
    pil_sq, x_sq = uint8_images(3, seed=6)
    assert torch.allclose(
        reward(x_sq, PROMPTS), _open_clip_reference(name, PROMPTS, pil_sq, state, "longest"), atol=1e-4
    )


def test_hpsv2_rejects_a_mismatched_checkpoint(oc_dir, tmp_path):
    state = torch.load(oc_dir / "open_clip_pytorch_model.bin", weights_only=True)
    state["extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": state}, tmp_path / "HPS_v2_compressed.pt")
    with pytest.raises(RuntimeError, match="extra.weight"):
        get_reward(
            "hpsv2", checkpoint=str(tmp_path), version="v2.0", model=f"local-dir:{oc_dir}", device="cpu"
        )


def test_aesthetic_is_mlp_of_l2_normalised_embedding(hf_clip, tmp_path):
    from transformers import CLIPModel

    head_path = build_tiny_aesthetic_head(tmp_path / "aesthetic-model.pth", input_size=16)
    reward = get_reward("aesthetic", clip_model=str(hf_clip), head=str(tmp_path), device="cpu")
    pil, x = uint8_images(3, seed=8)
    model = CLIPModel.from_pretrained(hf_clip).eval()
    with torch.no_grad():
        pixels = (x - torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)) / torch.tensor(
            [0.26862954, 0.26130258, 0.27577711]
        ).view(1, 3, 1, 1)
        emb = model(pixel_values=pixels, input_ids=torch.zeros(3, 1, dtype=torch.long)).image_embeds
    state = torch.load(head_path, weights_only=True)
    w = [state[f"layers.{i}.weight"] for i in (0, 2, 4, 6, 7)]
    b = [state[f"layers.{i}.bias"] for i in (0, 2, 4, 6, 7)]
    h = emb / emb.norm(dim=-1, keepdim=True)
    for wi, bi in zip(w, b):  # linear layers only (dropout is off in eval)
        h = h @ wi.T + bi
    assert torch.allclose(reward(x, None), h.squeeze(-1), atol=1e-5)
    # normalisation: scaling the embedding (the visual projection) leaves the score unchanged
    with torch.no_grad():
        model.visual_projection.weight.mul_(3.0)
    scaled_dir = tmp_path / "scaled"
    model.save_pretrained(scaled_dir)
    from transformers import CLIPImageProcessor

    CLIPImageProcessor.from_pretrained(hf_clip).save_pretrained(scaled_dir)
    scaled = get_reward("aesthetic", clip_model=str(scaled_dir), head=str(head_path), device="cpu")
    assert torch.allclose(scaled(x, None), reward(x, None), atol=1e-5)
