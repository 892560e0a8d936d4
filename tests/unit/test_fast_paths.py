"""Fast paths (train.compile, train.channels_last, train.attention_backend, train.checkpoint_policy) give
eager's loss and gradients.

A Diffusion-DPO step on the tiny SD1.5 UNet with LoRA, run eagerly and with each fast path from the same seed,
in fp32. beta=2 (tau=1) so the loss moves one-for-one with the denoiser's errors: at beta=5000 any fp32 rounding
of the errors is multiplied by 2500 in the logit. Tolerances: the loss within 1e-6 relative; every LoRA
gradient within 1e-5 of its tensor's largest entry. Measured: channels-last (another convolution algorithm)
8.6e-8 and 4.7e-6; compilation bit-identical. Compilation uses torch.compile's ``aot_eager`` backend here: the same
Dynamo graph capture, AOTAutograd backward and guards as inductor, without C++ code generation (which takes
minutes on 2 CPU cores); the GPU benchmark runs inductor.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

from mmalign.config import ConfigError, LoraConfig, TrainConfig
from mmalign.pipelines import make_adapter
from mmalign.pipelines.fast import (
    FastPathError,
    apply_fast_paths,
    enable_checkpointing,
    repeated_blocks,
    set_attention_backend,
)
from mmalign.trainers.common import TrainModels
from mmalign.trainers.diffusion_dpo import DiffusionDPOConfig, compute_loss
from mmalign.trainers.loop import add_lora, cast_frozen


@pytest.fixture(scope="module")
def tiny_pipe(tiny_sd15):
    from mmalign.pipelines import load_pipeline

    return load_pipeline(str(tiny_sd15), family="sd15")[0]


def _step(pipe, state, *, checkpointing=False, policy="recompute_all", count=None, bf16=None, **fast):
    """One DPO loss + backward from a fixed seed; returns (loss, {name: grad}). ``count``: a dict that receives
    how often each aten op ran during the step (``_OpCount``). ``bf16``: under bf16 autocast, with the frozen
    weights in fp32 (``"fp32"``) or cast to bf16 as the loop does (``"compute"``, ``train.frozen_dtype``)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(pipe.unet.config)
    unet.load_state_dict(pipe.unet.state_dict())
    unet.requires_grad_(False)
    add_lora(unet, LoraConfig(rank=2))
    lora = {k: v for k, v in state.items()}
    unet.load_state_dict(lora, strict=False)  # non-zero LoRA B: policy != reference
    if checkpointing:
        enable_checkpointing(unet, policy)
    unet.train()
    apply_fast_paths(unet, compile_backend="aot_eager", **fast)
    if bf16 == "compute":
        cast_frozen(unet, torch.bfloat16)
    adapter = make_adapter(pipe, "sd15")
    gen = torch.Generator().manual_seed(0)
    batch = {
        "latents_w": torch.randn(2, 4, 8, 8, generator=gen),
        "latents_l": torch.randn(2, 4, 8, 8, generator=gen),
        "cond": {"encoder_hidden_states": torch.randn(2, 5, 16, generator=gen)},
    }
    torch.manual_seed(1)  # noise and timesteps
    with _OpCount(count if count is not None else {}):
        with torch.autocast("cpu", torch.bfloat16, enabled=bool(bf16)):
            loss, _ = compute_loss(batch, TrainModels(adapter, unet), DiffusionDPOConfig(beta=2.0))
        loss.backward()
    grads = {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}
    return loss.detach(), grads


class _OpCount(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts every aten op (by overload packet name) that runs inside it, recomputation included."""

    def __init__(self, counts: dict):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


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
        {"checkpointing": True},
        {"checkpointing": True, "policy": "save_attention"},
        {"checkpointing": True, "policy": "save_matmuls"},
        {"compile": "regional", "checkpointing": True, "policy": "save_matmuls"},
    ],
    ids=[
        "channels_last",
        "full",
        "regional+channels_last+checkpointing",
        "checkpointing",
        "checkpointing+save_attention",
        "checkpointing+save_matmuls",
        "regional+checkpointing+save_matmuls",
    ],
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


def test_checkpoint_policies_skip_what_they_save(tiny_pipe, lora_state):
    """The forward ops each policy keeps are not run again in backward: forward convolutions and attention
    kernels run once per step without checkpointing; recompute_all runs the checkpointed blocks' twice;
    save_attention runs attention once and convolutions twice; save_matmuls runs both once."""
    runs = {}
    for name, kwargs in {
        "off": {},
        "recompute_all": {"checkpointing": True},
        "save_attention": {"checkpointing": True, "policy": "save_attention"},
        "save_matmuls": {"checkpointing": True, "policy": "save_matmuls"},
    }.items():
        counts: dict = {}
        _step(tiny_pipe, lora_state, count=counts, **kwargs)
        attention = sum(
            n for op, n in counts.items() if op.startswith("_scaled_dot_product") and "backward" not in op
        )
        runs[name] = (counts.get("convolution", 0), attention)
    conv, attn = runs["off"]
    assert conv > 0 and attn > 0, runs  # the tiny UNet has both, through these kernels
    assert runs["recompute_all"][0] > conv and runs["recompute_all"][1] > attn, runs
    assert runs["save_attention"] == (runs["recompute_all"][0], attn), runs
    assert runs["save_matmuls"] == (conv, attn), runs


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
    with pytest.raises(
        ConfigError, match=r"train.checkpoint_policy.*recompute_all, save_attention, save_matmuls"
    ):
        TrainConfig(gradient_checkpointing=True, checkpoint_policy="save_some")
    with pytest.raises(ConfigError, match="no effect without checkpointing"):
        TrainConfig(checkpoint_policy="save_matmuls")


def test_xformers_error_is_one_line(tiny_pipe):
    import importlib.util

    if importlib.util.find_spec("xformers") is not None and torch.cuda.is_available():
        pytest.skip("xformers and CUDA present: the backend applies")
    with pytest.raises(FastPathError, match="xformers") as err:
        set_attention_backend(tiny_pipe.unet, "xformers")
    assert "\n" not in str(err.value)


def _video_step(family: str, *, checkpointing=False, policy="recompute_all", bf16=None, **fast):
    """One DenseDPO loss + backward on the tiny Wan or CogVideoX transformer (bench_video_step's tiny presets,
    random weights, non-zero LoRA B), fp32, from fixed seeds; returns (loss, {name: grad})."""
    from conftest import load_bench

    from mmalign.trainers.dense_dpo import DenseDPOConfig
    from mmalign.trainers.dense_dpo import compute_loss as dense_loss

    bench = load_bench("bench_video_step")
    preset = bench.PRESETS[f"{family}-tiny"]
    pipe = bench.build_pipeline(preset, "cpu", torch.float32)
    net = pipe.transformer
    net.requires_grad_(False)
    torch.manual_seed(2)
    add_lora(net, LoraConfig(rank=2))
    gen = torch.Generator().manual_seed(3)
    for n, p in net.named_parameters():
        if "lora_B" in n:
            p.data = 0.1 * torch.randn(p.shape, generator=gen)  # policy != reference
    if checkpointing:
        enable_checkpointing(net, policy)
    net.train()
    apply_fast_paths(net, compile_backend="aot_eager", **fast)
    if bf16 == "compute":
        cast_frozen(net, torch.bfloat16)
    if fast.get("compile") == "regional":  # every repeated block, and only those, compiled in place
        compiled = {type(m).__name__ for m in net.modules() if getattr(m, "_compiled_call_impl", None)}
        assert compiled == {"WanTransformerBlock" if family == "wan" else "CogVideoXBlock"}, compiled
    batch = bench.make_batch(preset, 2, torch.device("cpu"), torch.Generator().manual_seed(0))
    torch.manual_seed(1)  # noise and timesteps
    with torch.autocast("cpu", torch.bfloat16, enabled=bool(bf16)):
        loss, _ = dense_loss(
            batch, TrainModels(make_adapter(pipe, preset["family"]), net), DenseDPOConfig(beta=2.0)
        )
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_video_fast_paths_match_eager(family):
    """The video transformers get the same fast paths (the repeated WanTransformerBlock / CogVideoXBlock
    compiled, selective checkpointing) with eager's DenseDPO loss and gradients, within the UNet test's bounds."""
    ref_loss, ref_grads = _video_step(family)
    assert ref_loss.item() != 0 and any(g.abs().sum() > 0 for g in ref_grads.values())
    for fast in (  # (compiling without checkpointing is the UNet test's; each compile here costs seconds)
        {"checkpointing": True, "policy": "save_attention"},
        {"compile": "regional", "checkpointing": True, "policy": "save_matmuls"},
    ):
        torch._dynamo.reset()
        loss, grads = _video_step(family, **fast)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0, msg=str(fast))
        assert grads.keys() == ref_grads.keys() and len(grads) > 0
        for name, ref in ref_grads.items():
            scale = ref.abs().max().item()
            torch.testing.assert_close(grads[name], ref, rtol=0, atol=1e-5 * scale, msg=f"{fast} {name}")


def test_fused_adamw_is_the_default_and_matches_foreach():
    """The loop's AdamW runs torch's fused kernel (on CPU and CUDA parameters) and gives the multi-tensor path's
    weights: 5 steps on the same gradients agree within float32 rounding (measured: at most 1.2e-7 apart)."""
    from mmalign.trainers.loop import build_optimizer
    from mmalign.trainers.master_weights import MasterWeights

    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(33, 7, generator=gen), torch.randn(5, generator=gen)]
    grads = [[torch.randn(t.shape, generator=gen) for t in start] for _ in range(5)]
    cfg = TrainConfig(weight_decay=0.1)

    def train(fused, bf16=False):
        params = [torch.nn.Parameter(t.clone().to(torch.bfloat16 if bf16 else torch.float32)) for t in start]
        if bf16:
            opt = MasterWeights(params, lambda masters: build_optimizer(masters, cfg, 1e-2, fused))
        else:
            opt = build_optimizer(params, cfg, 1e-2, fused)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.to(p.dtype)
            opt.step()
        inner = getattr(opt, "optimizer", opt)
        return [p.detach().float() for p in params], inner.param_groups[0]

    fused, group = train(None)  # the default
    assert group["fused"] is True
    foreach, group = train(False)
    assert not group["fused"] and group["foreach"] is True
    cfg = TrainConfig(weight_decay=0.1, fused_adamw=False)  # the config's switch: the same as fused=False
    assert train(None)[1]["foreach"] is True
    cfg = TrainConfig(weight_decay=0.1)
    assert any(not torch.equal(a, b) for a, b in zip(fused, start))  # the weights moved
    for a, b in zip(fused, foreach):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    masters_fused, group = train(None, bf16=True)  # train.trainable_dtype=bf16: the fp32 masters' optimizer
    assert group["fused"] is True
    for a, b in zip(masters_fused, train(False, bf16=True)[0]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # measured: identical once rounded to bf16


def _grad_gap(grads, ref):
    """Largest gradient difference relative to its tensor's largest entry, and the cosine of the whole gradient."""
    gap = max(((grads[n] - ref[n]).abs().max() / ref[n].abs().max()).item() for n in ref)
    flat = [torch.cat([g[n].flatten() for n in ref]) for g in (grads, ref)]
    return gap, torch.nn.functional.cosine_similarity(*flat, dim=0).item()


@pytest.mark.parametrize("family", ["sd15", "wan"])
def test_frozen_weights_in_bf16_move_gradients_less_than_bf16_autocast_does(family, tiny_pipe, lora_state):
    """train.frozen_dtype=compute (the default): under bf16 autocast the frozen weights are stored in bf16, except
    the model's _keep_in_fp32_modules. The loss is identical (autocast cast those weights for the matmuls
    anyway); the gradients differ from the fp32-stored run by less than bf16 autocast moves them from fp32.
    Measured on these tiny models: UNet 3.3e-2 of a tensor's largest entry (autocast vs fp32: 4.7e-2), cosine
    0.99989; Wan bit-identical (autocast vs fp32: 4.6e-2)."""
    step = (
        (lambda **kw: _step(tiny_pipe, lora_state, **kw))
        if family == "sd15"
        else partial(_video_step, family)
    )
    fp32_loss, fp32_grads = step()
    stored_loss, stored_grads = step(bf16="fp32")
    cast_loss, cast_grads = step(bf16="compute")
    torch.testing.assert_close(cast_loss, stored_loss, rtol=1e-6, atol=0)
    autocast_gap, _ = _grad_gap(stored_grads, fp32_grads)
    gap, cosine = _grad_gap(cast_grads, stored_grads)
    assert gap <= autocast_gap and cosine > 0.9998, (gap, autocast_gap, cosine)


def test_wan_keeps_its_fp32_modules_and_its_attention_norms_follow_the_activations():
    """After cast_frozen, Wan's frozen fp32 weights are exactly its _keep_in_fp32_modules, and the attention
    RMSNorms are bf16 like their inputs (fp32 weights on bf16 activations leave torch's fused RMSNorm kernel:
    "Mismatch dtype between input and weight")."""
    from conftest import load_bench

    bench = load_bench("bench_video_step")
    net = bench.build_pipeline(bench.PRESETS["wan-tiny"], "cpu", torch.float32).transformer
    net.requires_grad_(False)
    add_lora(net, LoraConfig(rank=2))
    cast_frozen(net, torch.bfloat16)
    keep = net._keep_in_fp32_modules
    kept = [n for n, p in net.named_parameters() if p.dtype == torch.float32 and not p.requires_grad]
    assert kept and all(any(k in n.split(".") for k in keep) for n in kept), kept
    assert {"scale_shift_table"} <= {n.split(".")[-1] for n in kept}  # a parameter, not a module
    norms = [m for m in net.modules() if isinstance(m, torch.nn.RMSNorm) and m.weight is not None]
    assert norms and all(m.weight.dtype == torch.bfloat16 for m in norms)


def test_cast_frozen_keeps_trained_and_fp32_modules():
    class Net(torch.nn.Module):
        _keep_in_fp32_modules = ["norm1", "table"]  # a module and a parameter name, as Wan's

        def __init__(self):
            super().__init__()
            self.proj, self.lora = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
            self.norm1 = torch.nn.LayerNorm(2)
            self.norm2 = torch.nn.LayerNorm(2)  # trains its scale only, as personal_dpo's user projection
            self.table = torch.nn.Parameter(torch.zeros(2))
            self.steps = torch.nn.Parameter(torch.zeros(2, dtype=torch.long), requires_grad=False)

    net = Net().requires_grad_(False)
    net.lora.requires_grad_(True)
    net.norm2.weight.requires_grad_(True)
    assert cast_frozen(net, torch.bfloat16) == 2  # proj.weight, proj.bias
    dtypes = {n: p.dtype for n, p in net.named_parameters()}
    assert dtypes == {
        "proj.weight": torch.bfloat16,
        "proj.bias": torch.bfloat16,
        "lora.weight": torch.float32,
        "lora.bias": torch.float32,
        "norm1.weight": torch.float32,
        "norm1.bias": torch.float32,
        "norm2.weight": torch.float32,
        "norm2.bias": torch.float32,  # frozen, but its module's weight trains: one dtype per norm
        "table": torch.float32,
        "steps": torch.long,
    }
    assert cast_frozen(net, torch.float32) == 0  # mixed_precision=no: nothing to do
