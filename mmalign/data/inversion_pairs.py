"""Image pairs with their cached DDIM inversions: the training data of Inversion-DPO.

Every clean latent (VAE posterior mean) of a pair is inverted once with the frozen reference along the
spec's grid (:mod:`mmalign.pipelines.inversion`) into the inversion cache (:mod:`mmalign.data.inversion_cache`);
each item then carries the slices one update needs (one inverted ``x_t`` per image, or K trajectory points).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from mmalign.config import DataConfig
from mmalign.data.cache import CachedPairDataset, LatentCache
from mmalign.data.inversion_cache import InversionCache, entry_key, module_fingerprint
from mmalign.data.setup import TrainData, drop_captions, image_pair_data
from mmalign.pipelines import inversion
from mmalign.pipelines.inversion import grid_alphas, inversion_timesteps, zero_conditioning


@dataclass(frozen=True)
class InversionSpec:
    """How images are inverted and sliced (the fields of the same name of Inversion-DPO's method config)."""

    mode: str = "inverted_noise"  # inverted_noise | trajectory
    num_inversion_steps: int = 80
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    set_alpha_to_one: bool = False
    inversion_guidance: float = 2.0
    uncond: str = "zeros"  # zeros | empty_prompt
    trajectory_steps: int = 8
    reference_eps: str = "live"  # live | cached (store the inverter's eps too)
    skip_identity_step: bool = False  # inverted_noise: never sample a grid step at t = 0
    cache_inversions: bool = True
    cache_dtype: str = "float32"
    inversion_batch_size: int = 8


def method_grid(spec: InversionSpec, adapter: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps [N], levels [N+1]) of the spec's inversion grid."""
    grid = inversion_timesteps(
        adapter.scheduler.config.num_train_timesteps,
        spec.num_inversion_steps,
        spacing=spec.timestep_spacing,
        steps_offset=spec.steps_offset,
    )
    return grid, grid_alphas(adapter.scheduler, grid, set_alpha_to_one=spec.set_alpha_to_one)


def inverter_of(adapter: Any) -> torch.nn.Module:
    """The frozen reference network (the data is built before any LoRA is attached)."""
    pipe = getattr(adapter, "pipeline", None)
    if pipe is None or getattr(pipe, adapter.denoiser_name, None) is None:
        raise ValueError(
            f"{type(adapter).__name__} exposes no pipeline.{adapter.denoiser_name}; inversion needs the reference network"
        )
    return getattr(pipe, adapter.denoiser_name)


def inversion_fingerprint(
    spec: InversionSpec, model_id: dict[str, Any], adapter: Any, denoiser: torch.nn.Module
) -> dict[str, Any]:
    return {
        "inverter": model_id["model"],
        "revision": model_id["revision"],
        "variant": model_id["variant"],
        "weights": module_fingerprint(denoiser),
        "family": adapter.family,
        "num_steps": spec.num_inversion_steps,
        "spacing": spec.timestep_spacing,
        "steps_offset": spec.steps_offset,
        "set_alpha_to_one": spec.set_alpha_to_one,
        "guidance": spec.inversion_guidance,
        "uncond": spec.uncond,
        "dtype": spec.cache_dtype,
        "store_eps": spec.mode == "trajectory" and spec.reference_eps == "cached",
        "prediction_type": adapter.scheduler.config.prediction_type,
        "alphas_cumprod": float(adapter.scheduler.alphas_cumprod.double().sum()),
    }


def _one_cond(
    latent_cache: LatentCache, adapter: Any, prompt: str, meta: dict, resolution: int
) -> dict[str, torch.Tensor]:
    cond = dict(latent_cache.text(prompt))
    extra = adapter.extra_conditioning(
        {"original_size": [meta["original_size"]], "crop_top_left": [meta["crop_top_left"]]}, resolution
    )
    cond.update({k: v[0] for k, v in extra.items()})
    return cond


def _load_entry(
    latent_cache: LatentCache,
    adapter: Any,
    pair_key: str,
    which: str,
    flip: bool,
    prompt: str,
    resolution: int,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    item = latent_cache.pair(pair_key, flip=flip)
    mean = item[f"mean_{which}"].float()
    x0 = adapter.latents_from_moments(mean[None], torch.zeros_like(mean[None]))[0]  # posterior mean, scaled
    return x0, _one_cond(latent_cache, adapter, prompt, item, resolution)


def make_uncond(
    spec: InversionSpec, cond: dict[str, torch.Tensor], empty: dict[str, torch.Tensor] | None
) -> dict[str, torch.Tensor] | None:
    """Unconditional branch for a batch of ``cond``: zeros, or the empty prompt's embedding (micro-conditioning kept)."""
    if spec.inversion_guidance == 1.0:
        return None
    if spec.uncond == "zeros" or empty is None:
        return zero_conditioning(cond)
    b = next(iter(cond.values())).shape[0]
    out = {
        k: v.to(cond[k].device).reshape(1, *cond[k].shape[1:]).expand(b, *cond[k].shape[1:])
        for k, v in empty.items()
        if k in cond
    }
    return {**cond, **out}


def build_inversion_cache(
    inv_cache: InversionCache,
    dataset: CachedPairDataset,
    adapter: Any,
    denoiser: torch.nn.Module,
    spec: InversionSpec,
    *,
    resolution: int,
    flips: tuple[bool, ...],
    device: Any,
    autocast: Any = None,
    progress: bool = True,
) -> int:
    """Invert every (pair, winner/loser, flip) of ``dataset`` missing from ``inv_cache``; returns how many.

    Runs in the inverter's own dtype without autocast (unless ``autocast`` is given), so the cache holds the same
    numbers whether ``mmalign cache --inversion`` or ``mmalign train`` filled it.
    """
    import contextlib

    latent_cache = dataset.cache
    grid, _ = method_grid(spec, adapter)
    empty = latent_cache.text("") if spec.uncond == "empty_prompt" else None
    items: dict[str, Any] = {}  # one entry per distinct (latent, prompt): shared images are inverted once
    for rec, pk in zip(dataset.records, dataset.keys):
        for flip in flips:
            cached = latent_cache.pair(pk, flip=flip)
            for which in ("w", "l"):
                key = entry_key(cached[f"mean_{which}"], rec.prompt)
                if key not in items:
                    items[key] = partial(
                        _load_entry, latent_cache, adapter, pk, which, flip, rec.prompt, resolution
                    )
    items = list(items.items())
    if all(key in inv_cache for key, _ in items):
        return 0
    moved_from = next(denoiser.parameters()).device
    denoiser.to(device)

    def invert(x0, cond):
        cond = {k: v.to(device) for k, v in cond.items()}
        with autocast() if autocast is not None else contextlib.nullcontext():
            # module attribute lookup: tests count inverter calls by patching inversion.ddim_invert
            return inversion.ddim_invert(
                adapter,
                denoiser,
                x0.to(device),
                cond,
                timesteps=grid,
                guidance_scale=spec.inversion_guidance,
                uncond=make_uncond(spec, cond, empty),
                set_alpha_to_one=spec.set_alpha_to_one,
            )

    try:
        return inv_cache.build(items, invert, batch_size=spec.inversion_batch_size, progress=progress)
    finally:
        denoiser.to(moved_from)


class InversionPairDataset(torch.utils.data.Dataset):
    """Cached pairs plus the slices of their inverted trajectories one update needs.

    ``inverted_noise``: one grid step k per pair (``step``, 0-based) and ``xt_w``/``xt_l`` [C,H,W].
    ``trajectory``: K sorted steps (``steps`` [K]), the inverter inputs ``x_in_w``/``x_in_l`` [K,C,H,W] (the
    latent *before* each step; step 0 starts from the clean latent, flagged by ``from_clean``) and the
    reference eps ``ref_eps_w``/``ref_eps_l`` [K,C,H,W].
    """

    def __init__(
        self,
        base: CachedPairDataset,
        inv_cache: InversionCache,
        *,
        mode: str,
        num_steps: int,
        trajectory_steps: int,
        random_flip: bool,
        first_step: int = 0,
    ):
        self.base, self.inv, self.mode, self.first_step = base, inv_cache, mode, first_step
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
            step = int(torch.randint(self.first_step, self.num_steps, ()))
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


def inversion_pair_data(
    adapter: Any,
    accelerator: Any,
    data: DataConfig,
    spec: InversionSpec,
    *,
    resolution: int,
    cache_dir: Path,
    model_id: dict[str, Any],
    progress: bool = True,
) -> TrainData:
    """Pairs from the latent/text cache with their cached inversions (built here on first use).

    Without ``data.cache`` or with ``spec.cache_inversions=False`` the pairs come without inversions and
    the trainer inverts with the reference every step (the released code's cost). Other arguments as
    :func:`mmalign.data.setup.image_pair_data`.
    """
    d, res = data, resolution
    base = image_pair_data(
        adapter, accelerator, data, resolution=res, cache_dir=cache_dir, model_id=model_id, progress=progress
    )
    latent_cache = getattr(base.dataset, "cache", None)
    grid, alphas = method_grid(spec, adapter)
    prep = partial(
        prepare_inversion_batch,
        adapter=adapter,
        latent_cache=latent_cache,
        spec=spec,
        caption_dropout=d.caption_dropout,
        resolution=res,
        grid=grid,
        alphas=alphas,
    )
    if latent_cache is None or not spec.cache_inversions:
        return TrainData(
            base.dataset, base.collate, prep, {**base.counts, "inversions_built": 0}, base.skipped
        )

    denoiser = inverter_of(adapter)
    inv_cache = InversionCache(latent_cache.dir, inversion_fingerprint(spec, model_id, adapter, denoiser))
    flips = (False, True) if d.random_flip else (False,)
    built = 0
    if accelerator.is_main_process:
        built = build_inversion_cache(
            inv_cache,
            base.dataset,
            adapter,
            denoiser,
            spec,
            resolution=res,
            flips=flips,
            device=accelerator.device,
            progress=progress,
        )
    accelerator.wait_for_everyone()
    inv_cache.reload()
    dataset = InversionPairDataset(
        base.dataset,
        inv_cache,
        mode=spec.mode,
        num_steps=spec.num_inversion_steps,
        trajectory_steps=spec.trajectory_steps,
        random_flip=d.random_flip,
        first_step=1 if spec.skip_identity_step and len(grid) > 1 and int(grid[0]) == 0 else 0,
    )
    counts = {**base.counts, "inversions_built": built, "inversions_cached": len(inv_cache)}
    return TrainData(dataset, base.collate, prep, counts, base.skipped)


def prepare_inversion_batch(
    raw: dict,
    device: torch.device,
    *,
    adapter: Any,
    latent_cache: LatentCache | None,
    spec: InversionSpec,
    caption_dropout: float,
    resolution: int,
    grid: torch.Tensor,
    alphas: torch.Tensor,
) -> dict:
    """Raw batch -> posterior-mean latents, conditioning (caption-dropped for the DPO forwards, the real prompts
    for inversion/trajectory), the grid, and whatever cached inversion slices the batch carries."""
    prompts = list(raw["prompt"])
    dropped = drop_captions(prompts, caption_dropout)
    if latent_cache is None:
        cond = adapter.encode_prompts(dropped)
        inv_cond = adapter.encode_prompts(prompts)
        empty = adapter.encode_prompts([""]) if spec.uncond == "empty_prompt" else None
        mean_w, _ = adapter.latent_moments(raw["pixels_w"].to(device))
        mean_l, _ = adapter.latent_moments(raw["pixels_l"].to(device))
    else:

        def texts(ps):
            rows = [latent_cache.text(p) for p in ps]
            return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

        cond, inv_cond = texts(dropped), texts(prompts)
        empty = texts([""]) if spec.uncond == "empty_prompt" else None
        mean_w, mean_l = raw["mean_w"].to(device), raw["mean_l"].to(device)
    extra = adapter.extra_conditioning(raw, resolution)
    cond.update(extra)
    inv_cond.update(extra)
    cond = {k: v.to(device) for k, v in cond.items()}
    inv_cond = {k: v.to(device) for k, v in inv_cond.items()}
    batch = {
        "latents_w": adapter.latents_from_moments(mean_w, torch.zeros_like(mean_w)),
        "latents_l": adapter.latents_from_moments(mean_l, torch.zeros_like(mean_l)),
        "cond": cond,
        "inv_cond": inv_cond,
        "inv_uncond": make_uncond(spec, inv_cond, empty),
        "grid": grid,
        "alphas": alphas,
        "prompts": dropped,
        "item_id": raw.get("item_id", []),
    }
    for key in ("step", "xt_w", "xt_l", "steps", "from_clean", "x_in_w", "x_in_l", "ref_eps_w", "ref_eps_l"):
        if key in raw:
            batch[key] = raw[key].to(device)
    return batch
