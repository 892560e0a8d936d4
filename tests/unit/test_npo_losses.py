"""Self-NPO maths: pseudo-Huber by hand, the re-noising marginal, the DDIM rollout grid, x0/eps conversions."""

from __future__ import annotations

import math

import pytest
import torch

from mmalign.config import ConfigError
from mmalign.losses.self_npo import pseudo_huber, renoise, self_npo_loss
from mmalign.pipelines.base import x0_and_eps
from mmalign.trainers import load_config
from mmalign.trainers.self_npo import (
    EMATeacher,
    SelfNPOConfig,
    ddim_grid,
    null_conditioning,
    rollout_timesteps,
)


def sd_schedule():
    """SD1.5's scaled-linear betas -> (alpha, sigma) per timestep."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    return abar.sqrt(), (1 - abar).sqrt()


def test_pseudo_huber_by_hand():
    # c = 1: d = 0 -> 0; d = sqrt(3) -> sqrt(4) - 1 = 1; d = sqrt(8) -> sqrt(9) - 1 = 2; mean = 1
    pred = torch.tensor([[0.0, 3**0.5, 8**0.5], [1.0, 1.0, 1.0]])
    target = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0 - 3**0.5, 1.0 + 8**0.5]])
    torch.testing.assert_close(pseudo_huber(pred, target, c=1.0), torch.tensor([1.0, 1.0]))
    # c = 1e-3: d = 1e-3 -> 1e-3 (sqrt 2 - 1) = 4.1421356e-4 ; d = 1 -> sqrt(1 + 1e-6) - 1e-3 = 0.9990005
    got = pseudo_huber(torch.tensor([[1e-3, 1.0]]), torch.zeros(1, 2), c=1e-3)
    torch.testing.assert_close(got, torch.tensor([(4.1421356e-4 + 0.99900050) / 2]), rtol=1e-5, atol=0)
    with pytest.raises(ValueError):
        pseudo_huber(pred, target, c=0.0)


def test_self_npo_loss_reduces_per_sample_and_reports_x0_mse():
    x_s = torch.tensor([[[[0.0, 2.0]]], [[[1.0, 1.0]]]], requires_grad=True)  # [2,1,1,2]
    target = torch.tensor([[[[0.0, 0.0]]], [[[1.0, 1.0]]]])
    loss, metrics = self_npo_loss(x_s, target, huber_c=1.0)
    # sample 0: (0 + sqrt(4 + 1) - 1) / 2 ; sample 1: 0
    torch.testing.assert_close(loss, torch.tensor([(5**0.5 - 1) / 2, 0.0]))
    torch.testing.assert_close(metrics["x0_mse"], torch.tensor(4.0 / 4))
    loss.sum().backward()
    assert x_s.grad is not None and x_s.grad[1].abs().sum() == 0


def test_renoise_coefficients_give_sigma_s():
    alpha, sigma = sd_schedule()
    t, s = torch.tensor([100, 400]), torch.tensor([101, 900])
    # zero noise: pure scaling by alpha_s / alpha_t ; unit x_t = 0: pure noise of std sqrt(sigma_s^2 - sigma_t^2 r^2)
    x = torch.ones(2, 1)
    torch.testing.assert_close(
        renoise(x, alpha[t], sigma[t], alpha[s], sigma[s], torch.zeros(2, 1)),
        (alpha[s] / alpha[t]).float().unsqueeze(1),
    )
    std = (
        renoise(torch.zeros(2, 1), alpha[t], sigma[t], alpha[s], sigma[s], torch.ones(2, 1))
        .squeeze(1)
        .double()
    )
    r = alpha[s] / alpha[t]
    torch.testing.assert_close(std**2 + (r * sigma[t]) ** 2, sigma[s] ** 2, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="noisier"):
        renoise(x, alpha[s], sigma[s], alpha[t], sigma[t], torch.zeros(2, 1))


def test_renoise_keeps_the_forward_marginal():
    """x0 fixed, x_t ~ q(x_t|x0): the re-noised x_s must be N(alpha_s x0, sigma_s^2), as q(x_s|x0) (known answer)."""
    alpha, sigma = sd_schedule()
    t, s, n, x0 = 250, 800, 200_000, 1.5
    g = torch.Generator().manual_seed(0)
    x_t = alpha[t] * x0 + sigma[t] * torch.randn(n, 1, generator=g, dtype=torch.float64)
    at, st, as_, ss = (torch.full((n,), v.item()) for v in (alpha[t], sigma[t], alpha[s], sigma[s]))
    x_s = renoise(x_t.float(), at, st, as_, ss, torch.randn(n, 1, generator=g)).double().squeeze(1)
    mean_se = sigma[s].item() / math.sqrt(n)
    assert abs(x_s.mean().item() - alpha[s].item() * x0) < 5 * mean_se
    var_se = sigma[s].item() ** 2 * math.sqrt(2 / n)
    assert abs(x_s.var().item() - sigma[s].item() ** 2) < 5 * var_se
    # and the joint law is the forward Markov chain: Cov(x_s, x_t) = (alpha_s / alpha_t) sigma_t^2
    cov = ((x_s - x_s.mean()) * (x_t.squeeze(1) - x_t.mean())).mean().item()
    assert abs(cov - (alpha[s] / alpha[t] * sigma[t] ** 2).item()) < 5 * sigma[s].item() * sigma[
        t
    ].item() / math.sqrt(n)


def test_ddim_grid_and_rollouts():
    grid = ddim_grid(1000, 25)
    assert grid[0] == 39 and grid[-1] == 999 and (grid.diff() == 40).all()
    g = torch.Generator().manual_seed(0)
    noise_path = rollout_timesteps("noise", grid, 5, 500, g)
    assert noise_path.shape == (6, 500) and (noise_path[0] == 999).all()
    assert (noise_path.diff(dim=0) <= 0).all() and set(noise_path[-1].tolist()) <= set(grid[:-1].tolist())
    assert noise_path[-1].min() == 39 and noise_path[-1].max() == 959  # every end level is reached
    real_path = rollout_timesteps("real", grid, 5, 500, g)
    start = real_path[0]
    assert set(start.tolist()) == set(grid.tolist())
    for k in range(1, 6):  # one grid stride per step, clamped at 0 below the grid
        expected = torch.where(start - 40 * k >= 0, start - 40 * k, torch.zeros_like(start))
        assert torch.equal(real_path[k], expected)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_x0_and_eps_invert_the_forward_process(kind):
    alpha, sigma = sd_schedule()
    t = torch.tensor([10, 500, 990])
    a, s = alpha[t].float(), sigma[t].float()
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    ab = a.view(-1, 1, 1, 1)
    sb = s.view(-1, 1, 1, 1)
    x = ab * x0 + sb * eps
    pred = {"epsilon": eps, "v_prediction": ab * eps - sb * x0, "sample": x0}[kind]
    got_x0, got_eps = x0_and_eps(pred, x, alpha[t].pow(2).float(), kind)  # abar = alpha^2
    torch.testing.assert_close(got_x0, x0, rtol=1e-3, atol=2e-3)
    torch.testing.assert_close(got_eps, eps, rtol=1e-3, atol=2e-3)


def test_null_conditioning_zeros_text_but_keeps_time_ids():
    uncond = {
        "encoder_hidden_states": torch.ones(2, 3, 4),
        "text_embeds": torch.ones(2, 4),
        "time_ids": torch.ones(2, 6),
    }
    assert null_conditioning(uncond, "empty") is uncond
    z = null_conditioning(uncond, "zeros")
    assert (
        z["encoder_hidden_states"].abs().sum() == 0
        and z["text_embeds"].abs().sum() == 0
        and z["time_ids"].sum() == 12
    )


def test_ema_teacher_update_and_swap():
    net = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema = EMATeacher(net)
    with torch.no_grad():
        net.weight.fill_(3.0)
    ema.update(0.75)  # 0.75 * 1 + 0.25 * 3 = 1.5
    with ema.swapped_in(net) as teacher_net:
        assert torch.equal(teacher_net.weight, torch.full((1, 2), 1.5))
    assert torch.equal(net.weight, torch.full((1, 2), 3.0))  # the student is back


def test_config_checks():
    with pytest.raises(ConfigError, match="start"):
        SelfNPOConfig(start="image")
    with pytest.raises(ConfigError, match="teacher_steps"):
        SelfNPOConfig(teacher_steps=25)
    with pytest.raises(ConfigError, match="ema_decay"):
        SelfNPOConfig(ema_decay=1.5)
    cfg = load_config(
        None, ["method.name=self_npo", "method.teacher_guidance=-5", "method.null_condition=zeros"]
    )
    assert cfg.method.teacher_guidance == -5.0 and cfg.method.null_condition == "zeros"


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (
            "configs/sd15/self_npo.yaml",
            {"method.teacher_guidance": -1.0, "train.learning_rate": 1e-6, "lora.enabled": False},
        ),
        (
            "configs/sdxl/self_npo.yaml",
            {"method.teacher_guidance": -5.0, "method.null_condition": "zeros", "train.learning_rate": 1e-7},
        ),
        ("configs/toy/self_npo.yaml", {"method.name": "self_npo", "lora.enabled": True}),
        (
            "configs/sd15/diffusion_npo.yaml",
            {"method.swap_pairs": True, "method.beta": 1000.0, "lora.rank": 8},
        ),
        ("configs/toy/diffusion_npo.yaml", {"method.swap_pairs": True, "lora.rank": 8}),
    ],
)
def test_npo_recipes_load_with_the_released_settings(path, expected):
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parents[2] / path)
    for dotted, value in expected.items():
        section, key = dotted.split(".")
        assert getattr(getattr(cfg, section), key) == value, dotted
    if cfg.method.name == "self_npo":
        assert cfg.train.max_steps in (1000, 300) and cfg.method.teacher_steps <= 5
