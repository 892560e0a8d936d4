"""What `mmalign train` exports is the trained network: for every family, a LoRA with non-zero weights written by the
loop's export and loaded back the way users load it (`generate --lora`, diffusers' `load_lora_weights`) predicts
exactly what the network that was exported predicts. An SD3 export once lost its to_q/k/v/out weights on loading
(diffusers' UNet key conversion applied to a transformer), which a "tuned differs from base" check cannot see; and a
LoRA with lora.alpha != lora.rank loaded at rank/alpha of its strength (the file carried no alpha), hence alpha 8."""

from __future__ import annotations

import pytest
import torch

from mmalign.pipelines import is_video, load_pipeline, make_adapter
from mmalign.pipelines.runtime import load_for_inference
from mmalign.trainers import load_config
from mmalign.trainers.loop import add_lora, export

torch.set_num_threads(1)

BUILDERS = {
    "sd15": ("build_tiny_sd15", {}),
    "sdxl": ("build_tiny_sdxl", {}),
    "sd3": ("build_tiny_sd3", {}),
    "flux": ("build_tiny_flux", {}),
    "cogvideox": ("build_tiny_cogvideox", {}),
    "wan": ("build_tiny_wan", {}),
    "wan22-low-noise": ("build_tiny_wan", {"variant": "2.2-a14b"}),
    "toy_video": ("build_tiny_toy_video", {}),
}
TARGETS = {  # each family's attention projections, text side included where the block has one
    "sd3": "[to_q, to_k, to_v, to_out.0, add_k_proj, add_v_proj]",
    "flux": "[to_q, to_k, to_v, to_out.0, add_q_proj, add_k_proj, add_v_proj, to_add_out]",
}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_an_exported_lora_loads_back_as_the_network_that_was_exported(name, tmp_path):
    import mmalign.toy.tiny as tiny

    builder, kwargs = BUILDERS[name]
    getattr(tiny, builder)(tmp_path / "model", **kwargs)
    options = {"expert": "low_noise"} if name == "wan22-low-noise" else {}
    pipe, family = load_pipeline(str(tmp_path / "model"))
    adapter = make_adapter(pipe, family, **options)
    denoiser = getattr(pipe, adapter.denoiser_name)
    cfg = load_config(
        None,
        [
            "lora.rank=2",
            "lora.alpha=8",
            f"lora.target_modules={TARGETS.get(name, '[to_q, to_k, to_v, to_out.0]')}",
        ],
    )
    add_lora(denoiser, cfg.lora)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in denoiser.named_parameters():
            if "lora_" in n:  # lora_B starts at zero: make every adapter weight count
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    out = export(pipe, denoiser, adapter.denoiser_name, cfg, tmp_path / "final")

    shape = (1, 9, 3, 16, 16) if is_video(adapter) else (1, 3, 16, 16)
    x = adapter.encode_media(torch.rand(shape, generator=g) * 2 - 1, g)
    t = adapter.sample_timesteps(1, g, torch.device("cpu"))
    if name == "wan22-low-noise":
        t = torch.tensor([400.0])  # below the boundary: the low-noise expert's range
    cond = adapter.encode_prompts(["a red circle"])
    cond.update(adapter.extra_conditioning({"original_size": [(16, 16)], "crop_top_left": [(0, 0)]}, 16))
    with torch.no_grad():
        exported = adapter.predict(denoiser.eval(), x, t, cond)
        loaded_pipe, _, _ = load_for_inference(str(tmp_path / "model"), lora=str(out), device="cpu")
        loaded = adapter.predict(getattr(loaded_pipe, adapter.denoiser_name), x, t, cond)
        denoiser.disable_adapters()
        base = adapter.predict(denoiser, x, t, cond)
    assert (exported - base).abs().max() > 1e-3  # the LoRA matters
    torch.testing.assert_close(loaded, exported, rtol=1e-4, atol=1e-5)
