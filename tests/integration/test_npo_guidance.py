"""NPO guidance through unmodified diffusers pipelines equals a hand-written two-network CFG loop."""

from __future__ import annotations

import copy

import pytest
import torch

from mmalign.pipelines import load_pipeline
from mmalign.pipelines.npo import (
    NPOGuidedDenoiser,
    disable_npo_guidance,
    enable_npo_guidance,
    npo_guided_pipeline,
)

torch.set_num_threads(1)
PROMPT, STEPS, W, SIZE = "a red circle", 4, 4.0, 16
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def perturbed(unet, seed: int, scale: float = 0.05):
    """A copy of ``unet`` with every weight moved by seeded noise (a stand-in for separately trained weights)."""
    out = copy.deepcopy(unet)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return out


def write_lora(unet, out_dir, seed: int) -> dict[str, torch.Tensor]:
    """Save a random rank-2 LoRA for ``unet`` the way ``mmalign train`` exports; return module -> delta W (B @ A)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    net = copy.deepcopy(unet)
    net.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=TARGETS, init_lora_weights="gaussian"))
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    with torch.no_grad():
        for name, module in net.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
                a.copy_(torch.randn(a.shape, generator=g) * 0.3)
                b.copy_(torch.randn(b.shape, generator=g) * 0.3)
                deltas[name] = b @ a  # scale lora_alpha / r = 1
    StableDiffusionPipeline.save_lora_weights(
        out_dir,
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(net)),
        safe_serialization=True,
    )
    return deltas


def merged(unet, *weighted: tuple[float, dict[str, torch.Tensor]]):
    """A plain (peft-free) copy of ``unet`` with sum of weight * delta added to each LoRA target's weight."""
    out = copy.deepcopy(unet)
    modules = dict(out.named_modules())
    with torch.no_grad():
        for coef, deltas in weighted:
            for name, delta in deltas.items():
                modules[name].weight.add_(coef * delta)
    return out


def set_scheduler(pipe, kind: str):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    cls = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}[kind]
    pipe.scheduler = cls.from_config(pipe.scheduler.config)


@torch.no_grad()
def hand_cfg(pipe, pos, neg, x, *, scale_negative_input: bool = True) -> torch.Tensor:
    """Adapted from diffusers 0.42 StableDiffusionPipeline.__call__'s denoising loop, with two networks."""
    cond, uncond = pipe.encode_prompt(PROMPT, torch.device("cpu"), 1, True, "")
    sched = copy.deepcopy(pipe.scheduler)
    sched.set_timesteps(STEPS)
    latents = x * sched.init_noise_sigma
    for t in sched.timesteps:
        inp = sched.scale_model_input(latents, t)
        eps_u = neg(inp if scale_negative_input else latents, t, encoder_hidden_states=uncond).sample
        eps_c = pos(inp, t, encoder_hidden_states=cond).sample
        latents = sched.step(eps_u + W * (eps_c - eps_u), t, latents).prev_sample
    return latents


@torch.no_grad()
def run_pipe(pipe, x, guidance=W) -> torch.Tensor:
    return pipe(
        PROMPT,
        num_inference_steps=STEPS,
        guidance_scale=guidance,
        latents=x.clone(),
        height=SIZE,
        width=SIZE,
        output_type="latent",
    ).images


@pytest.fixture()
def pipe(tiny_sd15):
    p, _ = load_pipeline(str(tiny_sd15))
    p.set_progress_bar_config(disable=True)
    return p


def noise(pipe):
    return torch.randn(1, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", ["ddim", "euler"])
def test_separate_negative_weights_equal_hand_written_cfg(pipe, kind):
    set_scheduler(pipe, kind)
    base = pipe.unet
    neg = perturbed(base, seed=1)
    x = noise(pipe)
    plain = run_pipe(pipe, x)
    enable_npo_guidance(pipe, neg)  # alpha = beta = 1, positive = base: negative = neg
    assert isinstance(pipe.unet, NPOGuidedDenoiser)
    guided = run_pipe(pipe, x)
    expected = hand_cfg(pipe, base, neg, x)
    torch.testing.assert_close(guided, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(guided, plain, atol=1e-4)  # the negative model changed the result
    if kind == "euler":  # the released double-UNet pipeline's unscaled negative input gives something else
        assert not torch.allclose(
            hand_cfg(pipe, base, neg, x, scale_negative_input=False), expected, atol=1e-4
        )
    disable_npo_guidance(pipe)
    assert pipe.unet is base
    torch.testing.assert_close(run_pipe(pipe, x), plain)


@pytest.mark.parametrize("kind", ["ddim", "euler"])
def test_lora_negative_with_alpha_beta_offsets(pipe, kind, tmp_path):
    set_scheduler(pipe, kind)
    base = copy.deepcopy(pipe.unet)
    eta = write_lora(base, tmp_path / "positive", seed=2)
    delta = write_lora(base, tmp_path / "negative", seed=3)
    pipe.load_lora_weights(str(tmp_path / "positive"), adapter_name="positive")
    x = noise(pipe)
    plain = run_pipe(pipe, x)
    alpha, beta = 0.5, 0.7
    enable_npo_guidance(pipe, tmp_path / "negative", alpha=alpha, beta=beta)
    guided = run_pipe(pipe, x)
    pos_net = merged(base, (1.0, eta))
    neg_net = merged(base, (alpha, eta), (beta, delta))  # base + alpha (pos - base) + beta delta
    torch.testing.assert_close(guided, hand_cfg(pipe, pos_net, neg_net, x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(plain, hand_cfg(pipe, pos_net, pos_net, x), rtol=1e-4, atol=1e-5)
    # outside the wrapper's calls the shared UNet is the positive model; disabling restores plain CFG exactly
    torch.testing.assert_close(
        pipe.unet.positive(
            x, 500, encoder_hidden_states=pipe.encode_prompt(PROMPT, "cpu", 1, False)[0]
        ).sample,
        pos_net(x, 500, encoder_hidden_states=pipe.encode_prompt(PROMPT, "cpu", 1, False)[0]).sample,
        rtol=1e-4,
        atol=1e-5,
    )
    disable_npo_guidance(pipe)
    assert "npo_negative" not in pipe.unet.peft_config
    torch.testing.assert_close(run_pipe(pipe, x), plain)


def test_without_cfg_the_positive_model_runs_alone(pipe, tmp_path):
    write_lora(pipe.unet, tmp_path / "negative", seed=3)
    x = noise(pipe)
    plain = run_pipe(pipe, x, guidance=1.0)
    enable_npo_guidance(pipe, tmp_path / "negative")
    torch.testing.assert_close(run_pipe(pipe, x, guidance=1.0), plain)


def test_guided_pipeline_shares_weights_and_leaves_the_original_plain(pipe, tmp_path):
    write_lora(pipe.unet, tmp_path / "negative", seed=3)
    x = noise(pipe)
    plain = run_pipe(pipe, x)
    guided_pipe = npo_guided_pipeline(pipe, tmp_path / "negative")
    guided = run_pipe(guided_pipe, x)
    assert guided_pipe.unet.positive is pipe.unet
    assert not torch.allclose(guided, plain, atol=1e-4)
    torch.testing.assert_close(run_pipe(pipe, x), plain)


def test_bad_settings_fail_loudly(pipe, tmp_path):
    write_lora(pipe.unet, tmp_path / "negative", seed=3)
    with pytest.raises(ValueError, match="beta=0"):
        enable_npo_guidance(pipe, tmp_path / "negative", alpha=1.0, beta=0.0)
    with pytest.raises(FileNotFoundError):
        enable_npo_guidance(pipe, tmp_path / "missing")
    enable_npo_guidance(pipe, tmp_path / "negative")
    with pytest.raises(ValueError, match="already enabled"):
        enable_npo_guidance(pipe, tmp_path / "negative")
