"""train.trainable_dtype=bf16: bf16 weights in the model, fp32 masters in the optimizer (MasterWeights)."""

from __future__ import annotations

import copy

import pytest
import torch

from mmalign.trainers.master_weights import MASTER, MasterWeights


def _weights(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(16, 8, generator=gen)),
        torch.nn.Parameter(torch.randn(8, generator=gen)),
    ]


def _grads(step: int, like: list[torch.Tensor]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=gen).bfloat16() for p in like]  # representable in bf16 exactly


def test_masters_follow_fp32_adamw_exactly_and_the_model_holds_their_rounding():
    """Given the same (bf16-representable) gradients, the masters are what fp32 AdamW computes, bit for bit,
    and the model's bf16 weights are the masters rounded."""
    ref = _weights()
    ref_opt = torch.optim.AdamW(ref, lr=1e-3, weight_decay=1e-2)
    params = _weights()
    opt = MasterWeights(params, lambda ms: torch.optim.AdamW(ms, lr=1e-3, weight_decay=1e-2))
    assert all(p.dtype == torch.bfloat16 for p in params)
    for step in range(5):
        for r, p, g in zip(ref, params, _grads(step, ref)):
            r.grad, p.grad = g.float(), g.clone()
        ref_opt.step()
        opt.step()
        opt.zero_grad(set_to_none=True)
    masters = [m for _, m in opt._pairs()]
    for r, m, p in zip(ref, masters, params):
        assert torch.equal(r.detach(), m)
        assert torch.equal(p.detach(), m.bfloat16())


def test_updates_below_bf16_resolution_accumulate_in_the_masters():
    """Why the masters: at lr 1e-5 every AdamW update is below half a bf16 ulp of weights near 1, so a bf16
    AdamW never moves them; the masters do, and the bf16 copy moves once they cross a rounding boundary."""
    start = torch.full((64,), 1.0)
    plain = torch.nn.Parameter(start.clone().bfloat16())
    plain_opt = torch.optim.AdamW([plain], lr=1e-5, weight_decay=0.0)
    wrapped = torch.nn.Parameter(start.clone())
    opt = MasterWeights([wrapped], lambda ms: torch.optim.AdamW(ms, lr=1e-5, weight_decay=0.0))
    for _ in range(1000):
        plain.grad = torch.ones_like(plain)
        wrapped.grad = torch.ones_like(wrapped)
        plain_opt.step()
        opt.step()
    assert torch.equal(plain.detach(), start.bfloat16())  # 1000 steps of ~1e-5 lost to rounding
    master = next(m for _, m in opt._pairs())
    assert torch.allclose(master, start - 1e-2, atol=1e-4)  # 1000 x lr
    assert (wrapped.detach().float() < 1.0).all()


def test_state_dict_round_trip_continues_exactly():
    params = _weights()
    opt = MasterWeights(params, lambda ms: torch.optim.AdamW(ms, lr=1e-3))
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for step in range(3):
        for p, g in zip(params, _grads(step, params)):
            p.grad = g
        opt.step()
        scheduler.step()
    saved = copy.deepcopy(opt.state_dict())  # as a checkpoint file: state_dict() hands out the live tensors
    assert all(
        MASTER in entries and entries[MASTER].dtype == torch.float32 for entries in saved["state"].values()
    )
    assert saved["param_groups"][0]["lr"] == pytest.approx(1e-3 / 4)  # the schedule's lr, not the initial one

    other = _weights(seed=1)  # different values: everything must come from the state
    resumed = MasterWeights(other, lambda ms: torch.optim.AdamW(ms, lr=1e-3))
    resumed.load_state_dict(saved)
    for p, q in zip(params, other):
        assert torch.equal(p.detach(), q.detach())
    for step in range(3, 5):
        for ps in (params, other):
            for p, g in zip(ps, _grads(step, ps)):
                p.grad = g.clone()
        opt.step()
        resumed.step()
    for (p, m), (q, n) in zip(opt._pairs(), resumed._pairs()):
        assert torch.equal(m, n) and torch.equal(p.detach(), q.detach())


def test_a_state_without_masters_is_refused_by_name():
    plain = _weights()
    plain_opt = torch.optim.AdamW(plain, lr=1e-3)
    for p, g in zip(plain, _grads(0, plain)):
        p.grad = g.float()
    plain_opt.step()
    opt = MasterWeights(_weights(), lambda ms: torch.optim.AdamW(ms, lr=1e-3))
    with pytest.raises(ValueError, match="fp32 master.*trainable_dtype=bf16"):
        opt.load_state_dict(plain_opt.state_dict())


def test_config_needs_bf16_autocast():
    from mmalign.config import ConfigError
    from mmalign.trainers import load_config

    with pytest.raises(ConfigError, match="trainable_dtype=bf16 needs train.mixed_precision=bf16"):
        load_config(None, ["train.trainable_dtype=bf16"])
    assert (
        load_config(None, ["train.trainable_dtype=bf16", "train.mixed_precision=bf16"]).train.trainable_dtype
        == "bf16"
    )


def test_self_npo_ema_teacher_keeps_an_fp32_shadow_of_bf16_weights():
    """A 1 - decay = 0.001 step of the EMA vanishes in bf16; the shadow is fp32 and swaps in as the weights' dtype."""
    from mmalign.trainers.self_npo import EMATeacher

    net = torch.nn.Linear(4, 4).bfloat16()
    teacher = EMATeacher(net, decay=0.999)
    assert all(s.dtype == torch.float32 for s in teacher.shadow)
    before = [s.clone() for s in teacher.shadow]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    teacher.after_optimizer_step()
    for s, b in zip(teacher.shadow, before):
        assert torch.allclose(s - b, torch.full_like(s, 1e-3), atol=1e-5)
    with teacher.swapped_in(net):
        assert all(p.dtype == torch.bfloat16 for p in net.parameters())
        assert torch.equal(net.weight, teacher.shadow[0].bfloat16())
