"""Inversion-DPO trainer (Li et al. 2025, arXiv 2507.11554; code MIGHTYEZ/Inversion-DPO): config, data, compute_loss.

Diffusion-DPO's random forward noising is replaced by a deterministic DDIM inversion of each clean latent
with the frozen reference (:mod:`mmalign.pipelines.inversion`), cached once per (image, prompt, inverter,
grid, guidance) by :mod:`mmalign.data.inversion_cache`. Two modes (docs/inversion_dpo.md):

- ``inverted_noise`` (default, InPO-style): sample a grid step k per pair, take the inverted ``x_{t_k}`` of
  winner and loser, form the implied noise and apply the Diffusion-DPO loss with it;
- ``trajectory`` (the released code): regress the policy's guided eps onto the reference's at K of the N
  points of each inverted trajectory (:func:`mmalign.losses.inversion_dpo.trajectory_dpo_loss`).

Latents are the VAE posterior *mean* (the trajectory belongs to one deterministic x0), not a posterior sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from mmalign.config import ConfigError, _f
from mmalign.data.cache import CachedPairDataset, LatentCache
from mmalign.data.inversion_cache import DTYPES, InversionCache, entry_key, module_fingerprint
from mmalign.data.setup import TrainData, drop_captions, image_pair_data
from mmalign.losses.diffusion_dpo import LOSS_TYPES, diffusion_dpo_loss
from mmalign.losses.inversion_dpo import implied_noise, trajectory_dpo_loss, trajectory_weights
from mmalign.pipelines import inversion
from mmalign.pipelines.inversion import (
    grid_alphas,
    guided_output,
    inversion_timesteps,
    split_prediction,
    zero_conditioning,
)
from mmalign.trainers.common import TrainModels, noised_pairs, pair_errors, repeat_cond

MODES = ("inverted_noise", "trajectory")
UNCOND = ("zeros", "empty_prompt")


@dataclass
class InversionDPOConfig:
    name: str = _f("inversion_dpo", "Method name.")
    mode: str = _f("inverted_noise", "inverted_noise (InPO-style: Diffusion-DPO with the inversion's implied noise; non-zero gradient at init) | trajectory (the released code's loss; zero gradient while policy == reference).")
    beta: float = _f(2000.0, "KL strength. inverted_noise: canonical Diffusion-DPO beta, z = -(beta/2)(delta_w - delta_l). trajectory: z = sign*(beta/2)(D_w - D_l)/N. Released launcher: 2000.")
    num_inversion_steps: int = _f(80, "N, steps of the DDIM inversion grid (released launcher: 80 -> t = 0, 12, ..., 948; InPO: 10).")
    timestep_spacing: str = _f("leading", "Grid spacing as DDIMInverseScheduler: leading | trailing.")
    steps_offset: int = _f(0, "Grid offset (the released code's DDIMScheduler: 0).")
    set_alpha_to_one: bool = _f(False, "Start level of the inversion: 1 (clean), or alphas_cumprod[0] as the released code (false).")
    inversion_guidance: float = _f(2.0, "CFG scale of the inverter (and of the policy in trajectory mode). Released code: 2.")
    uncond: str = _f("zeros", "Unconditional branch of the CFG: zeros (all-zero text embeddings, the released code) | empty_prompt.")
    trajectory_steps: int = _f(8, "trajectory mode: K of the N grid steps subsampled per pair and update (N = the released code, one graph of 4N forwards).")
    reference_eps: str = _f("live", "trajectory mode: where eps_ref comes from. live: the reference re-run at the K points in the same batch as the policy (exactly equal to the policy at LoRA init, same precision); cached: the inverter's eps stored in the cache (no reference forward, twice the cache, differs from a live forward by float rounding).")
    sign: int = _f(1, "trajectory mode: logit sign; +1 the released code (winner pushed off the reference trajectory), -1 the likelihood derivation.")
    loss_type: str = _f("sigmoid", "inverted_noise mode: sigmoid | hinge | ipo (as diffusion_dpo).")
    sft_weight: float = _f(0.0, "inverted_noise mode: adds sft_weight x winner error.")
    cache_inversions: bool = _f(True, "Invert every image once into the inversion cache (needs data.cache=true); false = invert with the reference every step.")
    cache_dtype: str = _f("float32", "Storage dtype of cached trajectories: float32 | float16 | bfloat16 (half the disk).")
    inversion_batch_size: int = _f(8, "Images per batch of the one-off inversion pass.")

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"method.mode={self.mode!r}: choose from {MODES}")
        if self.beta <= 0:
            raise ConfigError(f"method.beta={self.beta} must be > 0 (released code: 2000)")
        if not 1 <= self.num_inversion_steps <= 1000:
            raise ConfigError(f"method.num_inversion_steps={self.num_inversion_steps} must be in [1, 1000] (paper: 80)")
        if self.timestep_spacing not in ("leading", "trailing"):
            raise ConfigError(f"method.timestep_spacing={self.timestep_spacing!r}: use leading or trailing")
        if self.uncond not in UNCOND:
            raise ConfigError(f"method.uncond={self.uncond!r}: choose from {UNCOND}")
        if not 1 <= self.trajectory_steps <= self.num_inversion_steps:
            raise ConfigError(f"method.trajectory_steps={self.trajectory_steps} must be in [1, method.num_inversion_steps={self.num_inversion_steps}]")
        if self.reference_eps not in ("live", "cached"):
            raise ConfigError(f"method.reference_eps={self.reference_eps!r}: use live or cached")
        if self.sign not in (1, -1):
            raise ConfigError(f"method.sign={self.sign}: use 1 (released code) or -1 (likelihood derivation)")
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"method.loss_type={self.loss_type!r}: choose from {LOSS_TYPES}")
        if self.cache_dtype not in DTYPES:
            raise ConfigError(f"method.cache_dtype={self.cache_dtype!r}: choose from {tuple(DTYPES)}")
        if self.inversion_batch_size < 1:
            raise ConfigError("method.inversion_batch_size must be >= 1")


# --------------------------------------------------------------------------------------------------
# data: the latent/text cache, plus the inversion cache


def method_grid(mc: InversionDPOConfig, adapter: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps [N], levels [N+1]) of the method's inversion grid."""
    grid = inversion_timesteps(adapter.scheduler.config.num_train_timesteps, mc.num_inversion_steps,
                               spacing=mc.timestep_spacing, steps_offset=mc.steps_offset)
    return grid, grid_alphas(adapter.scheduler, grid, set_alpha_to_one=mc.set_alpha_to_one)


def inverter_of(adapter: Any) -> torch.nn.Module:
    """The frozen reference network (the data is built before any LoRA is attached)."""
    pipe = getattr(adapter, "pipeline", None)
    if pipe is None or getattr(pipe, adapter.denoiser_name, None) is None:
        raise ValueError(f"{type(adapter).__name__} exposes no pipeline.{adapter.denoiser_name}; inversion needs the reference network")
    return getattr(pipe, adapter.denoiser_name)


def inversion_fingerprint(cfg: Any, adapter: Any, denoiser: torch.nn.Module) -> dict[str, Any]:
    mc, m = cfg.method, cfg.model
    return {"inverter": m.pretrained, "revision": m.revision, "variant": m.variant, "weights": module_fingerprint(denoiser),
            "family": adapter.family, "num_steps": mc.num_inversion_steps, "spacing": mc.timestep_spacing,
            "steps_offset": mc.steps_offset, "set_alpha_to_one": mc.set_alpha_to_one, "guidance": mc.inversion_guidance,
            "uncond": mc.uncond, "dtype": mc.cache_dtype, "store_eps": mc.mode == "trajectory" and mc.reference_eps == "cached",
            "prediction_type": adapter.scheduler.config.prediction_type,
            "alphas_cumprod": float(adapter.scheduler.alphas_cumprod.double().sum())}


def _one_cond(latent_cache: LatentCache, adapter: Any, prompt: str, meta: dict, resolution: int) -> dict[str, torch.Tensor]:
    cond = dict(latent_cache.text(prompt))
    extra = adapter.extra_conditioning({"original_size": [meta["original_size"]], "crop_top_left": [meta["crop_top_left"]]}, resolution)
    cond.update({k: v[0] for k, v in extra.items()})
    return cond


def _load_entry(latent_cache: LatentCache, adapter: Any, pair_key: str, which: str, flip: bool, prompt: str,
                resolution: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    item = latent_cache.pair(pair_key, flip=flip)
    mean = item[f"mean_{which}"].float()
    x0 = adapter.latents_from_moments(mean[None], torch.zeros_like(mean[None]))[0]  # posterior mean, scaled
    return x0, _one_cond(latent_cache, adapter, prompt, item, resolution)


def make_uncond(mc: InversionDPOConfig, cond: dict[str, torch.Tensor], empty: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """Unconditional branch for a batch of ``cond``: zeros, or the empty prompt's embedding (micro-conditioning kept)."""
    if mc.inversion_guidance == 1.0:
        return None
    if mc.uncond == "zeros" or empty is None:
        return zero_conditioning(cond)
    b = next(iter(cond.values())).shape[0]
    out = {k: v.to(cond[k].device).reshape(1, *cond[k].shape[1:]).expand(b, *cond[k].shape[1:]) for k, v in empty.items() if k in cond}
    return {**cond, **out}


def build_inversion_cache(inv_cache: InversionCache, dataset: CachedPairDataset, adapter: Any, denoiser: torch.nn.Module,
                          mc: InversionDPOConfig, *, resolution: int, flips: tuple[bool, ...], device: Any,
                          autocast: Any = None, progress: bool = True) -> int:
    """Invert every (pair, winner/loser, flip) of ``dataset`` missing from ``inv_cache``; returns how many.

    Runs in the inverter's own dtype without autocast (unless ``autocast`` is given), so the cache holds the same
    numbers whether ``mmalign cache --inversion`` or ``mmalign train`` filled it.
    """
    import contextlib

    latent_cache = dataset.cache
    grid, _ = method_grid(mc, adapter)
    empty = latent_cache.text("") if mc.uncond == "empty_prompt" else None
    items: dict[str, Any] = {}  # one entry per distinct (latent, prompt): shared images are inverted once
    for rec, pk in zip(dataset.records, dataset.keys):
        for flip in flips:
            cached = latent_cache.pair(pk, flip=flip)
            for which in ("w", "l"):
                key = entry_key(cached[f"mean_{which}"], rec.prompt)
                if key not in items:
                    items[key] = partial(_load_entry, latent_cache, adapter, pk, which, flip, rec.prompt, resolution)
    items = list(items.items())
    if all(key in inv_cache for key, _ in items):
        return 0
    moved_from = next(denoiser.parameters()).device
    denoiser.to(device)

    def invert(x0, cond):
        cond = {k: v.to(device) for k, v in cond.items()}
        with autocast() if autocast is not None else contextlib.nullcontext():
            # module attribute lookup: tests count inverter calls by patching inversion.ddim_invert
            return inversion.ddim_invert(adapter, denoiser, x0.to(device), cond, timesteps=grid,
                                         guidance_scale=mc.inversion_guidance, uncond=make_uncond(mc, cond, empty),
                                         set_alpha_to_one=mc.set_alpha_to_one)

    try:
        return inv_cache.build(items, invert, batch_size=mc.inversion_batch_size, progress=progress)
    finally:
        denoiser.to(moved_from)


class InversionPairDataset(torch.utils.data.Dataset):
    """Cached pairs plus the slices of their inverted trajectories one update needs.

    ``inverted_noise``: one grid step k per pair (``step``, 0-based) and ``xt_w``/``xt_l`` [C,H,W].
    ``trajectory``: K sorted steps (``steps`` [K]), the inverter inputs ``x_in_w``/``x_in_l`` [K,C,H,W] (the
    latent *before* each step; step 0 starts from the clean latent, flagged by ``from_clean``) and the
    reference eps ``ref_eps_w``/``ref_eps_l`` [K,C,H,W].
    """

    def __init__(self, base: CachedPairDataset, inv_cache: InversionCache, *, mode: str, num_steps: int, trajectory_steps: int,
                 random_flip: bool):
        self.base, self.inv, self.mode = base, inv_cache, mode
        self.with_eps = inv_cache.store_eps
        self.num_steps, self.k, self.random_flip = num_steps, trajectory_steps, random_flip

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Any]:
        rec, pk = self.base.records[i], self.base.keys[i]
        flip = self.random_flip and bool(torch.rand(()) < 0.5)
        item = self.base.cache.pair(pk, flip=flip)
        item.update(prompt=rec.prompt, item_id=rec.row)
        key = {w: entry_key(item[f"mean_{w}"], rec.prompt) for w in ("w", "l")}
        if self.mode == "inverted_noise":
            step = int(torch.randint(0, self.num_steps, ()))
            item["step"] = torch.tensor(step)
            for w in ("w", "l"):
                item[f"xt_{w}"] = self.inv.latents(key[w], [step])[0]
            return item
        steps = torch.randperm(self.num_steps)[: self.k].sort().values
        item["steps"] = steps
        item["from_clean"] = steps == 0
        inputs = [max(s - 1, 0) for s in steps.tolist()]
        for w in ("w", "l"):
            item[f"x_in_{w}"] = self.inv.latents(key[w], inputs)
            if self.with_eps:
                item[f"ref_eps_{w}"] = self.inv.eps(key[w], steps.tolist())
        return item


def inversion_pair_data(cfg: Any, adapter: Any, accelerator: Any) -> TrainData:
    """Pairs from the latent/text cache with their cached inversions (built here on first use).

    Without ``data.cache`` or with ``method.cache_inversions=false`` the pairs come without inversions and
    :func:`compute_loss` inverts with the reference every step (the released code's cost).
    """
    mc, d, res = cfg.method, cfg.data, cfg.model.resolution
    base = image_pair_data(cfg, adapter, accelerator)
    latent_cache = getattr(base.dataset, "cache", None)
    grid, alphas = method_grid(mc, adapter)
    prep = partial(prepare_inversion_batch, adapter=adapter, latent_cache=latent_cache, mc=mc,
                   caption_dropout=d.caption_dropout, resolution=res, grid=grid, alphas=alphas)
    if latent_cache is None or not mc.cache_inversions:
        return TrainData(base.dataset, base.collate, prep, {**base.counts, "inversions_built": 0}, base.skipped)

    denoiser = inverter_of(adapter)
    inv_cache = InversionCache(latent_cache.dir, inversion_fingerprint(cfg, adapter, denoiser))
    flips = (False, True) if d.random_flip else (False,)
    built = 0
    if accelerator.is_main_process:
        built = build_inversion_cache(inv_cache, base.dataset, adapter, denoiser, mc, resolution=res, flips=flips,
                                      device=accelerator.device, progress=cfg.train.progress)
    accelerator.wait_for_everyone()
    inv_cache.reload()
    dataset = InversionPairDataset(base.dataset, inv_cache, mode=mc.mode, num_steps=mc.num_inversion_steps,
                                   trajectory_steps=mc.trajectory_steps, random_flip=d.random_flip)
    counts = {**base.counts, "inversions_built": built, "inversions_cached": len(inv_cache)}
    return TrainData(dataset, base.collate, prep, counts, base.skipped)


def prepare_inversion_batch(raw: dict, device: torch.device, *, adapter: Any, latent_cache: LatentCache | None,
                            mc: InversionDPOConfig, caption_dropout: float, resolution: int, grid: torch.Tensor,
                            alphas: torch.Tensor) -> dict:
    """Raw batch -> posterior-mean latents, conditioning (caption-dropped for the DPO forwards, the real prompts
    for inversion/trajectory), the grid, and whatever cached inversion slices the batch carries."""
    prompts = list(raw["prompt"])
    dropped = drop_captions(prompts, caption_dropout)
    if latent_cache is None:
        cond = adapter.encode_prompts(dropped)
        inv_cond = adapter.encode_prompts(prompts)
        empty = adapter.encode_prompts([""]) if mc.uncond == "empty_prompt" else None
        mean_w, _ = adapter.latent_moments(raw["pixels_w"].to(device))
        mean_l, _ = adapter.latent_moments(raw["pixels_l"].to(device))
    else:
        def texts(ps):
            rows = [latent_cache.text(p) for p in ps]
            return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

        cond, inv_cond = texts(dropped), texts(prompts)
        empty = texts([""]) if mc.uncond == "empty_prompt" else None
        mean_w, mean_l = raw["mean_w"].to(device), raw["mean_l"].to(device)
    extra = adapter.extra_conditioning(raw, resolution)
    cond.update(extra)
    inv_cond.update(extra)
    cond = {k: v.to(device) for k, v in cond.items()}
    inv_cond = {k: v.to(device) for k, v in inv_cond.items()}
    batch = {
        "latents_w": adapter.latents_from_moments(mean_w, torch.zeros_like(mean_w)),
        "latents_l": adapter.latents_from_moments(mean_l, torch.zeros_like(mean_l)),
        "cond": cond, "inv_cond": inv_cond, "inv_uncond": make_uncond(mc, inv_cond, empty),
        "grid": grid, "alphas": alphas, "prompts": dropped, "item_id": raw.get("item_id", []),
    }
    for key in ("step", "xt_w", "xt_l", "steps", "from_clean", "x_in_w", "x_in_l", "ref_eps_w", "ref_eps_l"):
        if key in raw:
            batch[key] = raw[key].to(device)
    return batch


# --------------------------------------------------------------------------------------------------
# the loss


def compute_loss(batch: dict, models: TrainModels, cfg: InversionDPOConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One Inversion-DPO step on a batch of :func:`prepare_inversion_batch`.

    Args:
        batch: ``latents_w``/``latents_l`` [B,C,H,W] posterior-mean latents, ``cond`` (caption-dropped) and
            ``inv_cond``/``inv_uncond`` conditioning, ``grid`` [N], ``alphas`` [N+1], and the cached slices
            (absent: invert with the reference now).
        models: adapter, trained denoiser, reference access.
        cfg: the method config.
    """
    if cfg.mode == "inverted_noise":
        return _inverted_noise_loss(batch, models, cfg)
    return _trajectory_loss(batch, models, cfg)


def _invert_now(batch: dict, models: TrainModels, cfg: InversionDPOConfig, num_steps: int):
    """Online inversion of winners then losers with the reference (no cache): [2B] trajectories."""
    x0 = torch.cat([batch["latents_w"], batch["latents_l"]])
    uncond = batch["inv_uncond"]
    with models.reference() as ref:
        return inversion.ddim_invert(models.adapter, ref, x0, repeat_cond(batch["inv_cond"]), timesteps=batch["grid"],
                                     guidance_scale=cfg.inversion_guidance, uncond=None if uncond is None else repeat_cond(uncond),
                                     set_alpha_to_one=cfg.set_alpha_to_one, num_steps=num_steps)


def _inverted_noise_loss(batch, models, cfg):
    x_w, x_l = batch["latents_w"], batch["latents_l"]
    b, device = x_w.shape[0], x_w.device
    if "xt_w" in batch:
        step, xt = batch["step"].long(), torch.cat([batch["xt_w"], batch["xt_l"]])
    else:
        step = torch.randint(0, len(batch["grid"]), (b,), device=device)
        inv = _invert_now(batch, models, cfg, int(step.max()) + 1)
        xt = inv.latents[torch.arange(2 * b), step.repeat(2).cpu()].to(device)
    step = step.to(device)
    t = batch["grid"].to(device)[step]
    abar = batch["alphas"].to(device)[step + 1]
    noise = implied_noise(xt, torch.cat([x_w, x_l]), abar.repeat(2))
    pairs = noised_pairs(models.adapter, x_w, x_l, noise=noise, t=t)
    m_w, m_l, r_w, r_l = pair_errors(models, pairs["xt"], pairs["t"], repeat_cond(batch["cond"]), pairs["target"])
    loss, metrics = diffusion_dpo_loss(m_w, m_l, r_w, r_l, beta=cfg.beta, loss_type=cfg.loss_type, sft_weight=cfg.sft_weight)
    metrics["inversion_t"] = t.float().mean()
    return loss.mean(), metrics


def _trajectory_loss(batch, models, cfg):
    adapter = models.adapter
    x_w, x_l = batch["latents_w"], batch["latents_l"]
    b, device = x_w.shape[0], x_w.device
    n = len(batch["grid"])
    x0 = torch.cat([x_w, x_l])  # [2B, ...]
    if "x_in_w" in batch:
        steps = batch["steps"].long()
        x_in = torch.cat([batch["x_in_w"], batch["x_in_l"]]).float()  # [2B, K, ...]
        clean = batch["from_clean"].repeat(2, 1)
        x_in = torch.where(clean.reshape(*clean.shape, *[1] * (x0.ndim - 1)), x0[:, None].float(), x_in)
        ref_eps = torch.cat([batch["ref_eps_w"], batch["ref_eps_l"]]).float() if "ref_eps_w" in batch else None
    else:
        steps = torch.stack([torch.randperm(n)[: cfg.trajectory_steps].sort().values for _ in range(b)]).to(device)
        inv = _invert_now(batch, models, cfg, int(steps.max()) + 1)
        traj = torch.cat([x0[:, None].float().cpu(), inv.latents.cpu()], 1).to(device)  # [2B, 1+S, ...]: x_0 .. x_S
        idx = steps.repeat(2, 1)
        rows = torch.arange(2 * b, device=device)[:, None]
        x_in, ref_eps = traj[rows, idx], inv.eps.to(device)[rows, idx]
    k = steps.shape[1]
    steps2 = steps.repeat(2, 1).to(device)  # [2B, K]
    grid, alphas = batch["grid"].to(device), batch["alphas"].to(device)
    flat_x = x_in.flatten(0, 1)  # [2B*K, ...]
    flat_t = grid[steps2].flatten()
    cond = {key: v.repeat(2, *[1] * (v.ndim - 1)).repeat_interleave(k, 0) for key, v in batch["inv_cond"].items()}
    uncond = batch["inv_uncond"]
    if uncond is not None:
        uncond = {key: v.repeat(2, *[1] * (v.ndim - 1)).repeat_interleave(k, 0) for key, v in uncond.items()}
    kind, abar_in = adapter.scheduler.config.prediction_type, alphas[steps2].flatten()
    out = guided_output(adapter, models.denoiser, flat_x, flat_t, cond, uncond, cfg.inversion_guidance).float()
    model_eps = split_prediction(out, flat_x.float(), abar_in, kind)[0].reshape(2 * b, k, *x0.shape[1:])
    if cfg.reference_eps == "live" or ref_eps is None:  # same inputs, same batch: bitwise equal to the policy at init
        with models.reference() as ref:
            ref_out = guided_output(adapter, ref, flat_x, flat_t, cond, uncond, cfg.inversion_guidance).float()
        ref_eps = split_prediction(ref_out, flat_x.float(), abar_in, kind)[0].reshape(2 * b, k, *x0.shape[1:])
    m_w, m_l = model_eps.chunk(2)
    r_w, r_l = ref_eps.chunk(2)
    weights = trajectory_weights(alphas[steps + 1])
    loss, metrics = trajectory_dpo_loss(m_w, r_w, m_l, r_l, weights, beta=cfg.beta, num_grid_steps=n, sign=cfg.sign)
    return loss.mean(), metrics
