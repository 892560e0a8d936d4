"""Inversion-DPO loss maths, worked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from mmalign.losses.diffusion_dpo import diffusion_dpo_loss
from mmalign.losses.inversion_dpo import implied_noise, trajectory_dpo_loss, trajectory_weights


def test_implied_noise_inverts_add_noise():
    # abar = 0.64: sqrt = 0.8, sqrt(1 - abar) = 0.6. x_t = 2.0, x0 = 1.0 -> e = (2.0 - 0.8) / 0.6 = 2.0
    e = implied_noise(torch.full((1, 2), 2.0), torch.full((1, 2), 1.0), torch.tensor([0.64]))
    torch.testing.assert_close(e, torch.full((1, 2), 2.0))


def test_inverted_noise_mode_is_diffusion_dpo_with_the_implied_noise():
    # The loss of inverted_noise mode is diffusion_dpo_loss on errors measured against e~. By hand, beta = 2000:
    # m_w = 0.010, r_w = 0.011 (delta_w = -0.001), m_l = 0.020, r_l = 0.019 (delta_l = +0.001)
    # z = -(2000/2)(-0.001 - 0.001) = 2.0; loss = -log sigmoid(2) = log(1 + e^-2) = 0.126928
    loss, metrics = diffusion_dpo_loss(
        torch.tensor([0.010]),
        torch.tensor([0.020]),
        torch.tensor([0.011]),
        torch.tensor([0.019]),
        beta=2000.0,
    )
    assert loss.item() == pytest.approx(math.log1p(math.exp(-2.0)), rel=1e-4)
    assert metrics["reward_margin"].item() == pytest.approx(2.0, rel=1e-4)


def test_trajectory_weights():
    torch.testing.assert_close(trajectory_weights(torch.tensor([0.5, 0.25])), torch.tensor([1.0, 2.0]))


def _eps(values):
    """[B=1, K, C=1, H=1, W=2] with both pixels equal to ``values[k]``."""
    return torch.tensor(values, dtype=torch.float32).reshape(1, -1, 1, 1, 1).expand(1, -1, 1, 1, 2).clone()


def test_trajectory_loss_by_hand():
    # K = N = 2 steps, abar = (0.5, 0.25) -> w = (1, 2).
    # winner: eps_theta - eps_ref = (0.1, 0.2) -> d_w = (0.01, 0.04); D_w = 1*0.01 + 2*0.04 = 0.09
    # loser:  eps_theta - eps_ref = (0.0, 0.1) -> d_l = (0.00, 0.01); D_l = 2*0.01 = 0.02
    # sign +1, beta 100: z = 0.5*100*(0.09 - 0.02)/2 = 1.75; loss = log(1 + e^-1.75) = 0.160
    w = trajectory_weights(torch.tensor([[0.5, 0.25]]))
    ref = _eps([0.0, 0.0])
    loss, m = trajectory_dpo_loss(
        _eps([0.1, 0.2]), _eps([0.0, 0.1]), ref, ref, w, beta=100.0, num_grid_steps=2, sign=1
    )
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.75)), rel=1e-5)
    assert m["reward_margin"].item() == pytest.approx(1.75, rel=1e-5)
    assert m["implicit_acc"].item() == 1.0
    assert m["delta_w"].item() == pytest.approx(0.045, rel=1e-5)  # D_w / N
    assert m["eps_diff_w"].item() == pytest.approx(0.025, rel=1e-5)  # unweighted mean of d_w
    # sign -1 (likelihood derivation): z = -1.75, loss = log(1 + e^1.75) = 1.910
    loss, m = trajectory_dpo_loss(
        _eps([0.1, 0.2]), _eps([0.0, 0.1]), ref, ref, w, beta=100.0, num_grid_steps=2, sign=-1
    )
    assert loss.item() == pytest.approx(math.log1p(math.exp(1.75)), rel=1e-5)
    assert m["implicit_acc"].item() == 0.0


def test_trajectory_subsample_is_unbiased_for_the_full_sum():
    # K = 1 of N = 4 grid steps: D = (N/K) w_k d_k, z = s (beta/2) D / N = s (beta/2) w_k (d_w - d_l).
    # w = 1 (abar 0.5), d_w = 0.04, d_l = 0.01, beta 100: z = 50 * 0.03 = 1.5
    w = trajectory_weights(torch.tensor([[0.5]]))
    ref = _eps([0.0])
    _, m = trajectory_dpo_loss(_eps([0.2]), _eps([0.1]), ref, ref, w, beta=100.0, num_grid_steps=4)
    assert m["reward_margin"].item() == pytest.approx(1.5, rel=1e-5)


def test_trajectory_gradient_is_exactly_zero_when_policy_equals_reference():
    ref_w, ref_l = torch.randn(2, 3, 4, 8, 8), torch.randn(2, 3, 4, 8, 8)
    model_w, model_l = ref_w.clone().requires_grad_(True), ref_l.clone().requires_grad_(True)
    w = trajectory_weights(torch.rand(2, 3) * 0.9 + 0.05)
    loss, m = trajectory_dpo_loss(model_w, model_l, ref_w, ref_l, w, beta=2000.0, num_grid_steps=80)
    loss.mean().backward()
    assert loss.mean().item() == pytest.approx(math.log(2.0))
    assert m["implicit_acc"].item() == 0.5  # z == 0 counts half
    assert model_w.grad.abs().max().item() == 0.0 and model_l.grad.abs().max().item() == 0.0


def test_trajectory_rejects_a_bad_sign():
    w = torch.ones(1, 1)
    with pytest.raises(ValueError, match="sign"):
        trajectory_dpo_loss(
            _eps([0.0]), _eps([0.0]), _eps([0.0]), _eps([0.0]), w, beta=1.0, num_grid_steps=1, sign=0
        )
