"""Adapters: scheduler maths against diffusers, family detection, encode/predict shapes on tiny models."""

import pytest
import torch
from diffusers import DDPMScheduler

from mmalign.pipelines import detect_family, load_pipeline, make_adapter
from mmalign.pipelines.base import (
    ddpm_add_noise,
    ddpm_target,
    per_frame_mse,
    per_sample_mse,
    x0_and_eps,
    x0_error_weight,
)
from mmalign.pipelines.sdxl import sdxl_time_ids


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_target_and_noise_match_diffusers_scheduler(prediction_type):
    sched = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type
    )
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    torch.testing.assert_close(ddpm_add_noise(sched, x0, noise, t), sched.add_noise(x0, noise, t))
    expected = {"epsilon": noise, "v_prediction": sched.get_velocity(x0, noise, t), "sample": x0}[
        prediction_type
    ]
    torch.testing.assert_close(ddpm_target(sched, x0, noise, t), expected)
    # works for video latents [B,C,T,H,W] too
    video = x0.unsqueeze(2).repeat(1, 1, 3, 1, 1)
    assert ddpm_add_noise(sched, video, video, t).shape == video.shape


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_x0_error_weight_is_the_x0_error_of_a_target_error(prediction_type):
    from types import SimpleNamespace

    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    adapter = SimpleNamespace(noise_process="ddpm", scheduler=sched)
    t = torch.tensor([10, 500, 990])
    x, out = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    step = 1e-3 * torch.randn_like(out)  # an error in the target space ...
    abar = sched.alphas_cumprod[t]
    moved = x0_and_eps(out + step, x, abar, prediction_type)[0] - x0_and_eps(out, x, abar, prediction_type)[0]
    ratio = moved.pow(2).flatten(1).mean(1) / step.pow(2).flatten(1).mean(1)  # ... moves x0 by this much
    torch.testing.assert_close(x0_error_weight(adapter, t), ratio, rtol=1e-3, atol=1e-6)
    flow = SimpleNamespace(noise_process="flow")  # x0 = x_t - sigma v, t = 1000 sigma
    torch.testing.assert_close(
        x0_error_weight(flow, torch.tensor([250.0, 1000.0])), torch.tensor([0.0625, 1.0])
    )


def test_per_sample_and_per_frame_mse():
    pred = torch.zeros(2, 4, 3, 2, 2)
    target = torch.ones(2, 4, 3, 2, 2)
    target[1, :, 2] = 3.0
    torch.testing.assert_close(per_sample_mse(pred, target), torch.tensor([1.0, (1 + 1 + 9) / 3]))
    torch.testing.assert_close(per_frame_mse(pred, target), torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 9.0]]))


def test_sdxl_time_ids_rows():
    ids = sdxl_time_ids([(512, 768), (1024, 1024)], [(0, 128), (0, 0)], (1024, 1024))
    torch.testing.assert_close(
        ids,
        torch.tensor([[512, 768, 0, 128, 1024, 1024], [1024, 1024, 0, 0, 1024, 1024]], dtype=torch.float32),
    )


def test_family_detection_and_adapter_shapes(tiny_sd15, tiny_sdxl):
    assert detect_family(str(tiny_sd15)) == "sd15" and detect_family(str(tiny_sdxl)) == "sdxl"
    for path, keys in [
        (tiny_sd15, {"encoder_hidden_states"}),
        (tiny_sdxl, {"encoder_hidden_states", "text_embeds"}),
    ]:
        pipe, family = load_pipeline(str(path))
        adapter = make_adapter(pipe, family)
        cond = adapter.encode_prompts(["a red circle", ""])
        assert set(cond) == keys and cond["encoder_hidden_states"].shape[0] == 2
        latents = adapter.encode_media(torch.zeros(2, 3, 16, 16))
        assert latents.shape == (2, 4, 8, 8)
        meta = {"original_size": [(16, 16)] * 2, "crop_top_left": [(0, 0)] * 2}
        cond.update(adapter.extra_conditioning(meta, 16))
        t = adapter.sample_timesteps(2, None, latents.device)
        pred = adapter.predict(getattr(pipe, adapter.denoiser_name), latents, t, cond)
        assert pred.shape == latents.shape


def test_unknown_pipeline_class_is_a_clear_error(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "QwenImagePipeline"}')
    with pytest.raises(ValueError, match="QwenImagePipeline.*model.family"):
        detect_family(str(tmp_path))
