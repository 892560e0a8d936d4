"""Self-NPO trainer (Wang et al. 2025, arXiv 2505.11777; code G-U-N/Diffusion-NPO ``Self-NPO/``): config +
compute_loss. A data-free negative model for NPO guidance (:mod:`mmalign.pipelines.npo`).

One step (DESIGN §3):

1. Start: ``start=noise`` (paper) draws x_T ~ N(0, I) and an end level t from the DDIM grid, then takes
   ``teacher_steps`` (K <= 5) DDIM steps on an evenly spaced sub-grid from T to t. ``start=real`` (released
   code) noises a real latent to a random level of the ``grid_steps``-step DDIM grid (39, 79, ..., 999 for
   25 steps) and takes K steps down that grid (clamping at t = 0).
2. The EMA teacher runs those steps with guidance ``pred = cond + w (cond - uncond)``: w = -1 is the
   unconditional prediction (SD1.5 code), w = -5 anti-guidance (SDXL code, zero null embedding). Target =
   the teacher's x0 estimate at the final x_t.
3. x_t is re-noised to s ~ U{t+1, ..., T-1} (:func:`mmalign.losses.self_npo.renoise`); the student predicts
   from ``(x_s, s, prompt)``, its output is converted to x0 (any prediction type), and the pseudo-Huber
   loss (c = 1e-3) pulls it to the target.

The EMA teacher is this method's run state (``Method.state`` -> :func:`make_state`): a shadow copy of the
*trainable* parameters only (the LoRA weights under LoRA, the whole UNet under full fine-tuning),
initialised from the student and moved toward it by the loop after every optimizer step, as in the released
code (decay 0.999; with gradient accumulation, once per optimizer step, not per micro-batch). The loop
checkpoints it, so a resumed run continues with the same teacher. The teacher pass swaps the shadow values
into the network under ``no_grad`` and swaps them back, so under LoRA it costs a few MB and no second UNet;
it serves LoRA and full fine-tuning alike. It averages each trainable tensor on its own, so under LoRA the
teacher's update is EMA(B) EMA(A), not EMA(BA). It assumes the trainable parameters are whole on each
process (DDP, not FSDP/ZeRO-3).
``ema_decay=1`` uses the frozen reference (adapters disabled / frozen copy) as a fixed teacher instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from mmalign.config import ConfigError, _f, check_fields, short
from mmalign.losses.self_npo import renoise, self_npo_loss
from mmalign.pipelines.base import guided_output, x0_and_eps
from mmalign.trainers.common import TrainModels
from mmalign.trainers.sharding import is_sharded

STARTS = ("noise", "real")
NULL_CONDITIONS = ("empty", "zeros")


@dataclass
class SelfNPOConfig:
    name: str = _f("self_npo", "Method name.")
    start: str = _f(
        "noise",
        "noise: roll out from x_T (paper, needs prompts only) | real: from a noised real latent (released code; data needs an image column).",
    )
    teacher_steps: int = _f(
        5, "K: DDIM steps the teacher takes before the target is read (paper and code: 5)."
    )
    grid_steps: int = _f(
        25,
        "DDIM grid size (code: 25 -> timesteps 39, 79, ..., 999). start=real walks down this grid; start=noise draws t from it.",
        le=1000,
    )
    teacher_guidance: float = _f(
        -1.0,
        "w in cond + w (cond - uncond): -1 = unconditional (SD1.5 code), -5 = anti-guided (SDXL code), 0 = conditional.",
    )
    null_condition: str = _f(
        "empty",
        "The teacher's unconditional input: empty (embedding of '') | zeros (zero embeddings, SDXL code).",
    )
    ema_decay: float = _f(
        0.999,
        "EMA decay of the teacher toward the student per step (code: 0.999); 1.0 = fixed teacher = the reference.",
    )
    huber_c: float = _f(1e-3, "pseudo-Huber c of the x0-space loss (code: 1e-3).")

    def __post_init__(self) -> None:
        check_fields(self, "method")
        if self.start not in STARTS:
            raise ConfigError(f"method.start={short(self.start)}: choose from {STARTS}")
        if self.null_condition not in NULL_CONDITIONS:
            raise ConfigError(
                f"method.null_condition={short(self.null_condition)}: choose from {NULL_CONDITIONS}"
            )
        if self.grid_steps < 2:
            raise ConfigError(f"method.grid_steps={self.grid_steps} must be >= 2 (code: 25)")
        if not 1 <= self.teacher_steps < self.grid_steps:
            raise ConfigError(
                f"method.teacher_steps={self.teacher_steps} must be in [1, grid_steps - 1]; Self-NPO uses <= 5"
            )
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ConfigError(
                f"method.ema_decay={self.ema_decay} must be in [0, 1] (code: 0.999; 1 = fixed reference teacher)"
            )
        if self.huber_c <= 0:
            raise ConfigError(f"method.huber_c={self.huber_c} must be > 0 (code: 1e-3)")


# --------------------------------------------------------------------------------------------------
# the EMA teacher


class EMATeacher:
    """Shadow copy of a network's trainable parameters, swapped in for teacher passes.

    The loop calls :meth:`after_optimizer_step` once per optimizer step (the released update rule,
    ``shadow <- decay * shadow + (1 - decay) * student``); computing a loss never moves it.
    """

    def __init__(self, net: torch.nn.Module, decay: float = 0.999):
        self.decay = decay
        named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        if is_sharded(self.params):
            # FSDP2 gathers each block from its own flat shard storage, not from p.data: a swapped-in teacher
            # would silently be the student
            raise ConfigError(
                "method self_npo under FSDP: the EMA teacher swaps weights into the network, which sharded "
                "parameters do not allow; launch with configs/accelerate/ddp_multi_gpu.yaml (or one process)"
            )
        # fp32 even for bf16 weights (train.trainable_dtype=bf16): a 1 - decay = 0.001 step vanishes in bf16
        self.shadow = [p.detach().to(torch.float32, copy=True) for p in self.params]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shadow weights by parameter name: plain tensors, which the loop saves as safetensors (no pickle)."""
        return {n: s.detach().cpu() for n, s in zip(self.names, self.shadow)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing, extra = sorted(set(self.names) - set(state)), sorted(set(state) - set(self.names))
        if missing or extra:
            raise ValueError(
                f"EMA teacher state does not match the model: {len(missing)} weights missing "
                f"(e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]})"
            )
        for name, s in zip(self.names, self.shadow):
            if state[name].shape != s.shape:
                raise ValueError(
                    f"EMA teacher state: {name} has shape {tuple(state[name].shape)}, the model {tuple(s.shape)}"
                )
            s.copy_(state[name])

    @torch.no_grad()
    def update(self, decay: float) -> None:
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach().to(s.dtype), 1.0 - decay)

    def after_optimizer_step(self) -> None:
        self.update(self.decay)

    @contextlib.contextmanager
    def swapped_in(self, net: torch.nn.Module) -> Iterator[torch.nn.Module]:
        saved = [p.data for p in self.params]
        try:
            with torch.no_grad():
                for p, s in zip(self.params, self.shadow):
                    p.data = s.to(p.dtype)  # the shadow itself when the weights are fp32
                yield net
        finally:
            for p, d in zip(self.params, saved):
                p.data = d


def make_state(models: TrainModels, cfg: SelfNPOConfig) -> EMATeacher | None:
    """The run state the loop keeps and checkpoints: the EMA teacher (None for a fixed reference teacher)."""
    return None if cfg.ema_decay >= 1.0 else EMATeacher(models.unwrap(models.denoiser), cfg.ema_decay)


def teacher(models: TrainModels, ema_decay: float) -> contextlib.AbstractContextManager[torch.nn.Module]:
    """``with teacher(models, decay) as net:`` — the EMA teacher swapped into the network.

    Outside the loop (``models.state`` unset) a teacher is created on first use and kept on ``models``; whoever
    steps the optimizer calls ``models.state.after_optimizer_step()`` (the loop does).
    """
    if ema_decay >= 1.0:
        return models.reference()
    net = models.unwrap(models.denoiser)
    if models.state is None:
        models.state = EMATeacher(net, ema_decay)
    return models.state.swapped_in(net)


# --------------------------------------------------------------------------------------------------
# schedule maths


def ddim_grid(num_train_timesteps: int, grid_steps: int) -> torch.Tensor:
    """The released code's DDIM grid: (1..N) * (T // N) - 1, e.g. 39, 79, ..., 999 for T=1000, N=25."""
    return torch.arange(1, grid_steps + 1) * (num_train_timesteps // grid_steps) - 1


def rollout_timesteps(
    start: str, grid: torch.Tensor, k: int, n: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Per-sample teacher timesteps [K+1, n]: row 0 is the start level, row K the level of the target.

    ``noise``: from grid[-1] (x_T) to t = grid[j], j ~ U{0..N-2}, on K evenly spaced (rounded) levels.
    ``real``: start = grid[i], i ~ U{0..N-1}, then grid[i-1], ..., grid[i-K], with 0 below the grid (code).
    """
    steps = torch.arange(k + 1).unsqueeze(1)
    if start == "noise":
        top = grid[-1].item()
        end = grid[torch.randint(0, len(grid) - 1, (n,), generator=generator)]
        return (top + (end - top).unsqueeze(0) * steps / k).round().long()
    idx = torch.randint(0, len(grid), (n,), generator=generator).unsqueeze(0) - steps
    return torch.where(idx >= 0, grid[idx.clamp_min(0)], torch.zeros_like(idx))


def null_conditioning(uncond: dict[str, torch.Tensor], mode: str) -> dict[str, torch.Tensor]:
    """``empty``: the embeddings of "" as given; ``zeros``: text embeddings zeroed (SDXL code), time ids kept."""
    if mode == "empty":
        return uncond
    return {k: (v if k == "time_ids" else torch.zeros_like(v)) for k, v in uncond.items()}


# --------------------------------------------------------------------------------------------------
# the step


def compute_loss(
    batch: dict, models: TrainModels, cfg: SelfNPOConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One Self-NPO step on a prompt batch.

    Args:
        batch: ``cond``/``uncond`` dicts of [B,...] conditioning, ``latent_shape`` (C, h, w) and, for
            ``start=real``, ``latents`` [B,C,h,w] (from :func:`mmalign.data.prompts.prompt_data`).
        models: adapter, trained denoiser (the student), reference access.
        cfg: the method config.
    """
    adapter = models.adapter
    cond = batch["cond"]
    uncond = null_conditioning(batch["uncond"], cfg.null_condition)
    device = cond["encoder_hidden_states"].device
    n = cond["encoder_hidden_states"].shape[0]
    sched = adapter.scheduler
    kind = sched.config.prediction_type
    num_t = sched.config.num_train_timesteps
    abar = sched.alphas_cumprod.to(device=device, dtype=torch.float32)
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    g = 1.0 + cfg.teacher_guidance  # c + w (c - u) = u + (1 + w)(c - u)

    path = rollout_timesteps(cfg.start, ddim_grid(num_t, cfg.grid_steps), cfg.teacher_steps, n).to(device)
    if cfg.start == "noise":
        x = torch.randn(n, *batch["latent_shape"], device=device)
    else:
        if "latents" not in batch:
            raise ValueError(
                "method.start=real needs real latents: give data.source a manifest with an image column"
            )
        x0_real = batch["latents"].float()
        x = adapter.add_noise(x0_real, torch.randn_like(x0_real), path[0]).float()

    with teacher(models, cfg.ema_decay) as net, torch.no_grad():
        for k in range(cfg.teacher_steps):
            t, t_next = path[k], path[k + 1]
            pred = guided_output(adapter, net, x, t, cond, uncond, g).float()
            x0, eps = x0_and_eps(pred, x, abar[t], kind)
            x = (
                alpha[t_next].reshape(-1, *([1] * (x.ndim - 1))) * x0
                + sigma[t_next].reshape(-1, *([1] * (x.ndim - 1))) * eps
            )
        t = path[-1]
        pred = guided_output(adapter, net, x, t, cond, uncond, g).float()
        target, _ = x0_and_eps(pred, x, abar[t], kind)

    # s ~ U{t+1, ..., T-1}, as the code's t + randint(1, T-1 - t + 1)
    s = t + 1 + (torch.rand(n, device=device) * (num_t - 1 - t)).long()
    x_s = renoise(x, alpha[t], sigma[t], alpha[s], sigma[s], torch.randn_like(x))
    pred_s = adapter.predict(models.denoiser, x_s, s, cond)
    x0_student, _ = x0_and_eps(pred_s.float(), x_s.float(), abar[s], kind)
    loss, metrics = self_npo_loss(x0_student, target, huber_c=cfg.huber_c)
    metrics.update(t_mean=t.float().mean(), s_mean=s.float().mean())
    return loss.mean(), metrics
