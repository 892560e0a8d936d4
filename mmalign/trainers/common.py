"""What every pair-preference trainer shares: the model bundle, shared-noise pairs, policy/reference errors."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from mmalign.pipelines import PipelineAdapter, per_sample_mse


@dataclass
class TrainModels:
    """The adapter, the trained denoiser and how to reach the reference.

    LoRA: the reference is the same network with adapters disabled (no second copy). Full fine-tuning:
    ``reference_denoiser`` is a frozen copy in the compute dtype.
    """

    adapter: PipelineAdapter
    denoiser: torch.nn.Module  # possibly wrapped by accelerate (DDP/FSDP)
    reference_denoiser: torch.nn.Module | None = None
    unwrap: Any = lambda m: m
    state: Any = None  # the method's per-run state (Method.state), checkpointed by the loop

    @contextlib.contextmanager
    def reference(self) -> Iterator[torch.nn.Module]:
        """``with models.reference() as ref:`` — a no-grad network computing the reference prediction."""
        with torch.no_grad():
            if self.reference_denoiser is not None:
                yield self.reference_denoiser
                return
            net = self.unwrap(self.denoiser)
            if not getattr(net, "_hf_peft_config_loaded", False):
                raise RuntimeError(
                    "no reference: full fine-tuning keeps a frozen copy only for methods whose "
                    "Method.needs_reference(cfg) is true"
                )
            net.disable_adapters()
            try:
                yield net
            finally:
                net.enable_adapters()


def repeat_cond(cond: dict[str, torch.Tensor], times: int = 2) -> dict[str, torch.Tensor]:
    return {k: torch.cat([v] * times) for k, v in cond.items()}


def noised_pairs(
    adapter: PipelineAdapter,
    x_w: torch.Tensor,
    x_l: torch.Tensor,
    *,
    independent_noise: bool = False,
    noise: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Winner and loser stacked on the batch dim, sharing one timestep and (by default) one noise draw.

    Returns ``x0, noise, t, xt, target``, each [2B, ...] with winners first. ``noise`` may be given (e.g. the
    implied noise of a DDIM inversion), already [2B, ...].
    """
    b = x_w.shape[0]
    x0 = torch.cat([x_w, x_l])
    if noise is None:
        # randn(shape), not randn_like: the latter follows the input's memory format, so the same seed
        # would give different noise for channels-last and contiguous latents.
        first = torch.randn(x_w.shape, device=x_w.device, dtype=x_w.dtype)
        second = torch.randn(x_l.shape, device=x_l.device, dtype=x_l.dtype) if independent_noise else first
        noise = torch.cat([first, second])
    if t is None:
        t = adapter.sample_timesteps(b, None, x0.device)
    t = t.repeat(2) if t.shape[0] == b else t
    return {
        "x0": x0,
        "noise": noise,
        "t": t,
        "xt": adapter.add_noise(x0, noise, t),
        "target": adapter.target(x0, noise, t),
    }


def pair_errors(
    models: TrainModels,
    xt: torch.Tensor,
    t: torch.Tensor,
    cond: dict[str, torch.Tensor],
    target: torch.Tensor,
    *,
    error: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = per_sample_mse,
) -> tuple[torch.Tensor, ...]:
    """Policy and reference errors on a stacked [2B] batch -> (m_w, m_l, r_w, r_l).

    Each is [B] with ``error=per_sample_mse`` (the default) and [B,T] per latent frame with ``per_frame_mse``.
    """
    adapter = models.adapter
    model_err = error(adapter.predict(models.denoiser, xt, t, cond), target)
    with models.reference() as ref:
        ref_err = error(adapter.predict(ref, xt, t, cond), target)
    m_w, m_l = model_err.chunk(2)
    r_w, r_l = ref_err.chunk(2)
    return m_w, m_l, r_w, r_l
