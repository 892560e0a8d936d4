"""Fast paths (train.compile, train.channels_last, train.attention_backend) give eager's loss and gradients.

A Diffusion-DPO step on the tiny SD1.5 UNet with LoRA, run eagerly and with each fast path from the same seed,
in fp32. beta=2 (tau=1) so the loss moves one-for-one with the denoiser's errors: at beta=5000 any fp32 rounding
of the errors is multiplied by 2500 in the logit. Tolerances: the loss within 1e-6 relative; every LoRA
gradient within 1e-5 of its tensor's largest entry. Measured: channels-last (another convolution algorithm)
8.6e-8 and 4.7e-6; compilation bit-identical. Compilation uses torch.compile's ``aot_eager`` backend here: the same
Dynamo graph capture, AOTAutograd backward and guards as inductor, without C++ code generation (which takes
minutes on 2 CPU cores); the GPU benchmark runs inductor.
"""

from __future__ import annotations

import pytest
import torch

from mmalign.config import ConfigError, LoraConfig, TrainConfig
from mmalign.pipelines import make_adapter
from mmalign.pipelines.fast import FastPathError, apply_fast_paths, repeated_blocks, set_attention_backend
from mmalign.trainers.common import TrainModels
from mmalign.trainers.diffusion_dpo import DiffusionDPOConfig, compute_loss
from mmalign.trainers.loop import add_lora


@pytest.fixture(scope="module")
def tiny_pipe(tiny_sd15):
    from mmalign.pipelines import load_pipeline

    return load_pipeline(str(tiny_sd15), family="sd15")[0]


def _step(pipe, state, *, checkpointing=False, **fast):
    """One DPO loss + backward from a fixed seed; returns (loss, {name: grad})."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(pipe.unet.config)
    unet.load_state_dict(pipe.unet.state_dict())
    unet.requires_grad_(False)
    add_lora(unet, LoraConfig(rank=2))
    lora = {k: v for k, v in state.items()}
    unet.load_state_dict(lora, strict=False)  # non-zero LoRA B: policy != reference
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    apply_fast_paths(unet, compile_backend="aot_eager", **fast)
    adapter = make_adapter(pipe, "sd15")
    gen = torch.Generator().manual_seed(0)
    batch = {
        "latents_w": torch.randn(2, 4, 8, 8, generator=gen),
        "latents_l": torch.randn(2, 4, 8, 8, generator=gen),
        "cond": {"encoder_hidden_states": torch.randn(2, 5, 16, generator=gen)},
    }
    torch.manual_seed(1)  # noise and timesteps
    loss, _ = compute_loss(batch, TrainModels(adapter, unet), DiffusionDPOConfig(beta=2.0))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.fixture(scope="module")
def lora_state(tiny_pipe):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(tiny_pipe.unet.config)
    add_lora(unet, LoraConfig(rank=2))
    gen = torch.Generator().manual_seed(3)
    return {n: 0.1 * torch.randn(p.shape, generator=gen) for n, p in unet.named_parameters() if "lora_" in n}


@pytest.fixture(scope="module")
def eager(tiny_pipe, lora_state):
    return _step(tiny_pipe, lora_state)


@pytest.mark.parametrize(
    "fast",
    [
        {"channels_last": True},
        {"compile": "full"},
        {"compile": "regional", "channels_last": True, "checkpointing": True},
    ],
    ids=["channels_last", "full", "regional+channels_last+checkpointing"],
)
def test_fast_path_matches_eager(tiny_pipe, lora_state, eager, fast):
    torch._dynamo.reset()
    loss, grads = _step(tiny_pipe, lora_state, **fast)
    ref_loss, ref_grads = eager
    assert ref_loss.item() != 0 and any(g.abs().sum() > 0 for g in ref_grads.values())
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name, ref in ref_grads.items():
        scale = ref.abs().max().item()
        torch.testing.assert_close(grads[name], ref, rtol=0, atol=1e-5 * scale, msg=name)


def test_regional_finds_the_repeated_blocks(tiny_pipe):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(tiny_pipe.unet.config)
    blocks = repeated_blocks(unet)
    assert blocks and {type(b).__name__ for b in blocks} == {"BasicTransformerBlock"}

    class Block(torch.nn.Module):  # a model without diffusers' _repeated_blocks: outermost *Block classes
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.ModuleList([torch.nn.Linear(2, 2)])

    net = torch.nn.Sequential(Block(), Block(), torch.nn.Linear(2, 2))
    assert repeated_blocks(net) == [net[0], net[1]]


def test_fast_path_config_errors():
    with pytest.raises(ConfigError, match=r"train.compile='fast'.*none, regional, full"):
        TrainConfig(compile="fast")
    with pytest.raises(ConfigError, match="train.attention_backend"):
        TrainConfig(attention_backend="flash")
    with pytest.raises(ConfigError, match="no effect with train.compile=none"):
        TrainConfig(compile_mode="max-autotune")
    assert TrainConfig(compile="full", compile_mode="max-autotune-no-cudagraphs").compile == "full"


def test_xformers_error_is_one_line(tiny_pipe):
    import importlib.util

    if importlib.util.find_spec("xformers") is not None and torch.cuda.is_available():
        pytest.skip("xformers and CUDA present: the backend applies")
    with pytest.raises(FastPathError, match="xformers") as err:
        set_attention_backend(tiny_pipe.unet, "xformers")
    assert "\n" not in str(err.value)
