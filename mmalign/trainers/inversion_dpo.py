"""Inversion-DPO trainer (Li et al. 2025, arXiv 2507.11554; code MIGHTYEZ/Inversion-DPO): config + compute_loss.

Diffusion-DPO's random forward noising is replaced by a deterministic DDIM inversion of each clean latent
with the frozen reference (:mod:`mmalign.pipelines.inversion`), cached once per (image, prompt, inverter,
grid, guidance) by :mod:`mmalign.data.inversion_pairs`; or, as InPO, by an online inversion with the current
model to a continuous t, with a small stochastic term (``inverter``, ``timestep_sampling``, ``inversion_eta``).
Two modes (docs/inversion_dpo.md):

- ``inverted_noise`` (default, InPO-style): sample a grid step k per pair, take the inverted ``x_{t_k}`` of
  winner and loser, form the implied noise and apply the Diffusion-DPO loss with it;
- ``trajectory`` (the released code): regress the policy's guided eps onto the reference's at K of the N
  points of each inverted trajectory (:func:`mmalign.losses.inversion_dpo.trajectory_dpo_loss`).

Latents are the VAE posterior *mean* (the trajectory belongs to one deterministic x0), not a posterior sample.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from mmalign.config import ConfigError, _f, check_fields, short
from mmalign.data.inversion_cache import DTYPES
from mmalign.losses.diffusion_dpo import LOSS_TYPES, diffusion_dpo_loss
from mmalign.losses.inversion_dpo import implied_noise, trajectory_dpo_loss, trajectory_weights
from mmalign.pipelines import inversion
from mmalign.pipelines.base import guided_output, x0_and_eps
from mmalign.trainers.common import TrainModels, noised_pairs, pair_errors, repeat_cond

MODES = ("inverted_noise", "trajectory")
UNCOND = ("zeros", "empty_prompt")
INVERTERS = ("reference", "policy")
TIMESTEP_SAMPLING = ("grid", "continuous", "continuous_exact")


@dataclass
class InversionDPOConfig:
    name: str = _f("inversion_dpo", "Method name.")
    mode: str = _f(
        "inverted_noise",
        "inverted_noise (InPO-style: Diffusion-DPO with the inversion's implied noise; non-zero gradient at init) | trajectory (the released code's loss; zero gradient while policy == reference).",
    )
    beta: float = _f(
        2000.0,
        "KL strength. inverted_noise: canonical Diffusion-DPO beta, z = -(beta/2)(delta_w - delta_l). trajectory: z = sign*(beta/2)(D_w - D_l)/N. Released launcher: 2000.",
        gt=0,
    )
    num_inversion_steps: int = _f(
        80, "N, steps of the DDIM inversion grid (released launcher: 80 -> t = 0, 12, ..., 948; InPO: 10)."
    )
    timestep_spacing: str = _f("leading", "Grid spacing as DDIMInverseScheduler: leading | trailing.")
    steps_offset: int = _f(0, "Grid offset (the released code's DDIMScheduler: 0).", ge=0, lt=1000)
    set_alpha_to_one: bool = _f(
        False, "Start level of the inversion: 1 (clean), or alphas_cumprod[0] as the released code (false)."
    )
    inversion_guidance: float = _f(
        2.0, "CFG scale of the inverter (and of the policy in trajectory mode). Released code: 2."
    )
    uncond: str = _f(
        "zeros",
        "Unconditional branch of the CFG: zeros (all-zero text embeddings, the released code) | empty_prompt.",
    )
    trajectory_steps: int = _f(
        8,
        "trajectory mode: K of the N grid steps subsampled per pair and update (N = the released code, one graph of 4N forwards).",
    )
    reference_eps: str = _f(
        "live",
        "trajectory mode: where eps_ref comes from. live: the reference re-run at the K points in the same batch as the policy (exactly equal to the policy at LoRA init, same precision); cached: the inverter's eps stored in the cache (no reference forward, twice the cache, differs from a live forward by float rounding).",
    )
    sign: int = _f(
        1,
        "trajectory mode: logit sign; +1 the released code (winner pushed off the reference trajectory), -1 the likelihood derivation.",
    )
    skip_identity_step: bool = _f(
        False,
        "inverted_noise mode: never sample grid step 0 when it sits at t = 0 (leading spacing): there x_t is the clean latent and the implied noise is numerically meaningless.",
    )
    standardize_noise: bool = _f(
        False,
        "inverted_noise mode: standardise the implied noise per sample and channel (zero mean, unit std over the spatial dims) before re-noising; the raw inverted noise has std 0.4-0.85 and a channel bias (issue 13).",
    )
    forward_mix: float = _f(
        0.0,
        "inverted_noise mode: fraction of pairs per batch noised forward (random noise and timestep, i.e. Diffusion-DPO) instead of by inversion.",
        ge=0,
        le=1,
    )
    inverter: str = _f(
        "reference",
        "inverted_noise mode: the network that inverts. reference: the frozen base (cacheable; the released code) | policy: the current trained model under no_grad, every step (InPO; needs cache_inversions=false).",
    )
    timestep_sampling: str = _f(
        "grid",
        "inverted_noise mode: grid: t is a grid step and x_t its inverted latent | continuous: t uniform in [0, T), x_t the latent inverted to the last grid point below t, used as x_t (InPO; needs cache_inversions=false) | continuous_exact: as continuous plus one last inverse step from that grid point to t itself, so x_t sits at t's noise level.",
    )
    inversion_eta: float = _f(
        0.0,
        "inverted_noise mode: InPO's stochastic term, eta x the DDPM posterior std added after each inversion step (InPO: 0.1; needs cache_inversions=false).",
        ge=0,
    )
    loss_type: str = _f("sigmoid", "inverted_noise mode: sigmoid | hinge | ipo (as diffusion_dpo).")
    sft_weight: float = _f(0.0, "inverted_noise mode: adds sft_weight x winner error.", ge=0)
    cache_inversions: bool = _f(
        True,
        "Invert every image once into the inversion cache (needs data.cache=true); false = invert with the reference every step.",
    )
    cache_dtype: str = _f(
        "float32", "Storage dtype of cached trajectories: float32 | float16 | bfloat16 (half the disk)."
    )
    inversion_batch_size: int = _f(8, "Images per batch of the one-off inversion pass.", ge=1, le=4096)

    def __post_init__(self) -> None:
        check_fields(self, "method")
        if self.mode not in MODES:
            raise ConfigError(f"method.mode={short(self.mode)}: choose from {MODES}")
        if self.beta <= 0:
            raise ConfigError(f"method.beta={self.beta} must be > 0 (released code: 2000)")
        if not 1 <= self.num_inversion_steps <= 1000:
            raise ConfigError(
                f"method.num_inversion_steps={self.num_inversion_steps} must be in [1, 1000] (paper: 80)"
            )
        if self.timestep_spacing not in ("leading", "trailing"):
            raise ConfigError(
                f"method.timestep_spacing={short(self.timestep_spacing)}: use leading or trailing"
            )
        if self.uncond not in UNCOND:
            raise ConfigError(f"method.uncond={short(self.uncond)}: choose from {UNCOND}")
        if not 1 <= self.trajectory_steps <= self.num_inversion_steps:
            raise ConfigError(
                f"method.trajectory_steps={self.trajectory_steps} must be in [1, method.num_inversion_steps={self.num_inversion_steps}]"
            )
        if self.reference_eps not in ("live", "cached"):
            raise ConfigError(f"method.reference_eps={short(self.reference_eps)}: use live or cached")
        if self.sign not in (1, -1):
            raise ConfigError(f"method.sign={self.sign}: use 1 (released code) or -1 (likelihood derivation)")
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"method.loss_type={short(self.loss_type)}: choose from {LOSS_TYPES}")
        if self.cache_dtype not in DTYPES:
            raise ConfigError(f"method.cache_dtype={short(self.cache_dtype)}: choose from {tuple(DTYPES)}")
        if self.inversion_batch_size < 1:
            raise ConfigError("method.inversion_batch_size must be >= 1")
        if self.inverter not in INVERTERS:
            raise ConfigError(f"method.inverter={short(self.inverter)}: choose from {INVERTERS}")
        if self.timestep_sampling not in TIMESTEP_SAMPLING:
            raise ConfigError(
                f"method.timestep_sampling={short(self.timestep_sampling)}: choose from {TIMESTEP_SAMPLING}"
            )
        online = {
            "method.inverter=policy": self.inverter == "policy",
            f"method.timestep_sampling={self.timestep_sampling}": self.timestep_sampling != "grid",
            f"method.inversion_eta={self.inversion_eta}": self.inversion_eta > 0,
        }
        online = [k for k, on in online.items() if on]
        if self.mode == "trajectory" and (
            self.standardize_noise or self.forward_mix or self.skip_identity_step or online
        ):
            raise ConfigError(
                "method.standardize_noise, method.forward_mix, method.skip_identity_step, method.inverter, "
                "method.timestep_sampling and method.inversion_eta apply to mode=inverted_noise"
            )
        if online and self.cache_inversions:
            raise ConfigError(
                f"{', '.join(online)} inverts every step (InPO), nothing is cacheable: set method.cache_inversions=false"
            )


# --------------------------------------------------------------------------------------------------
# the loss


def compute_loss(
    batch: dict, models: TrainModels, cfg: InversionDPOConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One Inversion-DPO step on a batch of :func:`mmalign.data.inversion_pairs.prepare_inversion_batch`.

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


@contextlib.contextmanager
def _inverter(models: TrainModels, cfg: InversionDPOConfig):
    """The network that inverts, under no_grad: the reference, or the current model (``inverter=policy``)."""
    if cfg.inverter == "reference":
        with models.reference() as ref:
            yield ref
        return
    with torch.no_grad():
        yield models.denoiser


def _inversion_conds(batch: dict) -> tuple[dict, dict | None]:
    """The inverter's conditioning and unconditional branch, for winners then losers [2B]."""
    uncond = batch["inv_uncond"]
    return repeat_cond(batch["inv_cond"]), None if uncond is None else repeat_cond(uncond)


def _invert_now(batch: dict, models: TrainModels, cfg: InversionDPOConfig, num_steps: int):
    """Online inversion of winners then losers (no cache) with the reference or, for
    ``inverter=policy``, the current model: [2B] trajectories."""
    x0 = torch.cat([batch["latents_w"], batch["latents_l"]])
    cond, uncond = _inversion_conds(batch)
    with _inverter(models, cfg) as net:
        return inversion.ddim_invert(
            models.adapter,
            net,
            x0,
            cond,
            timesteps=batch["grid"],
            guidance_scale=cfg.inversion_guidance,
            uncond=uncond,
            set_alpha_to_one=cfg.set_alpha_to_one,
            num_steps=num_steps,
            eta=cfg.inversion_eta,
        )


def _inverted_noise_loss(batch, models, cfg):
    x_w, x_l = batch["latents_w"], batch["latents_l"]
    b, device = x_w.shape[0], x_w.device
    x0 = torch.cat([x_w, x_l])
    if cfg.timestep_sampling != "grid":
        t, xt = _continuous_inversion(batch, models, cfg)
        abar = models.adapter.scheduler.alphas_cumprod.to(device).float()[t.long()]
    else:
        if "xt_w" in batch:
            step, xt = batch["step"].long(), torch.cat([batch["xt_w"], batch["xt_l"]])
        else:
            low = first_step(batch["grid"], cfg.skip_identity_step)
            step = torch.randint(low, len(batch["grid"]), (b,), device=device)
            inv = _invert_now(batch, models, cfg, int(step.max()) + 1)
            xt = inv.latents[torch.arange(2 * b), step.repeat(2).cpu()].to(device)
        step = step.to(device)
        t = batch["grid"].to(device)[step]
        abar = batch["alphas"].to(device)[step + 1]
    noise = implied_noise(xt, x0, abar.repeat(2))
    if cfg.standardize_noise:
        noise = standardize(noise)
    if cfg.forward_mix > 0:  # these pairs are Diffusion-DPO pairs: fresh noise shared by winner and loser
        forward = torch.rand(b, device=device) < cfg.forward_mix
        fresh = torch.randn(x_w.shape, device=device, dtype=noise.dtype).repeat(2, *[1] * (x_w.ndim - 1))
        noise = torch.where(forward.repeat(2).view(-1, *[1] * (noise.ndim - 1)), fresh, noise)
        t = torch.where(forward, models.adapter.sample_timesteps(b, None, device).to(t.dtype), t)
    pairs = noised_pairs(models.adapter, x_w, x_l, noise=noise, t=t)
    m_w, m_l, r_w, r_l = pair_errors(
        models, pairs["xt"], pairs["t"], repeat_cond(batch["cond"]), pairs["target"]
    )
    loss, metrics = diffusion_dpo_loss(
        m_w, m_l, r_w, r_l, beta=cfg.beta, loss_type=cfg.loss_type, sft_weight=cfg.sft_weight
    )
    metrics["inversion_t"] = t.float().mean()
    return loss.mean(), metrics


def _continuous_inversion(
    batch: dict, models: TrainModels, cfg: InversionDPOConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """InPO's noising: t ~ U{0, ..., T-1} per pair; each image inverted through the grid points below t.

    Returns ``t`` [B] and ``x_t`` [2B, ...] (winners then losers): the latent at the last grid point below
    ``t``, which the loss then labels ``t`` (as InPO does); the clean latent when no grid point is below ``t``.
    ``continuous_exact`` then takes one more inverse step, from that point's level to ``t``'s.
    """
    x0 = torch.cat([batch["latents_w"], batch["latents_l"]])
    b, device, grid = batch["latents_w"].shape[0], x0.device, batch["grid"]
    t = torch.randint(0, models.adapter.scheduler.config.num_train_timesteps, (b,), device=device)
    below = (grid.to(device)[None] < t[:, None]).sum(1).repeat(2)  # [2B] inversion steps to run
    xt = x0.float()
    if int(below.max()) > 0:
        inv = _invert_now(batch, models, cfg, int(below.max()))
        path = torch.cat([x0[:, None].float(), inv.latents.to(device)], 1)  # [2B, 1 + S, ...]: x_0 .. x_S
        xt = path[torch.arange(2 * b, device=device), below]
    if cfg.timestep_sampling == "continuous_exact":
        t2, levels = t.repeat(2), batch["alphas"].to(device)[below]
        abar_t = models.adapter.scheduler.alphas_cumprod.to(device).float()[t2]
        with _inverter(models, cfg) as net:
            xt, _ = inversion.inverse_step(
                models.adapter, net, xt, t2, levels, abar_t, *_inversion_conds(batch), cfg.inversion_guidance
            )
    return t, xt


def first_step(grid: torch.Tensor, skip_identity: bool) -> int:
    """The lowest grid step to sample: 1 when skipping an identity step at ``t = 0``, else 0."""
    return 1 if skip_identity and len(grid) > 1 and int(grid[0]) == 0 else 0


def standardize(noise: torch.Tensor) -> torch.Tensor:
    """Per sample and channel: zero mean and unit std over the remaining (spatial/temporal) dims."""
    dims = tuple(range(2, noise.ndim))
    mean = noise.mean(dim=dims, keepdim=True)
    std = noise.std(dim=dims, keepdim=True).clamp_min(1e-6)
    return (noise - mean) / std


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
        ref_eps = (
            torch.cat([batch["ref_eps_w"], batch["ref_eps_l"]]).float() if "ref_eps_w" in batch else None
        )
    else:
        steps = torch.stack([torch.randperm(n)[: cfg.trajectory_steps].sort().values for _ in range(b)]).to(
            device
        )
        inv = _invert_now(batch, models, cfg, int(steps.max()) + 1)
        traj = torch.cat([x0[:, None].float().cpu(), inv.latents.cpu()], 1).to(
            device
        )  # [2B, 1+S, ...]: x_0 .. x_S
        idx = steps.repeat(2, 1)
        rows = torch.arange(2 * b, device=device)[:, None]
        x_in, ref_eps = traj[rows, idx], inv.eps.to(device)[rows, idx]
    k = steps.shape[1]
    steps2 = steps.repeat(2, 1).to(device)  # [2B, K]
    grid, alphas = batch["grid"].to(device), batch["alphas"].to(device)
    flat_x = x_in.flatten(0, 1)  # [2B*K, ...]
    flat_t = grid[steps2].flatten()
    cond = {
        key: v.repeat(2, *[1] * (v.ndim - 1)).repeat_interleave(k, 0) for key, v in batch["inv_cond"].items()
    }
    uncond = batch["inv_uncond"]
    if uncond is not None:
        uncond = {key: v.repeat(2, *[1] * (v.ndim - 1)).repeat_interleave(k, 0) for key, v in uncond.items()}
    kind, abar_in = adapter.scheduler.config.prediction_type, alphas[steps2].flatten()
    out = guided_output(
        adapter, models.denoiser, flat_x, flat_t, cond, uncond, cfg.inversion_guidance
    ).float()
    model_eps = x0_and_eps(out, flat_x.float(), abar_in, kind)[1].reshape(2 * b, k, *x0.shape[1:])
    if (
        cfg.reference_eps == "live" or ref_eps is None
    ):  # same inputs, same batch: bitwise equal to the policy at init
        with models.reference() as ref:
            ref_out = guided_output(
                adapter, ref, flat_x, flat_t, cond, uncond, cfg.inversion_guidance
            ).float()
        ref_eps = x0_and_eps(ref_out, flat_x.float(), abar_in, kind)[1].reshape(2 * b, k, *x0.shape[1:])
    m_w, m_l = model_eps.chunk(2)
    r_w, r_l = ref_eps.chunk(2)
    weights = trajectory_weights(alphas[steps + 1])
    loss, metrics = trajectory_dpo_loss(
        m_w, m_l, r_w, r_l, weights, beta=cfg.beta, num_grid_steps=n, sign=cfg.sign
    )
    return loss.mean(), metrics
