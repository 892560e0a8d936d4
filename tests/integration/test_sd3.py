"""Stable Diffusion 3 / 3.5 (a rectified-flow MMDiT with three text encoders) on a tiny pipeline of the real classes:
the adapter predicts what the pipeline samples with, and Diffusion-DPO (Flow-DPO) trains, exports and loads."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_only_trainable_changed, card_code
from test_train_diffusion_dpo import tiny_cfg

from mmalign.pipelines import PipelineAdapter, load_pipeline, make_adapter
from mmalign.trainers.loop import train

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    from mmalign.toy.tiny import build_tiny_sd3

    path = tmp_path_factory.mktemp("tiny-sd3")
    build_tiny_sd3(path)
    return path


def test_the_adapter_predicts_what_the_pipeline_samples_with(tiny_sd3):
    """One Euler step from t = 1000 (sigma 1) is x - v: the pipeline's own step equals the adapter's prediction,
    so its text conditioning (CLIP-L + CLIP-G + T5), timestep scale and latent layout are the pipeline's. The
    latent scaling inverts the pipeline's decode, and timesteps follow SD3's shifted logit-normal."""
    pipe, family = load_pipeline(str(tiny_sd3))
    adapter = make_adapter(pipe, family)
    assert family == "sd3" and isinstance(adapter, PipelineAdapter) and adapter.shift == 3.0
    assert len(adapter.text_encoders) == 3

    prompts = ["a red circle", "a blue square"]
    cond = adapter.encode_prompts(prompts)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    v = adapter.predict(pipe.transformer, noise, torch.full((2,), 1000.0), cond)
    pipe.set_progress_bar_config(disable=True)
    stepped = pipe(
        prompts,
        num_inference_steps=1,
        guidance_scale=1.0,  # no CFG: the conditional branch alone
        latents=noise,
        height=16,
        width=16,
        output_type="latent",
        max_sequence_length=adapter.max_text_len,
    ).images
    assert torch.allclose(stepped, noise - v, atol=1e-5)

    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mean, std = adapter.latent_moments(pixels)
    latents = adapter.latents_from_moments(mean, torch.zeros_like(std))
    vae = pipe.vae
    assert torch.allclose(latents / vae.config.scaling_factor + vae.config.shift_factor, mean, atol=1e-6)

    t = adapter.sample_timesteps(20_000, torch.Generator().manual_seed(2), torch.device("cpu"))
    assert 0 < t.min() and t.max() < 1000
    # logit-normal u has median 1/2; shift 3 maps it to sigma 3 * 0.5 / (1 + 2 * 0.5) = 0.75
    assert abs(t.median().item() - 750) < 10


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_flow_dpo_trains_only_the_transformer_and_the_export_loads(lora, tiny_sd3, pair_manifest, tmp_path):
    from diffusers import SD3Transformer2DModel

    cfg = tiny_cfg(
        tiny_sd3,
        pair_manifest,
        tmp_path / "run",
        f"lora.enabled={str(lora).lower()}",
        "method.beta=100",
        "train.learning_rate=5e-2" if lora else "train.learning_rate=1e-3",
    )
    result = train(cfg, keep_initial=True)
    start = dict(SD3Transformer2DModel.from_pretrained(tiny_sd3, subfolder="transformer").named_parameters())
    trainable, frozen = assert_only_trainable_changed(result, start)
    assert trainable > 0 and (frozen > 0) == lora
    assert result.summary["steps"] == 3 and result.summary["final_metrics"]["loss"] > 0

    def sample(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe(
            "a red square",
            num_inference_steps=2,
            height=16,
            width=16,
            output_type="pt",
            generator=torch.Generator().manual_seed(0),
            max_sequence_length=16,
        ).images

    base, _ = load_pipeline(str(tiny_sd3))
    tuned = card_code(tmp_path / "run" / "final")["pipe"]  # the model card's own loading lines
    assert not torch.allclose(sample(tuned), sample(base))
    if lora:
        base.load_lora_weights(str(tmp_path / "run" / "final"))
        assert torch.equal(sample(base), sample(tuned))


def test_generate_samples_with_the_trained_lora_and_ddpm_methods_are_refused(
    tiny_sd3, pair_manifest, tmp_path, capsys
):
    from mmalign.cli import main

    train(tiny_cfg(tiny_sd3, pair_manifest, tmp_path / "run", "train.max_steps=1"))
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    common = [
        "--prompts",
        str(tmp_path / "prompts.txt"),
        "--steps",
        "2",
        "--height",
        "16",
        "--width",
        "16",
        "--device",
        "cpu",
    ]
    assert main(["generate", "--model", str(tiny_sd3), *common, "--out", str(tmp_path / "base")]) == 0
    lora = ["--lora", str(tmp_path / "run" / "final")]
    assert main(["generate", "--model", str(tiny_sd3), *common, *lora, "--out", str(tmp_path / "tuned")]) == 0
    assert len(list((tmp_path / "tuned").rglob("*.png"))) == 2

    (tmp_path / "run.yaml").write_text("{}\n")
    refused = {
        "method.name=inversion_dpo": "DDIM inversion and implied noise are defined on a DDPM schedule",
        "method.name=self_npo": "DDIM teacher rollout and re-noising use the DDPM schedule",
        "method.swap_pairs=true": "Diffusion-NPO's negative model is used only through NPO guidance",
        "method.name=personal_dpo": "user path is an IP-Adapter-style projection in a UNet's cross-attention",
    }
    for override, why in refused.items():
        args = ["validate", str(tmp_path / "run.yaml"), f"model.pretrained={tiny_sd3}", override]
        assert main([*args, "method.user_vectors=u.safetensors"] if "personal" in override else args) == 2
        err = capsys.readouterr().err
        assert why in err and "cannot train model.family=sd3" in err, err


def test_negative_models_and_user_paths_need_a_unet_family():
    """A negative model is only used through NPO guidance, which drives UNet pipelines: refused before training on
    a DDPM transformer (CogVideoX) as on a flow one; the UNet families take it."""
    from mmalign.config import ConfigError
    from mmalign.trainers import load_config

    for family, ok in (("cogvideox", False), ("sd15", True), ("sdxl", True)):
        for override in ("method.name=self_npo", "method.swap_pairs=true"):
            args = [f"model.family={family}", "model.pretrained=some/model", override]
            if ok:
                load_config(None, args)
            else:
                with pytest.raises(ConfigError, match="use a UNet family \\(sd15, sdxl, toy_video\\)"):
                    load_config(None, args)
