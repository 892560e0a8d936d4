"""Diffusion-DPO loss against numbers worked out by hand (DESIGN §2-3)."""

import math

import pytest
import torch

from mmalign.losses import diffusion_dpo_loss, f_divergence_reward

# One pair worked by hand: delta_w = 0.10 - 0.12 = -0.02, delta_l = 0.30 - 0.29 = +0.01,
# beta = 100 -> tau = 50 -> z = -50 * (-0.02 - 0.01) = 1.5.
M_W, M_L, R_W, R_L = (torch.tensor([v]) for v in (0.10, 0.30, 0.12, 0.29))


def test_sigmoid_matches_hand_value():
    loss, metrics = diffusion_dpo_loss(M_W, M_L, R_W, R_L, beta=100)
    assert metrics["reward_margin"].item() == pytest.approx(1.5, abs=1e-5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.5)), abs=1e-6)  # -log sigmoid(1.5) = 0.201413
    assert loss.item() == pytest.approx(0.201413, abs=1e-5)
    assert metrics["implicit_acc"].item() == 1.0
    assert metrics["delta_w"].item() == pytest.approx(-0.02, abs=1e-6)
    assert metrics["delta_l"].item() == pytest.approx(0.01, abs=1e-6)


def test_hinge_and_ipo_match_hand_values():
    hinge, _ = diffusion_dpo_loss(M_W, M_L, R_W, R_L, beta=100, loss_type="hinge")
    assert hinge.item() == pytest.approx(0.0)  # relu(1 - 1.5)
    hinge_small, _ = diffusion_dpo_loss(M_W, M_L, R_W, R_L, beta=40, loss_type="hinge")
    assert hinge_small.item() == pytest.approx(1 - 0.6, abs=1e-5)  # tau=20 -> z=0.6
    ipo, _ = diffusion_dpo_loss(M_W, M_L, R_W, R_L, beta=100, loss_type="ipo")
    # z' = z / tau = 0.03; target 1 / (2 tau) = 0.01 -> (0.02)^2
    assert ipo.item() == pytest.approx(0.0004, abs=1e-7)


def test_sft_term_adds_winner_error():
    base, _ = diffusion_dpo_loss(M_W, M_L, R_W, R_L, beta=100)
    with_sft, _ = diffusion_dpo_loss(M_W, M_L, R_W, R_L, beta=100, sft_weight=2.0)
    assert (with_sft - base).item() == pytest.approx(0.2, abs=1e-6)


def test_beta_convention_matches_diffusers_sd15_script():
    """Ours at beta=5000 equals diffusers' SD1.5 formula z = beta_dpo (ref_diff - model_diff) at beta_dpo=2500."""
    g = torch.Generator().manual_seed(0)
    m_w, m_l, r_w, r_l = (0.1 + 0.01 * torch.rand(8, generator=g) for _ in range(4))
    ours, _ = diffusion_dpo_loss(m_w, m_l, r_w, r_l, beta=5000)
    diffusers_sd15 = -torch.nn.functional.logsigmoid(2500 * ((r_w - r_l) - (m_w - m_l)))
    torch.testing.assert_close(ours, diffusers_sd15)


def test_at_reference_loss_is_log2_and_accuracy_half():
    err = torch.tensor([0.2, 0.3])
    loss, metrics = diffusion_dpo_loss(err, err + 0.1, err, err + 0.1, beta=5000)
    torch.testing.assert_close(loss, torch.full((2,), math.log(2.0)))
    assert metrics["implicit_acc"].item() == 0.5


def test_gradient_lowers_winner_error_and_raises_loser_error():
    m_w = torch.tensor([0.2], requires_grad=True)
    m_l = torch.tensor([0.2], requires_grad=True)
    loss, _ = diffusion_dpo_loss(m_w, m_l, torch.tensor([0.2]), torch.tensor([0.2]), beta=10)
    loss.sum().backward()
    assert m_w.grad.item() > 0 and m_l.grad.item() < 0  # descent: m_w down, m_l up
    assert m_w.grad.item() == pytest.approx(2.5, abs=1e-6)  # d/dm_w = tau * sigmoid(-z) = 5 * 0.5


def test_f_divergence_rewards():
    delta = torch.tensor([-0.02, 0.0, 0.01])
    tau = 50.0
    log_u = -tau * delta  # [1.0, 0.0, -0.5]
    torch.testing.assert_close(f_divergence_reward(delta, kappa=tau, divergence="reverse_kl"), log_u)
    torch.testing.assert_close(
        f_divergence_reward(delta, kappa=tau, divergence="forward_kl"), -torch.exp(-log_u)
    )
    u = torch.exp(log_u)
    torch.testing.assert_close(
        f_divergence_reward(delta, kappa=tau, divergence="js"), torch.log(2 * u / (1 + u))
    )
    torch.testing.assert_close(
        f_divergence_reward(delta, kappa=tau, divergence="alpha", alpha=0.5), (1 - u**-0.5) / 0.5
    )
    # reverse KL through the loss is exactly DPO
    a, _ = diffusion_dpo_loss(M_W, M_L, R_W, R_L, beta=100, divergence="reverse_kl")
    b, _ = diffusion_dpo_loss(M_W, M_L, R_W, R_L, beta=100)
    torch.testing.assert_close(a, b)
    # forward KL: z = -exp(-1.0*... ) hand value: log u_w = 1.0, log u_l = -0.5 -> -e^-1 + e^0.5
    fk, m = diffusion_dpo_loss(
        M_W, M_L, R_W, R_L, beta=100, divergence="forward_kl", kappa=50.0
    )  # tau/kappa = 1
    assert m["reward_margin"].item() == pytest.approx(-math.exp(-1.0) + math.exp(0.5), abs=1e-5)


@pytest.mark.parametrize("divergence", ["forward_kl", "js", "alpha"])
def test_f_dpo_is_finite_and_trains_at_realistic_error_differences(divergence):
    """At beta = 5000 the old reward scale (log u = -2500 delta) overflowed exp past delta = 0.035; kappa keeps
    log u of order 1, the loss finite and the gradient DPO's at delta = 0 (half of it for js)."""
    for gap in (0.0, 0.001, 0.01, 0.035, 0.1):
        m_w = torch.tensor([0.20 + gap], requires_grad=True)
        m_l = torch.tensor([0.20 - gap], requires_grad=True)
        ref = torch.tensor([0.20])
        loss, metrics = diffusion_dpo_loss(m_w, m_l, ref, ref, beta=5000, divergence=divergence)
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(metrics["reward_margin"])
        assert torch.isfinite(m_w.grad).all() and m_w.grad.item() > 0 and m_l.grad.item() < 0
        if gap == 0.0:  # d loss / d m_w = tau * sigmoid(0) * slope, as Diffusion-DPO's 1250
            assert m_w.grad.item() == pytest.approx(
                2500 * 0.5 * (0.5 if divergence == "js" else 1.0), rel=1e-5
            )


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="loss_type"):
        diffusion_dpo_loss(M_W, M_L, R_W, R_L, beta=1, loss_type="cpo")
    with pytest.raises(ValueError, match="sigmoid"):
        diffusion_dpo_loss(M_W, M_L, R_W, R_L, beta=1, loss_type="hinge", divergence="js")
