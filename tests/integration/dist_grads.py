"""Worker for test_distributed.py: two Diffusion-DPO steps on the tiny SD1.5 UNet (LoRA, or full fine-tuning
against a frozen reference copy) under whatever accelerate set-up the environment describes (torchrun + an
accelerate config's env, or one plain process; an FSDP env runs accelerate's FSDP2 path, fsdp_on_cpu.py).

A fixed global batch of 4 pairs with fixed noise and timesteps; each process takes its contiguous share, so
the mean of the per-process gradients equals the 1-process gradient. Rank 0 writes the full (unsharded)
gradients of both steps to OUT/grads.pt.

    python tests/integration/dist_grads.py TINY_SD15_DIR OUT_DIR [lora|full]
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from fsdp_on_cpu import force_fsdp_on_cpu

from mmalign.config import LoraConfig
from mmalign.losses.diffusion_dpo import diffusion_dpo_loss
from mmalign.pipelines import load_pipeline, make_adapter
from mmalign.trainers.common import TrainModels, noised_pairs, pair_errors, repeat_cond
from mmalign.trainers.loop import add_lora
from mmalign.trainers.sharding import gathered, is_sharded

PAIRS, STEPS = 4, 2


def main(model_dir: str, out_dir: str, mode: str = "lora") -> None:
    force_fsdp_on_cpu()
    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    pipe = load_pipeline(model_dir, family="sd15")[0]
    adapter = make_adapter(pipe, "sd15")
    unet, reference = pipe.unet, None
    gen = torch.Generator().manual_seed(3)
    if mode == "lora":
        add_lora(unet.requires_grad_(False), LoraConfig(rank=2))
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.data = 0.1 * torch.randn(p.shape, generator=gen)  # policy != reference from the first step
    else:
        reference = copy.deepcopy(unet).requires_grad_(False)
        with torch.no_grad():
            for p in unet.parameters():
                p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=gen))  # policy != reference
    opt = torch.optim.SGD(
        [p for p in unet.parameters() if p.requires_grad], lr=0.1 if mode == "full" else 1.0
    )
    unet, opt = acc.prepare(unet, opt)
    models = TrainModels(adapter, unet, reference, unwrap=acc.unwrap_model)

    per = PAIRS // acc.num_processes
    mine = slice(acc.process_index * per, (acc.process_index + 1) * per)
    data = torch.Generator().manual_seed(1)
    grads = []
    for _ in range(STEPS):
        x_w, x_l, noise = (torch.randn(PAIRS, 4, 8, 8, generator=data) for _ in range(3))
        cond = {"encoder_hidden_states": torch.randn(PAIRS, 5, 16, generator=data)}
        t = torch.randint(0, 1000, (PAIRS,), generator=data)
        x_w, x_l, noise, t = x_w[mine], x_l[mine], noise[mine], t[mine]
        pairs = noised_pairs(adapter, x_w, x_l, noise=torch.cat([noise, noise]), t=t)
        errs = pair_errors(
            models,
            pairs["xt"],
            pairs["t"],
            repeat_cond({"encoder_hidden_states": cond["encoder_hidden_states"][mine]}),
            pairs["target"],
        )
        loss, _ = diffusion_dpo_loss(*errs, beta=2.0)
        acc.backward(loss.mean())
        step = {
            n: gathered(p.grad).detach().clone()  # FSDP2 shards gradients as DTensors
            for n, p in acc.unwrap_model(unet).named_parameters()
            if p.requires_grad and p.grad is not None
        }
        grads.append(step)
        opt.step()
        opt.zero_grad(set_to_none=True)
    if acc.is_main_process:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "num_processes": acc.num_processes,
                "distributed_type": str(acc.distributed_type),
                "sharded": is_sharded(unet.parameters()),
                "grads": grads,
            },
            Path(out_dir) / "grads.pt",
        )
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    main(*sys.argv[1:4])
