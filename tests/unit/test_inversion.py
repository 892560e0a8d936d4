"""DDIM inversion: diffusers parity, reconstruction on a tiny model, and an exact analytic case."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mmalign.pipelines.inversion import (
    ddim_invert,
    ddim_sample,
    grid_alphas,
    inversion_noise_std,
    inversion_timesteps,
    zero_conditioning,
)


@pytest.fixture(scope="module")
def tiny(tiny_sd15):
    from mmalign.pipelines import load_pipeline, make_adapter

    pipe, family = load_pipeline(str(tiny_sd15))
    adapter = make_adapter(pipe, family)
    cond = adapter.encode_prompts(["a red circle", "a blue square"])
    return adapter, pipe.unet, cond


def test_grid_is_the_released_codes():
    grid = inversion_timesteps(1000, 80)  # leading, offset 0: DDIMScheduler of MIGHTYEZ/Inversion-DPO
    assert grid[:3].tolist() == [0, 12, 24] and grid[-1].item() == 948 and len(grid) == 80
    assert inversion_timesteps(1000, 10, spacing="trailing")[-1].item() == 999


def test_matches_diffusers_ddim_inverse_scheduler(tiny):
    from diffusers import DDIMInverseScheduler

    adapter, unet, cond = tiny
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sched = DDIMInverseScheduler.from_config(
        adapter.pipeline.scheduler.config
    )  # steps_offset 1, alphas_cumprod[0] start
    sched.set_timesteps(10)
    x = x0.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(
                unet(x, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample, t, x
            ).prev_sample
    inv = ddim_invert(adapter, unet, x0, cond, timesteps=inversion_timesteps(1000, 10, steps_offset=1))
    assert inv.latents.shape == (2, 10, 4, 8, 8) and inv.eps.shape == (2, 10, 4, 8, 8)
    torch.testing.assert_close(inv.final, x, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("guidance", "tolerance"), [(1.0, 0.05), (2.0, 0.3)])
def test_reconstruction_on_tiny_model(tiny, guidance, tolerance):
    """Invert then sample back on the 80-step grid. Tolerance (relative MSE) for this random-init tiny UNet:
    0.05 at CFG 1, 0.3 at CFG 2 (measured 0.038 and 0.22; CFG amplifies the mismatch). The error is the
    first-order mismatch of evaluating the denoiser at x_{k-1} (inverting) vs x_k (sampling), so it must
    shrink as the grid refines: 20 -> 80 steps cuts it at least 4x (measured 11x and 5x)."""
    adapter, unet, cond = tiny
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    errors = []
    for k in (20, 80):
        grid = inversion_timesteps(1000, k)
        inv = ddim_invert(adapter, unet, x0, cond, timesteps=grid, guidance_scale=guidance)
        rec = ddim_sample(adapter, unet, inv.final, cond, timesteps=grid, guidance_scale=guidance)
        errors.append(((rec - x0) ** 2).mean().item() / (x0**2).mean().item())
    assert errors[1] < tolerance
    assert errors[0] > 4 * errors[1]


class PointMassDenoiser(torch.nn.Module):
    """The exact x0-predictor (prediction_type="sample") of a point-mass data distribution at ``x_star``."""

    def __init__(self, x_star: torch.Tensor):
        super().__init__()
        self.x_star = torch.nn.Parameter(x_star.clone(), requires_grad=False)
        self.calls = 0

    def forward(self, x, t, cond):
        self.calls += 1
        return self.x_star.expand_as(x)


def point_mass_adapter(x_star):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="sample"
    )
    adapter = SimpleNamespace(scheduler=scheduler, predict=lambda net, x, t, cond: net(x, t, cond))
    return adapter, PointMassDenoiser(x_star)


def test_exact_for_point_mass_data():
    """With the exact denoiser of a point mass x*, every DDIM trajectory is x_t = sqrt(abar_t) x* + sqrt(1-abar_t) e
    for one fixed e, so inversion keeps the implied noise constant and sampling undoes it exactly (to fp32 rounding: rtol 1e-5)."""
    gen = torch.Generator().manual_seed(2)
    x_star = torch.randn(1, 4, 8, 8, generator=gen)
    adapter, net = point_mass_adapter(x_star)
    x0 = torch.randn(3, 4, 8, 8, generator=gen)  # any start latent, read at level alphas_cumprod[0]
    grid = inversion_timesteps(1000, 50)
    alphas = grid_alphas(adapter.scheduler, grid)
    e0 = (x0 - alphas[0].sqrt() * x_star) / (1 - alphas[0]).sqrt()
    inv = ddim_invert(adapter, net, x0, {"encoder_hidden_states": torch.zeros(3, 1)}, timesteps=grid)
    for k in (1, 25, 50):
        expect = alphas[k].sqrt() * x_star + (1 - alphas[k]).sqrt() * e0
        torch.testing.assert_close(inv.latents[:, k - 1], expect, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(inv.eps[:, k - 1], e0, rtol=1e-5, atol=1e-4)
    rec = ddim_sample(adapter, net, inv.final, {"encoder_hidden_states": torch.zeros(3, 1)}, timesteps=grid)
    torch.testing.assert_close(rec, x0, rtol=1e-5, atol=1e-5)


def test_guidance_runs_one_batched_call_with_zero_uncond():
    cond = {
        "encoder_hidden_states": torch.ones(2, 3, 4),
        "text_embeds": torch.ones(2, 4),
        "time_ids": torch.ones(2, 6),
    }
    zero = zero_conditioning(cond)
    assert zero["encoder_hidden_states"].abs().sum() == 0 and zero["text_embeds"].abs().sum() == 0
    assert torch.equal(zero["time_ids"], cond["time_ids"])  # SDXL micro-conditioning is not text

    seen = []

    def predict(net, x, t, c):
        seen.append(x.shape[0])
        return torch.where(
            c["encoder_hidden_states"].flatten(1)[:, :1].reshape(-1, 1, 1, 1) > 0, 3.0, 1.0
        ) * torch.ones_like(x)

    from diffusers import DDPMScheduler

    adapter = SimpleNamespace(scheduler=DDPMScheduler(), predict=predict)
    x0 = torch.zeros(2, 4, 2, 2)
    inv = ddim_invert(adapter, None, x0, cond, timesteps=inversion_timesteps(1000, 2), guidance_scale=2.0)
    assert seen == [4, 4]  # uncond + cond in one call per step
    torch.testing.assert_close(inv.eps, torch.full_like(inv.eps, 1.0 + 2.0 * (3.0 - 1.0)))


def test_inpo_noise_std_is_the_released_codes_variance():
    """InPO adds eta * sqrt(DDIMScheduler._get_variance(t + T // N, t)) after the inverse step to t."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    grid = inversion_timesteps(1000, 10, steps_offset=1)  # 1, 101, ..., 901 (SD1.5's offset)
    std = inversion_noise_std(sched, grid)
    for k, t in enumerate(grid.tolist()[:-1]):
        expect = float(sched._get_variance(t + 100, t)) ** 0.5
        assert std[k].item() == pytest.approx(expect, rel=1e-5)
    assert std[-1].item() == pytest.approx(float(sched._get_variance(999, 901)) ** 0.5, rel=1e-5)
    assert (std > 0).all() and (std < 1).all()


def test_eta_adds_the_scaled_noise_after_each_step():
    """With the exact point-mass denoiser the deterministic step is known; eta adds eta * std_k * z_k."""
    gen = torch.Generator().manual_seed(3)
    x_star = torch.randn(1, 4, 8, 8, generator=gen)
    adapter, net = point_mass_adapter(x_star)
    x0 = torch.randn(2, 4, 8, 8, generator=gen)
    grid = inversion_timesteps(1000, 10)
    cond = {"encoder_hidden_states": torch.zeros(2, 1)}
    plain = ddim_invert(adapter, net, x0, cond, timesteps=grid, num_steps=1)
    torch.manual_seed(7)
    noisy = ddim_invert(adapter, net, x0, cond, timesteps=grid, num_steps=1, eta=0.1)
    torch.manual_seed(7)
    z = torch.randn_like(x0)
    std = inversion_noise_std(adapter.scheduler, grid)[0]
    torch.testing.assert_close(noisy.final, plain.final + 0.1 * std * z, rtol=1e-5, atol=1e-6)
    assert not torch.equal(noisy.final, plain.final)


@pytest.mark.parametrize("sampling", ["continuous", "continuous_exact"])
def test_continuous_exact_puts_x_t_at_t_level(sampling):
    """With the exact point-mass denoiser every DDIM trajectory is ``sqrt(abar) x* + sqrt(1 - abar) e0``, so an
    x_t at t's level is known exactly. InPO's x_t (the grid point below t, labelled t) sits at a lower noise
    level; ``continuous_exact`` steps on to t and lands on it."""
    from mmalign.trainers.common import TrainModels
    from mmalign.trainers.inversion_dpo import InversionDPOConfig, _continuous_inversion

    gen = torch.Generator().manual_seed(4)
    x_star = torch.randn(1, 4, 8, 8, generator=gen)
    adapter, net = point_mass_adapter(x_star)
    x0 = torch.randn(8, 4, 8, 8, generator=gen)
    grid = inversion_timesteps(1000, 10)
    alphas = grid_alphas(adapter.scheduler, grid)
    batch = {
        "latents_w": x0[:4],
        "latents_l": x0[4:],
        "grid": grid,
        "alphas": alphas,
        "inv_cond": {"encoder_hidden_states": torch.zeros(4, 1)},
        "inv_uncond": None,
    }
    cfg = InversionDPOConfig(
        inverter="policy",
        timestep_sampling=sampling,
        inversion_guidance=1.0,
        cache_inversions=False,
        num_inversion_steps=10,
    )
    e0 = (x0 - alphas[0].sqrt() * x_star) / (1 - alphas[0]).sqrt()
    errors = []
    for seed in range(5):
        torch.manual_seed(seed)
        t, xt = _continuous_inversion(batch, TrainModels(adapter, net), cfg)
        abar = adapter.scheduler.alphas_cumprod[t.repeat(2)]
        expect = abar.sqrt().view(-1, 1, 1, 1) * x_star + (1 - abar).sqrt().view(-1, 1, 1, 1) * e0
        errors.append((xt - expect).abs().max().item())
    if sampling == "continuous_exact":
        assert max(errors) < 1e-4
    else:  # up to 99 steps less noisy than t: far off t's marginal
        assert min(errors) > 0.1
