"""DenseDPO and whole-clip video DPO maths, worked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from mmalign.losses.dense_dpo import dense_dpo_loss, video_dpo_loss


def nls(z: float) -> float:
    """-log sigmoid(z)."""
    return math.log1p(math.exp(-z))


def test_mixed_labels_by_hand():
    # one clip, three latent frames: +1, tie, -1; beta = 500 -> beta/2 = 250
    m0 = torch.tensor([[0.10, 0.50, 0.30]], requires_grad=True)
    m1 = torch.tensor([[0.20, 0.10, 0.30]], requires_grad=True)
    r0 = torch.tensor([[0.11, 0.40, 0.30]])
    r1 = torch.tensor([[0.20, 0.30, 0.302]])
    labels = torch.tensor([[1, 0, -1]])
    loss, metrics = dense_dpo_loss(m0, m1, r0, r1, labels, beta=500)
    # frame 0: dtheta_0 = -0.01, dtheta_1 = 0.0  -> z = -250 * 1 * (-0.01) = 2.5
    # frame 2: dtheta_0 = 0.0,  dtheta_1 = -0.002 -> z = -250 * -1 * (0.002) = 0.5
    expected = (nls(2.5) + nls(0.5)) / 2  # the tie frame is masked, mean over the 2 non-tie frames
    assert loss.mean().item() == pytest.approx(expected, rel=1e-5)
    assert metrics["implicit_acc"].item() == 1.0
    assert metrics["reward_margin"].item() == pytest.approx(1.5, rel=1e-4)
    assert metrics["non_tie_frac"].item() == pytest.approx(2 / 3)
    # "w"/"l" are the preferred/dispreferred clip of each frame: frame 0 -> clip 0, frame 2 -> clip 1
    assert metrics["model_err_w"].item() == pytest.approx((0.10 + 0.30) / 2)
    assert metrics["delta_l"].item() == pytest.approx((0.0 + 0.0) / 2, abs=1e-7)
    loss.mean().backward()
    assert m0.grad[0, 1].item() == 0.0 and m1.grad[0, 1].item() == 0.0  # no gradient through the tie frame
    # d/dm0 of nls(z0)/2 with z0 = -250 (m0 - r0 - ...): = -sigmoid(-z0) * (-250) / 2
    assert m0.grad[0, 0].item() == pytest.approx(250 / 2 * torch.sigmoid(torch.tensor(-2.5)).item(), rel=1e-5)


def test_sft_term_adds_the_preferred_clips_error_on_non_tie_frames():
    m0 = torch.tensor([[0.10, 0.50, 0.30]], requires_grad=True)
    m1 = torch.tensor([[0.20, 0.10, 0.40]], requires_grad=True)
    ref = torch.zeros(1, 3)
    labels = torch.tensor([[1, 0, -1]])
    base, _ = dense_dpo_loss(m0, m1, ref, ref, labels, beta=500)
    with_sft, _ = dense_dpo_loss(m0, m1, ref, ref, labels, beta=500, sft_weight=2.0, sft_ties=False)
    # preferred errors: frame 0 -> clip 0 (0.10), frame 2 -> clip 1 (0.40); the tie frame adds nothing
    assert (with_sft - base).mean().item() == pytest.approx(2.0 * (0.10 + 0.40) / 2, rel=1e-5)
    (with_sft - base).mean().backward()
    assert m0.grad[0].tolist() == pytest.approx([1.0, 0.0, 0.0])
    assert m1.grad[0].tolist() == pytest.approx([0.0, 0.0, 1.0])
    clip, _ = video_dpo_loss(m0, m1, ref, ref, torch.tensor([-1]), beta=500, sft_weight=1.0)
    plain, _ = video_dpo_loss(m0, m1, ref, ref, torch.tensor([-1]), beta=500)
    assert (clip - plain).item() == pytest.approx(m1.mean().item(), rel=1e-5)  # the whole preferred clip


def test_sft_weight_per_clip():
    m0, m1, ref = torch.tensor([[0.1, 0.2], [0.3, 0.4]]), torch.ones(2, 2), torch.zeros(2, 2)
    labels = torch.ones(2, 2, dtype=torch.long)  # clip 0 preferred everywhere
    base, _ = dense_dpo_loss(m0, m1, ref, ref, labels, beta=10)
    per_clip, _ = dense_dpo_loss(m0, m1, ref, ref, labels, beta=10, sft_weight=torch.tensor([2.0, 0.0]))
    # no ties here, so sft_ties makes no difference: a mean over the batch's 4 frames either way
    # clip 0 adds 2 x (0.1 + 0.2) over the batch's 4 frames; clip 1 adds nothing
    assert (per_clip - base).mean().item() == pytest.approx(2 * 0.3 / 4, rel=1e-5)


def test_sft_ties_covers_every_frame():
    m0 = torch.tensor([[0.10, 0.50, 0.30]])
    m1 = torch.tensor([[0.20, 0.10, 0.40]])
    ref = torch.zeros(1, 3)
    labels = torch.tensor([[1, 0, -1]])
    base, _ = dense_dpo_loss(m0, m1, ref, ref, labels, beta=500)
    ties, _ = dense_dpo_loss(m0, m1, ref, ref, labels, beta=500, sft_weight=2.0, sft_ties=True)
    # frame 0: clip 0 (0.10); frame 1, a tie: both clips' mean (0.30); frame 2: clip 1 (0.40); mean over 3
    assert (ties - base).mean().item() == pytest.approx(2.0 * (0.10 + 0.30 + 0.40) / 3, rel=1e-5)


def test_mean_over_non_tie_frames_of_the_whole_batch():
    zero = torch.zeros(2, 2)
    m0 = torch.tensor([[0.01, 0.0], [0.0, 0.0]])
    labels = torch.tensor([[1, 1], [0, 1]])
    loss, _ = dense_dpo_loss(m0, zero, zero, zero, labels, beta=100)
    # z = -50 * 0.01 = -0.5 on one frame, 0 on the two others: mean over 3 kept entries, not per clip first
    assert loss.mean().item() == pytest.approx((nls(-0.5) + 2 * nls(0.0)) / 3, rel=1e-6)


def test_all_ties_give_zero_loss_and_zero_gradient():
    m0 = torch.rand(2, 3, requires_grad=True)
    m1 = torch.rand(2, 3, requires_grad=True)
    loss, metrics = dense_dpo_loss(
        m0, m1, torch.rand(2, 3), torch.rand(2, 3), torch.zeros(2, 3, dtype=torch.long)
    )
    assert loss.mean().item() == 0.0
    loss.mean().backward()  # still attached to the graph
    assert m0.grad.abs().sum().item() == 0.0 and m1.grad.abs().sum().item() == 0.0
    assert metrics["non_tie_frac"].item() == 0.0


def test_at_init_loss_is_log2():
    err = torch.rand(3, 4)
    loss, metrics = dense_dpo_loss(err, err * 2, err, err * 2, torch.tensor([[1, -1, 0, 1]] * 3))
    assert loss.mean().item() == pytest.approx(math.log(2))
    assert metrics["implicit_acc"].item() == 0.5


def test_label_sign_swaps_the_clips():
    m0, m1, r0, r1 = torch.rand(4, 1, 5).unbind(0)
    a, _ = dense_dpo_loss(m0, m1, r0, r1, torch.ones(1, 5, dtype=torch.long), beta=300)
    b, _ = dense_dpo_loss(m1, m0, r1, r0, -torch.ones(1, 5, dtype=torch.long), beta=300)
    assert a.mean().item() == pytest.approx(b.mean().item(), rel=1e-6)


def test_per_clip_shares_average_to_the_frame_mean():
    zero = torch.zeros(2, 2)
    m0 = torch.tensor([[0.01, 0.0], [0.0, 0.0]])
    loss, _ = dense_dpo_loss(m0, zero, zero, zero, torch.tensor([[1, 1], [0, 1]]), beta=100)
    assert loss.shape == (2,)
    # clip 0 holds 2 of the 3 kept frames, clip 1 one: shares B * sum_f / N
    assert loss[0].item() == pytest.approx(2 * (nls(-0.5) + nls(0.0)) / 3, rel=1e-6)
    assert loss[1].item() == pytest.approx(2 * nls(0.0) / 3, rel=1e-6)


def test_labels_must_match_error_shape():
    with pytest.raises(ValueError, match=r"\[B,T\]"):
        dense_dpo_loss(
            torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 4)
        )


def test_vanilla_video_dpo_by_hand():
    # per-frame errors are averaged over T into a clip error; clip 2 is a tie and is dropped
    m0 = torch.tensor([[0.1, 0.3], [0.2, 0.2], [0.5, 0.5]])
    m1 = torch.tensor([[0.2, 0.2], [0.1, 0.1], [0.1, 0.1]])
    r0 = torch.tensor([[0.2, 0.2], [0.2, 0.2], [0.1, 0.1]])
    r1 = torch.tensor([[0.2, 0.2], [0.2, 0.2], [0.1, 0.1]])
    labels = torch.tensor([1, -1, 0])
    loss, metrics = video_dpo_loss(m0, m1, r0, r1, labels, beta=500)
    # clip 0: dtheta_0 = 0.2 - 0.2 = 0, dtheta_1 = 0 -> z = 0
    # clip 1: dtheta_0 = 0, dtheta_1 = -0.1 -> z = -250 * -1 * (0 + 0.1) = 25
    assert loss.mean().item() == pytest.approx((nls(0.0) + nls(25.0)) / 2, rel=1e-6)
    assert metrics["implicit_acc"].item() == pytest.approx(0.75)
    same, _ = video_dpo_loss(m0.mean(1), m1.mean(1), r0.mean(1), r1.mean(1), labels, beta=500)
    assert same.mean().item() == pytest.approx(loss.mean().item())
