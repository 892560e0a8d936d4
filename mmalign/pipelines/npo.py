"""NPO guidance: classifier-free guidance whose unconditional branch runs a *negative* model (Diffusion-NPO,
Wang et al., ICLR 2025, arXiv 2505.11245; Self-NPO, arXiv 2505.11777).

    eps = eps_neg(x_t, c') + w (eps_pos(x_t, c) - eps_neg(x_t, c'))

with negative weights ``theta_neg = base + alpha (theta_pos - base) + beta delta`` (delta = the NPO offset,
i.e. the negative LoRA or ``negative - base``). ``alpha = beta = 1`` is the released scripts' setting
(``theta_neg = theta_pos + delta``, their ``--merge_weight 0``); ``alpha = 0, beta = 1`` uses ``base + delta``.

:class:`NPOGuidedDenoiser` replaces ``pipe.unet``: diffusers' pipelines batch CFG as ``[uncond; cond]``
and call the denoiser once per step on the *scheduler-scaled* input, so the wrapper runs the first half with
the negative weights and the second with the positive ones and returns them concatenated; the pipeline's
own guidance formula, scheduler and callbacks stay untouched. Because it sits where the UNet sits it sees
exactly the input the UNet would (``scheduler.scale_model_input`` applied), unlike the released
double-UNet pipeline, which feeds raw latents to the negative UNet and is wrong for Euler/EDM schedulers.

The negative weights come as

- a LoRA (``pytorch_lora_weights.safetensors`` from ``mmalign train``): loaded as a second adapter on the
  same UNet; the negative half runs with adapter weights ``alpha`` on the positive adapters and ``beta``
  on the negative one (LoRA offsets are linear in weight space, so this is the formula above exactly);
- separate weights (a diffusers UNet directory, e.g. a Self-NPO full fine-tune's ``final/unet``, or a
  module): merged once into a copy, ``base + alpha (pos - base) + beta (neg - base)``.

Usage::

    enable_npo_guidance(pipe, "outputs/self-npo/final", alpha=1.0, beta=1.0)
    images = pipe(prompt, guidance_scale=7.5).images         # NPO-guided
    disable_npo_guidance(pipe)                              # plain CFG again
    npo_pipe = npo_guided_pipeline(pipe, path)              # or: a second pipeline sharing the weights (eval on/off)
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

NEGATIVE_ADAPTER = "npo_negative"
LORA_FILE = "pytorch_lora_weights.safetensors"


def _split(value: Any, n: int, half: int) -> Any:
    """Half ``half`` (0 = uncond, 1 = cond) of every tensor whose batch dim is ``n``; other values as they are."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == n:
        return value.chunk(2)[half]
    if isinstance(value, dict):
        return {k: _split(v, n, half) for k, v in value.items()}
    return value


class NPOGuidedDenoiser(torch.nn.Module):
    """A denoiser that evaluates the CFG batch's unconditional half with the negative weights.

    Args:
        positive: the pipeline's denoiser (a UNet2DConditionModel, possibly carrying LoRA adapters).
        negative: separate negative weights (same architecture), or None for the adapter mode.
        positive_adapters: adapter name -> weight that make ``positive`` the positive model (adapter mode;
            empty = adapters off).
        negative_adapters: adapter name -> weight that make ``positive`` the negative model (adapter mode).
        is_cfg_batch: returns whether the current call carries a ``[uncond; cond]`` batch (a pipeline's
            ``do_classifier_free_guidance``); when it is false every sample runs the positive model.
    """

    def __init__(
        self,
        positive: torch.nn.Module,
        negative: torch.nn.Module | None = None,
        *,
        positive_adapters: dict[str, float] | None = None,
        negative_adapters: dict[str, float] | None = None,
        is_cfg_batch: Callable[[], bool] = lambda: True,
    ):
        super().__init__()
        if negative is None and not negative_adapters:
            raise ValueError("NPOGuidedDenoiser needs separate negative weights or negative_adapters")
        self.positive = positive
        self.negative = negative
        self.positive_adapters = dict(positive_adapters or {})
        self.negative_adapters = dict(negative_adapters or {})
        self.is_cfg_batch = is_cfg_batch

    # ---- look like the wrapped denoiser to the pipeline (config, dtype, device, add_embedding ...)
    @property
    def config(self):
        return self.positive.config

    @property
    def dtype(self) -> torch.dtype:
        return self.positive.dtype

    @property
    def device(self) -> torch.device:
        return self.positive.device

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("positive"), name)

    # ---- adapter switching
    def _use(self, adapters: dict[str, float]) -> None:
        if not adapters:
            self.positive.disable_adapters()
            return
        self.positive.enable_adapters()
        self.positive.set_adapters(list(adapters), list(adapters.values()))

    def use_positive(self) -> None:
        """Leave the shared network as the positive model (what callers outside the wrapper see)."""
        if self.negative is None:
            self._use(self.positive_adapters)

    def _run(
        self, net: torch.nn.Module, adapters: dict[str, float] | None, args: tuple, kwargs: dict
    ) -> torch.Tensor:
        if adapters is not None:
            self._use(adapters)
        return net(*args, **{**kwargs, "return_dict": False})[0]

    def forward(
        self, sample: torch.Tensor, timestep: Any, *args: Any, return_dict: bool = True, **kwargs: Any
    ):
        pos_adapters = self.positive_adapters if self.negative is None else None
        neg_adapters = self.negative_adapters if self.negative is None else None
        negative = self.negative if self.negative is not None else self.positive
        try:
            if not self.is_cfg_batch():
                out = self._run(self.positive, pos_adapters, (sample, timestep, *args), kwargs)
            else:
                n = sample.shape[0]
                if n % 2:
                    raise ValueError(f"NPO guidance expects a [uncond; cond] batch of even size, got {n}")
                halves = [
                    ([_split(a, n, h) for a in (sample, timestep, *args)], _split(kwargs, n, h))
                    for h in (0, 1)
                ]
                out_neg = self._run(negative, neg_adapters, tuple(halves[0][0]), halves[0][1])
                out_pos = self._run(self.positive, pos_adapters, tuple(halves[1][0]), halves[1][1])
                out = torch.cat([out_neg, out_pos])
        finally:
            self.use_positive()
        if not return_dict:
            return (out,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=out)


# --------------------------------------------------------------------------------------------------
# weights


def _lora_file(path: Path) -> Path | None:
    if path.is_file() and path.suffix == ".safetensors":
        return path
    if (path / LORA_FILE).is_file():
        return path / LORA_FILE
    return None


def _unet_dir(path: Path) -> Path | None:
    for cand in (path, path / "unet"):
        if (cand / "config.json").is_file():
            return cand
    return None


def merge_negative(
    base: torch.nn.Module, positive: torch.nn.Module, negative: torch.nn.Module, *, alpha: float, beta: float
) -> torch.nn.Module:
    """A copy of ``negative`` with weights ``base + alpha (positive - base) + beta (negative - base)``."""
    if alpha == 0 and beta == 1:
        return negative
    out = copy.deepcopy(negative)
    b, p, g = base.state_dict(), positive.state_dict(), negative.state_dict()
    if set(b) != set(g) or set(p) != set(g):
        raise ValueError(
            "separate negative weights must have the architecture of the positive and base denoisers "
            "(a positive LoRA must be fused and unloaded first: pipe.fuse_lora(); pipe.unload_lora_weights())"
        )
    with torch.no_grad():
        merged = {
            k: (
                b[k].float() + alpha * (p[k].float() - b[k].float()) + beta * (g[k].float() - b[k].float())
            ).to(g[k].dtype)
            if g[k].is_floating_point()
            else g[k]
            for k in g
        }
    out.load_state_dict(merged)
    return out


def _load_unet(source: str | Path | torch.nn.Module, like: torch.nn.Module) -> torch.nn.Module:
    if isinstance(source, torch.nn.Module):
        return source
    unet_dir = _unet_dir(Path(source))
    if unet_dir is None:
        raise FileNotFoundError(f"{source}: not a diffusers UNet directory (no config.json here or in unet/)")
    return type(like).from_pretrained(unet_dir).to(like.device, like.dtype).eval()


def enable_npo_guidance(
    pipe: Any,
    negative: str | Path | torch.nn.Module,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    positive_adapters: dict[str, float] | None = None,
    base: str | Path | torch.nn.Module | None = None,
) -> NPOGuidedDenoiser:
    """Route the unconditional half of ``pipe``'s CFG batch through the negative model. Returns the wrapper.

    Args:
        pipe: a diffusers pipeline with ``unet`` and ``do_classifier_free_guidance`` (SD1.x/2.x, SDXL, ...).
        negative: a negative LoRA (directory with ``pytorch_lora_weights.safetensors`` or the file), a diffusers
            UNet directory (or one with ``unet/``), or a UNet module.
        alpha: weight of the positive offset (theta_pos - base) in the negative model.
        beta: weight of the NPO offset delta. 1 and 1 = the released setting theta_pos + delta.
        positive_adapters: adapter -> weight defining the positive model; default: the adapters active now,
            each at weight 1.
        base: separate-weights mode only: the weights the negative was trained from (default: the pipeline's
            UNet, i.e. the positive model is the base).

    Raises:
        ValueError: ``beta == 0`` (the negative weights would be ignored), NPO guidance already on, or a
            pipeline without a CFG batch flag.
    """
    if beta == 0:
        raise ValueError(
            f"npo beta=0 ignores the negative weights {negative} (negative = base + alpha (positive - base)); "
            "use beta=1 (the released setting) or turn NPO guidance off"
        )
    if isinstance(getattr(pipe, "unet", None), NPOGuidedDenoiser):
        raise ValueError(
            "NPO guidance is already enabled on this pipeline; call disable_npo_guidance(pipe) first"
        )
    if getattr(pipe, "unet", None) is None or not hasattr(type(pipe), "do_classifier_free_guidance"):
        raise ValueError(
            f"{type(pipe).__name__}: NPO guidance needs a pipeline with a `unet` and CFG batching "
            "(do_classifier_free_guidance), such as StableDiffusionPipeline or StableDiffusionXLPipeline"
        )
    unet = pipe.unet
    lora = None if isinstance(negative, torch.nn.Module) else _lora_file(Path(negative))
    if lora is not None:
        if base is not None:
            raise ValueError(
                "base= applies to separate negative weights; a LoRA's base is the network it is loaded into"
            )
        if positive_adapters is None:
            active = unet.active_adapters() if getattr(unet, "peft_config", None) else []
            positive_adapters = dict.fromkeys(active, 1.0)
        if NEGATIVE_ADAPTER in (getattr(unet, "peft_config", None) or {}):
            unet.delete_adapters(NEGATIVE_ADAPTER)
        unet.load_lora_adapter(str(lora), prefix="unet", adapter_name=NEGATIVE_ADAPTER)
        negative_adapters = {**{k: alpha * w for k, w in positive_adapters.items()}, NEGATIVE_ADAPTER: beta}
        wrapper = NPOGuidedDenoiser(
            unet, positive_adapters=positive_adapters, negative_adapters=negative_adapters
        )
    else:
        if isinstance(negative, (str, Path)) and not Path(negative).exists():
            raise FileNotFoundError(f"negative weights not found: {negative}")
        if getattr(unet, "peft_config", None):
            raise ValueError(
                "separate negative weights with a positive LoRA loaded: fuse it first "
                "(pipe.fuse_lora(); pipe.unload_lora_weights()) or give the negative as a LoRA"
            )
        neg = _load_unet(negative, unet)
        base_net = unet if base is None else _load_unet(base, unet)
        wrapper = NPOGuidedDenoiser(unet, merge_negative(base_net, unet, neg, alpha=alpha, beta=beta).eval())
    wrapper.is_cfg_batch = lambda: bool(pipe.do_classifier_free_guidance)
    wrapper.use_positive()
    pipe.unet = wrapper
    return wrapper


def disable_npo_guidance(pipe: Any) -> None:
    """Undo :func:`enable_npo_guidance`: the plain UNet (positive model) back, the negative adapter removed."""
    wrapper = pipe.unet
    if not isinstance(wrapper, NPOGuidedDenoiser):
        return
    unet = wrapper.positive
    if wrapper.negative is None:
        unet.delete_adapters(NEGATIVE_ADAPTER)
        if wrapper.positive_adapters:
            wrapper.use_positive()
    pipe.unet = unet


def npo_guided_pipeline(
    pipe: Any, negative: str | Path | torch.nn.Module, *, alpha: float = 1.0, beta: float = 1.0, **kwargs: Any
) -> Any:
    """A second pipeline sharing ``pipe``'s components, with NPO guidance on; ``pipe`` stays plain CFG.

    For guidance on/off comparisons (``mmalign eval``, ``bench/efficacy.py self_npo``): e.g.
    ``evaluate_models(npo_guided_pipeline(pipe, lora), pipe, prompts, seeds, rewards, out, guidance_scale=3)``.
    Note NPO guidance only acts when the pipeline runs CFG (guidance_scale > 1).
    """
    components = dict(pipe.components)
    guided = (
        type(pipe)(**components)
        if "requires_safety_checker" not in type(pipe).__init__.__code__.co_varnames
        else type(pipe)(**components, requires_safety_checker=False)
    )
    guided.set_progress_bar_config(disable=True)
    enable_npo_guidance(guided, negative, alpha=alpha, beta=beta, **kwargs)
    return guided
