"""The user-conditioned attention path: diffusers' IP-Adapter machinery driven by a user vector (PPD §3.2).

PPD conditions the denoiser on a user embedding u through a *decoupled* cross-attention: every cross-attention
layer adds ``scale * Softmax(Q K'^T / sqrt(d)) V'`` to its text attention, with ``K' = tokens W'_k`` and
``V' = tokens W'_v`` of its own. That is exactly IP-Adapter, so nothing here is new attention code:

- ``u`` [B, D] -> 4 tokens of the cross-attention width: diffusers' ``ImageProjection`` (linear + LayerNorm),
  installed as the UNet's ``encoder_hid_proj`` and fed through ``added_cond_kwargs={"image_embeds": [u[:, None]]}``;
- each cross-attention layer gets ``IPAdapterAttnProcessor2_0`` (its trainable ``to_k_ip``/``to_v_ip`` and scale).

Both are installed by ``unet._load_ip_adapter_weights`` from a state dict in the IP-Adapter layout, so the saved
adapter (:func:`save_user_adapter`) loads into a stock pipeline with ``pipe.load_ip_adapter(dir, subfolder="",
weight_name="user_adapter.safetensors", image_encoder_folder=None)`` and is used with
``pipe(..., ip_adapter_image_embeds=[user_embeds_for_pipeline(u)])``.

Exactness of "no user": the projection's two biases are held at zero (never trained), so ``u = 0`` projects to
zero tokens, ``V' = 0`` (``to_v_ip`` has no bias) and the user path adds exactly 0; scale 0 skips the path
inside diffusers' processor. Either gives the base model's output bit for bit (tested).

What did not fit: diffusers' loader fixes the token count of an ``ImageProjection`` adapter at 4 (the
``proj.weight`` layout), so the user path always uses 4 tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

NUM_TOKENS = 4  # fixed by diffusers' ImageProjection loader ("proj.weight" layout)
ADAPTER_FILE = "user_adapter.safetensors"
ADAPTER_META = "user_adapter.json"


def cross_attention_layers(unet: Any) -> list[tuple[str, int]]:
    """(processor name, hidden size) of every cross-attention layer, in ``unet.attn_processors`` order.

    The hidden size per block follows diffusers' ``_convert_ip_adapter_attn_to_diffusers``.
    """
    out = []
    channels = list(unet.config.block_out_channels)
    for name in unet.attn_processors:
        if name.endswith("attn1.processor") or "motion_modules" in name:
            continue
        if name.startswith("mid_block"):
            hidden = channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(channels))[int(name[len("up_blocks.")])]
        else:
            hidden = channels[int(name[len("down_blocks.")])]
        out.append((name, hidden))
    return out


def init_user_adapter_state(unet: Any, user_dim: int, *, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """A fresh user adapter in diffusers' IP-Adapter state-dict layout (``image_proj`` / ``ip_adapter``).

    ``W'_k`` starts as a copy of the layer's text ``to_k`` (IP-Adapter's init) and ``W'_v`` at zero, so the
    untrained path adds nothing: policy == reference at step 0, as a LoRA with B = 0.
    """
    cross = unet.config.cross_attention_dim
    if isinstance(cross, (list, tuple)):
        raise ValueError(
            f"cross_attention_dim={cross}: per-block cross-attention widths are not supported by the user path"
        )
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(NUM_TOKENS * cross, user_dim, generator=g) / user_dim**0.5
    image_proj = {
        "proj.weight": proj,
        "proj.bias": torch.zeros(NUM_TOKENS * cross),
        "norm.weight": torch.ones(cross),
        "norm.bias": torch.zeros(cross),
    }
    modules = dict(unet.named_modules())
    ip: dict[str, torch.Tensor] = {}
    for i, (name, hidden) in enumerate(cross_attention_layers(unet)):
        attn = modules[name.removesuffix(".processor")]
        key_id = 2 * i + 1  # diffusers numbers cross-attention layers 1, 3, 5, ...
        ip[f"{key_id}.to_k_ip.weight"] = attn.to_k.weight.detach().float().cpu().clone()
        ip[f"{key_id}.to_v_ip.weight"] = torch.zeros(hidden, cross)
    return {"image_proj": image_proj, "ip_adapter": ip}


def install_user_adapter(unet: Any, state: dict[str, dict[str, torch.Tensor]]) -> None:
    """Put the user path into ``unet`` through diffusers' own IP-Adapter loader; biases stay frozen at 0."""
    unet._load_ip_adapter_weights([state], low_cpu_mem_usage=False)
    proj = unet.encoder_hid_proj.image_projection_layers[0]
    proj.image_embeds.bias.requires_grad_(False)
    proj.norm.bias.requires_grad_(False)


def add_user_path(unet: Any, user_dim: int, *, seed: int = 0) -> list[torch.nn.Parameter]:
    """Install a fresh user path and make its weights (projection, every ``to_k_ip``/``to_v_ip``) trainable.

    Returns:
        The trainable parameters of the path.
    """
    install_user_adapter(unet, init_user_adapter_state(unet, user_dim, seed=seed))
    params = user_path_parameters(unet)
    for p in params:
        p.requires_grad_(True)
    return params


def has_user_path(unet: Any) -> bool:
    return getattr(unet.config, "encoder_hid_dim_type", None) == "ip_image_proj"


def user_path_parameters(unet: Any) -> list[torch.nn.Parameter]:
    """The weights that move in training: the projection matrix and LayerNorm gain, and K'/V' of every layer."""
    proj = unet.encoder_hid_proj.image_projection_layers[0]
    params = [proj.image_embeds.weight, proj.norm.weight]
    for processor in unet.attn_processors.values():
        if hasattr(processor, "to_k_ip"):
            params += [*processor.to_k_ip.parameters(), *processor.to_v_ip.parameters()]
    return params


def user_dim_of(unet: Any) -> int:
    return unet.encoder_hid_proj.image_projection_layers[0].image_embeds.in_features


def set_user_scale(unet: Any, scale: float) -> None:
    """Scale of the user path in every layer (0 = the base model exactly)."""
    for processor in unet.attn_processors.values():
        if hasattr(processor, "to_k_ip"):
            processor.scale = [float(scale)] * len(processor.scale)


def user_added_cond(user: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """``added_cond_kwargs`` entry for a UNet with the user path: ``{"image_embeds": [u[:, None, :]]}``."""
    if user.dim() != 2:
        raise ValueError(f"user vectors must be [B, D], got shape {tuple(user.shape)}")
    return {"image_embeds": [user[:, None, :]]}


def user_embeds_for_pipeline(user: torch.Tensor, *, guidance: bool = True) -> torch.Tensor:
    """``ip_adapter_image_embeds`` entry for a stock diffusers pipeline, one user vector per prompt.

    Args:
        user: [B, D] or [D] user vectors.
        guidance: the pipeline runs classifier-free guidance: the unconditional half gets the zero vector
            (no user, IP-Adapter's convention), so guidance amplifies the user's direction with the prompt's.

    Returns:
        [2B, 1, D] (``guidance``; the pipeline splits it into negative and positive halves) or [B, 1, D].
    """
    user = user[None] if user.dim() == 1 else user
    embeds = user[:, None, :]
    return torch.cat([torch.zeros_like(embeds), embeds]) if guidance else embeds


def user_adapter_state(unet: Any) -> dict[str, torch.Tensor]:
    """The installed path as flat ``image_proj.*`` / ``ip_adapter.*`` tensors (``load_ip_adapter``'s safetensors layout).

    Read through ``unet.state_dict()``, so a sharded (FSDP2) UNet exports from its gathered weights."""
    sd = unet.state_dict()
    proj = "encoder_hid_proj.image_projection_layers.0."
    out = {
        "image_proj.proj.weight": sd[proj + "image_embeds.weight"],
        "image_proj.proj.bias": sd[proj + "image_embeds.bias"],
        "image_proj.norm.weight": sd[proj + "norm.weight"],
        "image_proj.norm.bias": sd[proj + "norm.bias"],
    }
    for i, (name, _) in enumerate(cross_attention_layers(unet)):
        key_id = 2 * i + 1
        out[f"ip_adapter.{key_id}.to_k_ip.weight"] = sd[f"{name}.to_k_ip.0.weight"]
        out[f"ip_adapter.{key_id}.to_v_ip.weight"] = sd[f"{name}.to_v_ip.0.weight"]
    return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}


def save_user_adapter(unet: Any, out_dir: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write ``user_adapter.safetensors`` (IP-Adapter layout) and ``user_adapter.json`` (user_dim, encoder ...)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(user_adapter_state(unet), out_dir / ADAPTER_FILE)
    info = {
        "user_dim": user_dim_of(unet),
        "num_tokens": NUM_TOKENS,
        **(meta or {}),
        "load": f"pipe.load_ip_adapter('{out_dir}', subfolder='', weight_name='{ADAPTER_FILE}', image_encoder_folder=None)",
    }
    (out_dir / ADAPTER_META).write_text(json.dumps(info, indent=1))
    return out_dir


def load_user_adapter(pipe: Any, adapter_dir: str | Path, *, scale: float = 1.0) -> dict[str, Any]:
    """Load a saved user adapter into a stock diffusers pipeline (the documented call) and set its scale.

    Returns:
        The adapter's metadata (``user_dim``, the encoder that made its training vectors, ...).
    """
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / ADAPTER_FILE).is_file():
        raise FileNotFoundError(
            f"{adapter_dir}: no {ADAPTER_FILE} (train one with `mmalign train configs/*/personal_dpo.yaml`)"
        )
    pipe.load_ip_adapter(str(adapter_dir), subfolder="", weight_name=ADAPTER_FILE, image_encoder_folder=None)
    pipe.set_ip_adapter_scale(scale)
    meta_path = adapter_dir / ADAPTER_META
    return json.loads(meta_path.read_text()) if meta_path.is_file() else {}
