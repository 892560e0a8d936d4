"""Video adapters on tiny configs built in code: latent shapes [B,C,T,H,W], noising and targets."""

from __future__ import annotations

import pytest
import torch

from mmalign.data.segments import latent_frame_groups
from mmalign.pipelines import load_pipeline, make_adapter, per_frame_mse

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def cog(tmp_path_factory):
    from mmalign.toy.tiny import build_tiny_cogvideox

    path = tmp_path_factory.mktemp("tiny-cogvideox")
    build_tiny_cogvideox(path)
    pipe, family = load_pipeline(str(path))
    return make_adapter(pipe, family), pipe, family


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    from mmalign.toy.tiny import build_tiny_wan

    path = tmp_path_factory.mktemp("tiny-wan")
    build_tiny_wan(path)
    pipe, family = load_pipeline(str(path))
    return make_adapter(pipe, family), pipe, family


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from mmalign.toy.tiny import build_tiny_toy_video

    path = tmp_path_factory.mktemp("tiny-toy-video")
    build_tiny_toy_video(path)
    pipe, family = load_pipeline(str(path))
    return make_adapter(pipe, family), pipe, family


def _clip(b: int, t: int, size: int = 16) -> torch.Tensor:
    return torch.rand(b, t, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _forward(adapter, pipe, x0):
    noise = torch.randn_like(x0)
    t = adapter.sample_timesteps(x0.shape[0], torch.Generator().manual_seed(1), x0.device)
    cond = adapter.encode_prompts(["a red circle moving", "a blue square"][: x0.shape[0]])
    pred = adapter.predict(getattr(pipe, adapter.denoiser_name), adapter.add_noise(x0, noise, t), t, cond)
    return noise, t, pred


def test_cogvideox_shapes_and_v_target(cog):
    adapter, pipe, family = cog
    assert family == "cogvideox" and adapter.temporal_compression == 4 and adapter.causal
    x0 = adapter.encode_media(_clip(2, 9))
    assert x0.shape == (2, 4, 3, 2, 2)  # 9 frames -> 3 latents, 16 px -> 2 (8x)
    assert x0.shape[2] == len(latent_frame_groups(9, adapter.temporal_compression))
    noise, t, pred = _forward(adapter, pipe, x0)
    assert pred.shape == x0.shape and per_frame_mse(pred, noise).shape == (2, 3)
    sched = adapter.scheduler
    assert sched.config.prediction_type == "v_prediction"
    assert torch.allclose(adapter.target(x0, noise, t), sched.get_velocity(x0, noise, t), atol=1e-6)
    assert torch.allclose(adapter.add_noise(x0, noise, t), sched.add_noise(x0, noise, t), atol=1e-6)
    # CogVideoX's SNR shift is kept: abar differs from the plain DDPM schedule with the same betas
    from diffusers import DDPMScheduler

    plain = DDPMScheduler.from_config(pipe.scheduler.config)
    assert not torch.allclose(sched.alphas_cumprod.float(), plain.alphas_cumprod.float())
    abar = sched.alphas_cumprod[t].float().view(-1, 1, 1, 1, 1)
    v = abar.sqrt() * noise - (1 - abar).sqrt() * x0
    assert torch.allclose(adapter.target(x0, noise, t), v, atol=1e-6)
    video = adapter.decode_latents(x0)
    assert video.shape == (2, 9, 3, 16, 16) and 0 <= video.min() and video.max() <= 1


def test_wan_shapes_flow_target_and_shifted_timesteps(wan):
    adapter, pipe, family = wan
    assert family == "wan" and adapter.temporal_compression == 4 and adapter.shift == 7.0
    x0 = adapter.encode_media(_clip(2, 9))
    assert x0.shape == (2, 16, 3, 2, 2)
    noise, t, pred = _forward(adapter, pipe, x0)
    assert pred.shape == x0.shape
    u = torch.rand(2, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(t, 1000 * 7.0 * u / (1 + 6.0 * u))  # sigma shift
    assert t.min() >= 0 and t.max() <= 1000
    sigma = (t / 1000).view(-1, 1, 1, 1, 1)
    assert torch.allclose(adapter.add_noise(x0, noise, t), (1 - sigma) * x0 + sigma * noise, atol=1e-6)
    assert torch.equal(adapter.target(x0, noise, t), noise - x0)
    # the flow-matching scheduler of the pipeline agrees on x_t at one of its own timesteps
    sched = pipe.scheduler
    sched.set_timesteps(10)
    ts = sched.timesteps[3:4]
    assert torch.allclose(
        sched.scale_noise(x0[:1], ts, noise[:1]), adapter.add_noise(x0[:1], noise[:1], ts), atol=1e-5
    )
    # latents are normalised with the VAE's per-channel mean/std; decoding undoes it
    mean, std = adapter.latent_moments(_clip(1, 9))
    z = adapter.latents_from_moments(mean, torch.zeros_like(std))
    expected = (mean - adapter.latents_mean) / adapter.latents_std
    assert torch.allclose(z, expected, atol=1e-6)
    assert adapter.decode_latents(z).shape == (1, 9, 3, 16, 16)


def test_toy_video_shapes_and_epsilon_target(toy):
    adapter, pipe, family = toy
    assert family == "toy_video" and adapter.temporal_compression == 1
    x0 = adapter.encode_media(_clip(2, 5))
    assert x0.shape == (2, 4, 5, 8, 8)  # per-frame VAE: 5 frames -> 5 latents, 2x down
    noise, t, pred = _forward(adapter, pipe, x0)
    assert pred.shape == x0.shape
    assert torch.equal(adapter.target(x0, noise, t), noise)
    abar = adapter.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
    assert torch.allclose(
        adapter.add_noise(x0, noise, t), abar.sqrt() * x0 + (1 - abar).sqrt() * noise, atol=1e-6
    )
    # each latent frame is the per-frame VAE encoding of its pixel frame (no temporal mixing)
    clip = _clip(1, 3)
    mean, _ = adapter.latent_moments(clip)
    single, _ = adapter.latent_moments(clip[:, 1:2])
    assert torch.allclose(mean[:, :, 1:2], single, atol=1e-5)


def test_wan_logit_normal_timesteps_are_selected_from_the_config(tmp_path):
    from mmalign.config import ConfigError
    from mmalign.pipelines import load_pipeline, make_adapter
    from mmalign.toy.tiny import build_tiny_wan
    from mmalign.trainers import load_config

    build_tiny_wan(tmp_path / "wan")
    pipe, family = load_pipeline(str(tmp_path / "wan"))
    cfg = load_config(
        None,
        [
            f"model.pretrained={tmp_path / 'wan'}",
            "model.adapter_options={timestep_sampling: logit_normal}",
            "method.name=dense_dpo",
        ],
    )
    adapter = make_adapter(pipe, family, **cfg.model.adapter_options)
    assert adapter.timestep_sampling == "logit_normal"
    g = torch.Generator().manual_seed(0)
    logit = adapter.sample_timesteps(4000, g, torch.device("cpu")) / 1000
    uniform = (
        make_adapter(pipe, family).sample_timesteps(
            4000, torch.Generator().manual_seed(0), torch.device("cpu")
        )
        / 1000
    )
    assert not torch.equal(logit, uniform)
    # logit-normal u concentrates mass in the middle: fewer draws at the extremes than uniform u
    shift = adapter.shift
    u_logit, u_uniform = (
        s / (shift - (shift - 1) * s) for s in (logit, uniform)
    )  # invert the timestep shift
    assert ((u_logit < 0.1) | (u_logit > 0.9)).float().mean() < 0.5 * (
        (u_uniform < 0.1) | (u_uniform > 0.9)
    ).float().mean()
    with pytest.raises(ConfigError, match="timestep_samplng"):
        make_adapter(pipe, family, timestep_samplng="logit_normal")


def test_cogvideox_15_refuses_an_odd_number_of_latent_frames(tmp_path):
    """CogVideoX 1.5 patchifies time by 2; a 9-frame clip (3 latents) is refused naming frame counts that work."""
    from mmalign.config import ConfigError
    from mmalign.toy.tiny import build_tiny_cogvideox

    build_tiny_cogvideox(tmp_path / "cog")
    pipe, family = load_pipeline(str(tmp_path / "cog"))
    adapter = make_adapter(pipe, family)
    pixels = torch.rand(1, 9, 3, 16, 16) * 2 - 1
    assert adapter.latent_moments(pixels)[0].shape[2] == 3  # CogVideoX 1.0: any count
    pipe.transformer.register_to_config(patch_size_t=2)
    with pytest.raises(ConfigError, match=r"patch_size_t=2.*9 frames give 3.*\[5, 13") as err:
        adapter.latent_moments(pixels)
    assert "\n" not in str(err.value)
    assert adapter.latent_moments(pixels[:, :5])[0].shape[2] == 2


@pytest.mark.parametrize("name", ["cog", "wan"])
def test_sampling_pads_prompts_to_the_trained_length(name, request):
    """generate/eval sample a checkpoint at the prompt length its adapter trains with, not the pipeline's default.

    The tiny CogVideoX transformer's positional table covers 16 text tokens: at CogVideoXPipeline's default of 226
    every sample failed ("size of tensor a (229) must match ... (19)"); Wan would pad to 512, not the 16 it trains on.
    """
    from mmalign.pipelines import prompt_length
    from mmalign.pipelines.runtime import sample

    adapter, pipe, _ = request.getfixturevalue(name)
    assert prompt_length(pipe) == {"max_sequence_length": 16} == prompt_length(pipe, adapter)
    clips = sample(pipe, ["a red circle"], [0], steps=2, height=16, width=16, num_frames=9, progress=False)
    assert clips.shape == (1, 9, 3, 16, 16) and torch.isfinite(clips).all()


def test_validation_samples_take_the_runs_shape_not_the_pipelines_default(toy):
    """A video run's validation samples its method's num_frames/height/width (AnimateDiff's default: 16 frames); an
    image run's, its model.resolution (FLUX's default is 1024 px whatever the run trains on)."""
    from mmalign.trainers import load_config
    from mmalign.trainers.loop import _sample_shape, sample_validation

    adapter, pipe, _ = toy
    cfg = load_config(
        None,
        [
            "method.name=dense_dpo",
            "method.num_frames=4",
            "model.resolution=16",
            "train.validation_steps=2",
            "train.validation_prompts=[a red circle]",
        ],
    )
    shape = _sample_shape(cfg, video=True)
    assert shape == {"height": 16, "width": 16, "num_frames": 4}
    clips = sample_validation(pipe, pipe.unet, adapter, cfg.train, **shape)
    assert clips.shape == (1, 4, 3, 16, 16)
    image = load_config(None, ["method.name=diffusion_dpo", "model.resolution=512"])
    assert _sample_shape(image, video=False) == {"height": 512, "width": 512}
