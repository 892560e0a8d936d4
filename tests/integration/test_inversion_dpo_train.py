"""Inversion-DPO on tiny pipelines: the inversion cache, gradients at LoRA init, what trains."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_only_trainable_changed

from mmalign.commands.cache import SingleProcess as _SingleProcess
from mmalign.pipelines import inversion, load_pipeline, make_adapter
from mmalign.trainers import load_config
from mmalign.trainers.common import TrainModels
from mmalign.trainers.data import inversion_pairs as inversion_pair_data
from mmalign.trainers.inversion_dpo import compute_loss
from mmalign.trainers.loop import add_lora, train

torch.set_num_threads(1)


def tiny_cfg(model, manifest, out, *extra):
    return load_config(
        None,
        [
            f"model.pretrained={model}",
            "model.resolution=16",
            f"data.source={manifest}",
            f"train.output_dir={out}",
            f"data.cache_dir={out}/../cache",
            "method.name=inversion_dpo",
            "method.num_inversion_steps=8",
            "method.trajectory_steps=3",
            "method.inversion_batch_size=4",
            "train.max_steps=3",
            "train.batch_size=2",
            "train.report_to=none",
            "train.progress=false",
            "train.learning_rate=1e-3",
            "train.scale_lr=false",
            "train.checkpoint_every=0",
            "lora.rank=2",
            *extra,
        ],
    )


@pytest.fixture
def count_inversions(monkeypatch):
    """Number of images the inverter has been run on (the cache builder and the online path both go through here)."""
    seen = {"images": 0}
    real = inversion.ddim_invert

    def counted(adapter, denoiser, x0, *args, **kwargs):
        seen["images"] += x0.shape[0]
        return real(adapter, denoiser, x0, *args, **kwargs)

    monkeypatch.setattr(inversion, "ddim_invert", counted)
    return seen


def test_cache_is_hit_every_epoch_and_invalidated_by_the_grid(
    tiny_sd15, pair_manifest, tmp_path, count_inversions
):
    # 4 pairs x (winner, loser) x (flip, no flip) = 16 inversions, once; 7 steps of batch 2 = 3.5 epochs.
    first = train(tiny_cfg(tiny_sd15, pair_manifest, tmp_path / "a", "train.max_steps=7"))
    assert count_inversions["images"] == 16
    assert first.summary["data"]["inversions_built"] == 16
    again = train(tiny_cfg(tiny_sd15, pair_manifest, tmp_path / "b", "train.max_steps=2"))
    assert (
        count_inversions["images"] == 16 and again.summary["data"]["inversions_built"] == 0
    )  # warm: no inverter call
    regrid = train(
        tiny_cfg(
            tiny_sd15, pair_manifest, tmp_path / "c", "train.max_steps=1", "method.num_inversion_steps=6"
        )
    )
    assert count_inversions["images"] == 32 and regrid.summary["data"]["inversions_built"] == 16
    reguide = train(
        tiny_cfg(
            tiny_sd15, pair_manifest, tmp_path / "d", "train.max_steps=1", "method.inversion_guidance=1.5"
        )
    )
    assert reguide.summary["data"]["inversions_built"] == 16


def test_an_image_shared_by_pairs_is_inverted_once(tiny_sd15, pair_manifest, tmp_path, count_inversions):
    import json

    rows = [json.loads(line) for line in pair_manifest.read_text().splitlines()]
    # all-pairs labelling reuses images: pair the first winner against every loser (4 pairs, 5 distinct images)
    shared = [dict(rows[0], rejected=r["rejected"]) for r in rows]
    manifest = pair_manifest.parent / "shared.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in shared))
    result = train(tiny_cfg(tiny_sd15, manifest, tmp_path / "run", "train.max_steps=1"))
    assert result.summary["data"]["inversions_built"] == 5 * 2  # 5 images x (flip, no flip), not 4 x 2 x 2
    assert count_inversions["images"] == 10


def test_online_inversion_without_the_cache(tiny_sd15, pair_manifest, tmp_path, count_inversions):
    result = train(
        tiny_cfg(
            tiny_sd15, pair_manifest, tmp_path / "run", "method.cache_inversions=false", "train.max_steps=2"
        )
    )
    assert result.summary["data"]["inversions_built"] == 0
    assert count_inversions["images"] == 2 * 2 * 2  # every step inverts its 2 winners and 2 losers


def _setup_batch(model, manifest, tmp_path, *extra, perturb: float = 0.0, pairs: int = 4):
    """Config, models and one prepared batch of ``pairs`` pairs at LoRA init (B perturbed by ``perturb``)."""
    cfg = tiny_cfg(model, manifest, tmp_path / "run", *extra)
    pipe, family = load_pipeline(str(model))
    adapter = make_adapter(pipe, family)
    pipe.unet.requires_grad_(False)
    data = inversion_pair_data(cfg, adapter, _SingleProcess())
    add_lora(pipe.unet, cfg.lora)
    if perturb:
        with torch.no_grad():
            for name, p in pipe.unet.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, perturb, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    batch = data.prepare(data.collate([data.dataset[i] for i in range(pairs)]), torch.device("cpu"))
    return cfg, TrainModels(adapter, pipe.unet), batch


def _init_step(model, manifest, tmp_path, *extra, perturb: float = 0.0):
    """One compute_loss + backward at LoRA init (the model equals the reference); returns (grad norm, metrics)."""
    cfg, models, batch = _setup_batch(model, manifest, tmp_path, *extra, perturb=perturb, pairs=2)
    params = [p for p in models.denoiser.parameters() if p.requires_grad]
    loss, metrics = compute_loss(batch, models, cfg.method)
    loss.backward()
    return math.sqrt(sum(float(p.grad.pow(2).sum()) for p in params if p.grad is not None)), loss, metrics


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "online"])
def test_gradient_at_lora_init(tiny_sd15, pair_manifest, tmp_path, cached):
    flag = f"method.cache_inversions={str(cached).lower()}"
    g_noise, _, _ = _init_step(tiny_sd15, pair_manifest, tmp_path, flag, "method.mode=inverted_noise")
    assert g_noise > 0  # inverted_noise: Diffusion-DPO with e~ moves from step 0
    g_traj, loss, metrics = _init_step(tiny_sd15, pair_manifest, tmp_path, flag, "method.mode=trajectory")
    # trajectory (the released loss): D_w = D_l = 0 and dD/dtheta = 0 while policy == reference -> exactly zero
    assert (
        g_traj == 0.0 and loss.item() == pytest.approx(math.log(2.0)) and metrics["eps_diff_w"].item() == 0.0
    )
    if cached:
        # eps_ref read from the cache (computed in other batches) equals the policy's only up to float rounding
        _, _, m_cached = _init_step(
            tiny_sd15, pair_manifest, tmp_path, flag, "method.mode=trajectory", "method.reference_eps=cached"
        )
        assert m_cached["eps_diff_w"].item() < 1e-10
    g_moved, _, _ = _init_step(
        tiny_sd15, pair_manifest, tmp_path, flag, "method.mode=trajectory", perturb=1e-2
    )
    assert g_moved > 0  # once the policy differs from the reference it has a direction


@pytest.mark.parametrize(
    ("family", "lora"),
    [("sd15", True), ("sd15", False), ("sdxl", True)],
    ids=["sd15-lora", "sd15-full", "sdxl-lora"],
)
def test_trainable_change_and_frozen_stay(family, lora, request, pair_manifest, tmp_path):
    """inverted_noise mode (trajectory mode cannot pass this from an init equal to the reference: see
    test_gradient_at_lora_init and docs/inversion_dpo.md)."""
    from diffusers import UNet2DConditionModel

    model = request.getfixturevalue(f"tiny_{family}")
    extra = [f"lora.enabled={str(lora).lower()}", "method.mode=inverted_noise"]
    result = train(tiny_cfg(model, pair_manifest, tmp_path / "run", *extra), keep_initial=True)
    pretrained = dict(UNet2DConditionModel.from_pretrained(model, subfolder="unet").named_parameters())
    trainable, frozen = assert_only_trainable_changed(result, pretrained)
    assert trainable > 0 and (frozen > 0) == lora
    metrics = result.summary["final_metrics"]
    assert math.isfinite(metrics["loss"]) and {"delta_w", "delta_l", "reward_margin", "implicit_acc"} <= set(
        metrics
    )


def test_variant_helpers():
    from mmalign.trainers.inversion_dpo import first_step, standardize

    noise = torch.randn(3, 4, 8, 8) * 0.4 + torch.tensor([0.2, -0.1, 0.0, 0.1]).view(1, 4, 1, 1)
    z = standardize(noise)
    torch.testing.assert_close(z.mean(dim=(2, 3)), torch.zeros(3, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(dim=(2, 3)), torch.ones(3, 4), atol=1e-5, rtol=0)
    assert first_step(torch.tensor([0, 12, 24]), True) == 1
    assert first_step(torch.tensor([0, 12, 24]), False) == 0
    assert first_step(torch.tensor([11, 23]), True) == 0  # trailing spacing: no identity step


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "online"])
def test_skip_identity_step_never_samples_t0(tiny_sd15, pair_manifest, tmp_path, cached):
    flag = f"method.cache_inversions={str(cached).lower()}"
    seen = set()
    for seed in range(6):
        cfg = tiny_cfg(tiny_sd15, pair_manifest, tmp_path / "run", flag, "method.skip_identity_step=true")
        pipe, family = load_pipeline(str(tiny_sd15))
        adapter = make_adapter(pipe, family)
        pipe.unet.requires_grad_(False)
        data = inversion_pair_data(cfg, adapter, _SingleProcess())
        add_lora(pipe.unet, cfg.lora)
        torch.manual_seed(seed)
        batch = data.prepare(data.collate([data.dataset[i] for i in range(4)]), torch.device("cpu"))
        _, metrics = compute_loss(batch, TrainModels(adapter, pipe.unet), cfg.method)
        seen.add(float(metrics["inversion_t"]))
        if cached:
            assert int(batch["step"].min()) >= 1
    assert min(seen) > 0  # the mean t of a batch is never dragged to 0 by the identity step


def test_forward_mix_one_ignores_the_inversion(tiny_sd15, pair_manifest, tmp_path):
    """forward_mix=1: every pair is forward-noised, so the loss does not depend on the inverted x_t."""
    losses = []
    for mix, scale in [(1.0, 1.0), (1.0, 3.0), (0.0, 1.0), (0.0, 3.0)]:
        cfg = tiny_cfg(tiny_sd15, pair_manifest, tmp_path / "run", f"method.forward_mix={mix}")
        pipe, family = load_pipeline(str(tiny_sd15))
        adapter = make_adapter(pipe, family)
        pipe.unet.requires_grad_(False)
        data = inversion_pair_data(cfg, adapter, _SingleProcess())
        torch.manual_seed(0)
        add_lora(pipe.unet, cfg.lora)
        with torch.no_grad():
            for name, p in pipe.unet.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
        torch.manual_seed(0)
        batch = data.prepare(data.collate([data.dataset[0], data.dataset[1]]), torch.device("cpu"))
        batch["xt_w"], batch["xt_l"] = batch["xt_w"] * scale, batch["xt_l"] * scale
        losses.append(compute_loss(batch, TrainModels(adapter, pipe.unet), cfg.method)[0].item())
    assert losses[0] == losses[1] and losses[2] != losses[3]


INPO = (
    "method.inverter=policy",
    "method.timestep_sampling=continuous",
    "method.inversion_eta=0.1",
    "method.inversion_guidance=1.0",
    "method.cache_inversions=false",
)


def test_inpo_options_need_the_online_inversion(tiny_sd15, pair_manifest, tmp_path):
    from mmalign.config import ConfigError

    for option in INPO[:3]:
        with pytest.raises(ConfigError, match="cache_inversions=false"):
            tiny_cfg(tiny_sd15, pair_manifest, tmp_path / "run", option)
        with pytest.raises(ConfigError, match="apply to mode=inverted_noise"):
            tiny_cfg(
                tiny_sd15,
                pair_manifest,
                tmp_path / "run",
                option,
                "method.mode=trajectory",
                "method.cache_inversions=false",
            )


def test_continuous_t_uses_the_latent_inverted_to_the_grid_point_below(tiny_sd15, pair_manifest, tmp_path):
    """InPO: t ~ U{0..T-1}; x_t is the inversion through every grid point < t (x_0 when there is none)."""
    from mmalign.trainers.inversion_dpo import _continuous_inversion

    cfg, models, batch = _setup_batch(
        tiny_sd15,
        pair_manifest,
        tmp_path,
        "method.timestep_sampling=continuous",
        "method.cache_inversions=false",
    )
    x0 = torch.cat([batch["latents_w"], batch["latents_l"]])
    full = inversion.ddim_invert(
        models.adapter,
        models.unwrap(models.denoiser),
        x0,
        {k: torch.cat([v, v]) for k, v in batch["inv_cond"].items()},
        timesteps=batch["grid"],
        guidance_scale=cfg.method.inversion_guidance,
        uncond=None,
    )
    grid, seen = batch["grid"], set()
    for seed in range(8):
        torch.manual_seed(seed)
        t, xt = _continuous_inversion(batch, models, cfg.method)
        for i, ti in enumerate(t.repeat(2).tolist()):
            below = int((grid < ti).sum())
            seen.add(below)
            expect = x0[i] if below == 0 else full.latents[i, below - 1]
            torch.testing.assert_close(xt[i], expect, rtol=1e-4, atol=1e-5)
    assert len(seen) >= 4 and any(int(x) not in grid.tolist() for x in t)  # t is not restricted to the grid


def test_policy_inverter_inverts_with_the_current_model(tiny_sd15, pair_manifest, tmp_path, monkeypatch):
    """inverter=policy: the LoRA is on while inverting (the reference inverts with it off); at LoRA init both agree."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    seen = []  # per inversion: were the LoRA layers switched off?
    real = inversion.ddim_invert

    def spy(adapter, denoiser, x0, *args, **kwargs):
        layers = [m for m in denoiser.modules() if isinstance(m, BaseTunerLayer)]
        assert layers and not torch.is_grad_enabled()
        seen.append(all(m.disable_adapters for m in layers))
        return real(adapter, denoiser, x0, *args, **kwargs)

    monkeypatch.setattr(inversion, "ddim_invert", spy)
    losses = {}
    for inverter in ("reference", "policy"):
        for perturb in (0.0, 0.05):
            cfg, models, batch = _setup_batch(
                tiny_sd15,
                pair_manifest,
                tmp_path,
                f"method.inverter={inverter}",
                "method.cache_inversions=false",
                perturb=perturb,
            )
            torch.manual_seed(0)
            losses[inverter, perturb] = compute_loss(batch, models, cfg.method)[0].item()
            assert seen[-1] == (inverter == "reference")  # adapters disabled only for the reference
    assert losses["reference", 0.0] == pytest.approx(losses["policy", 0.0], abs=1e-6)
    assert losses["reference", 0.05] != pytest.approx(losses["policy", 0.05], abs=1e-6)


def test_inpo_recipe_trains(tiny_sd15, pair_manifest, tmp_path, count_inversions):
    from diffusers import UNet2DConditionModel

    result = train(
        tiny_cfg(tiny_sd15, pair_manifest, tmp_path / "run", *INPO, "train.max_steps=2"), keep_initial=True
    )
    pretrained = dict(UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet").named_parameters())
    trainable, frozen = assert_only_trainable_changed(result, pretrained)
    assert trainable > 0 and frozen > 0
    assert result.summary["data"]["inversions_built"] == 0 and 0 < count_inversions["images"] <= 2 * 2 * 2
    assert math.isfinite(result.summary["final_metrics"]["loss"])


def test_a_run_trains_the_same_whether_or_not_its_inversion_cache_existed(tiny_sd15, pair_manifest, tmp_path):
    """Building the cache draws from the global RNG; training must not depend on whether it had to be built."""
    runs = []
    for name in ("builds", "reuses"):
        result = train(tiny_cfg(tiny_sd15, pair_manifest, tmp_path / name, "train.max_steps=3"))
        assert (result.summary["data"]["inversions_built"] > 0) == (name == "builds")
        lora = {k: p.detach().clone() for k, p in result.denoiser.named_parameters() if "lora_" in k}
        runs.append((result.summary["final_metrics"]["loss"], lora))
    assert runs[0][0] == runs[1][0] and runs[0][1].keys() == runs[1][1].keys()
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])
