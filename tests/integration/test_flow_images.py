"""The image flow families on tiny pipelines of the real classes: Stable Diffusion 3 / 3.5 (an MMDiT with three text
encoders) and FLUX.1 (packed 2x2 latent tokens, distilled guidance input). Each adapter predicts what its pipeline
samples with, and Diffusion-DPO (Flow-DPO) trains, exports and loads."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_only_trainable_changed, card_code
from test_train_diffusion_dpo import tiny_cfg

from mmalign.data.manifest import read_manifest
from mmalign.pipelines import PipelineAdapter, load_pipeline, make_adapter
from mmalign.pipelines.flux import pack_latents, unpack_latents
from mmalign.trainers.loop import train

torch.set_num_threads(1)

FAMILIES = ["sd3", "flux"]


@pytest.fixture(scope="module")
def tiny_flow(tmp_path_factory):
    """family -> a tiny pipeline folder, built once per module."""
    from mmalign.toy.tiny import build_tiny_flux, build_tiny_sd3

    builders = {"sd3": build_tiny_sd3, "flux": build_tiny_flux}
    paths = {}
    for family, build in builders.items():
        paths[family] = tmp_path_factory.mktemp(f"tiny-{family}")
        build(paths[family])
    return paths


@pytest.mark.parametrize("family", FAMILIES)
def test_the_adapter_predicts_what_the_pipeline_samples_with(family, tiny_flow):
    """One Euler step from t = 1000 (sigma 1) is x - v: the pipeline's own step equals the adapter's prediction,
    so its text conditioning, timestep scale, latent layout (FLUX: packed tokens and their position ids) and
    guidance input are the pipeline's. The latent scaling inverts the pipeline's decode, and the timesteps follow
    the family's distribution."""
    pipe, loaded = load_pipeline(str(tiny_flow[family]))
    adapter = make_adapter(pipe, loaded)
    assert loaded == family and isinstance(adapter, PipelineAdapter)
    assert len(adapter.text_encoders) == {"sd3": 3, "flux": 2}[family]

    prompts = ["a red circle", "a blue square"]
    cond = adapter.encode_prompts(prompts)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    v = adapter.predict(pipe.transformer, noise, torch.full((2,), 1000.0), cond)
    pipe.set_progress_bar_config(disable=True)
    stepped = pipe(
        prompts,
        num_inference_steps=1,
        guidance_scale={"sd3": 1.0, "flux": 3.5}[family],  # SD3: no CFG; FLUX: its distilled guidance input
        latents=pack_latents(noise) if family == "flux" else noise,
        height=16,
        width=16,
        output_type="latent",
        max_sequence_length=adapter.max_text_len,
    ).images
    if family == "flux":
        stepped = unpack_latents(stepped, 8, 8)
    assert torch.allclose(stepped, noise - v, atol=1e-5)
    if family == "flux":  # another guidance input gives another prediction: the adapter passes its own
        adapter.guidance = 1.0
        assert not torch.allclose(adapter.predict(pipe.transformer, noise, torch.full((2,), 1000.0), cond), v)

    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mean, std = adapter.latent_moments(pixels)
    latents = adapter.latents_from_moments(mean, torch.zeros_like(std))
    vae = pipe.vae
    assert torch.allclose(latents / vae.config.scaling_factor + vae.config.shift_factor, mean, atol=1e-6)

    t = adapter.sample_timesteps(20_000, torch.Generator().manual_seed(2), torch.device("cpu"))
    assert 0 < t.min() and t.max() < 1000
    if family == "sd3":  # logit-normal u, median 1/2; SD3's shift 3 maps it to 3 * 0.5 / (1 + 2 * 0.5) = 0.75
        assert adapter.shift == 3.0 and abs(t.median().item() - 750) < 10
    else:  # u ~ U(0, 1), unshifted (FLUX's scheduler shifts by image size when sampling, diffusers' script does not)
        assert adapter.shift == 1.0 and abs(t.median().item() - 500) < 10 and abs(t.mean().item() - 500) < 10


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("family", FAMILIES)
def test_flow_dpo_trains_only_the_transformer_and_the_export_loads(
    family, lora, tiny_flow, pair_manifest, tmp_path
):
    import diffusers

    model = tiny_flow[family]
    cfg = tiny_cfg(
        model,
        pair_manifest,
        tmp_path / "run",
        f"lora.enabled={str(lora).lower()}",
        "method.beta=100",
        "train.learning_rate=5e-2" if lora else "train.learning_rate=1e-3",
        # the joint attention's text-side projections too (the recipes' targets); not add_q_proj / to_add_out: in
        # the tiny SD3's single (last) block the text tokens' outputs are dropped, so those get no gradient
        "lora.target_modules=[to_q, to_k, to_v, to_out.0, add_k_proj, add_v_proj]",
    )
    result = train(cfg, keep_initial=True)
    cls = {"sd3": diffusers.SD3Transformer2DModel, "flux": diffusers.FluxTransformer2DModel}[family]
    start = dict(cls.from_pretrained(model, subfolder="transformer").named_parameters())
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

    base, _ = load_pipeline(str(model))
    tuned = card_code(tmp_path / "run" / "final")["pipe"]  # the model card's own loading lines
    trained = result.pipeline  # the trained network itself, as training left it
    trained.transformer = result.denoiser.eval()
    # the export is the trained model (an SD3 LoRA once lost its to_q/k/v/out weights on loading: "tuned != base"
    # still held through the add_*_proj ones)
    assert torch.allclose(sample(tuned), sample(trained), atol=1e-5)
    assert not torch.allclose(sample(tuned), sample(base))
    if lora:
        base.load_lora_weights(str(tmp_path / "run" / "final"))
        assert torch.equal(sample(base), sample(tuned))


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_samples_with_the_trained_lora_and_ddpm_methods_are_refused(
    family, tiny_flow, pair_manifest, tmp_path, capsys
):
    from mmalign.cli import main

    tiny = tiny_flow[family]
    train(tiny_cfg(tiny, pair_manifest, tmp_path / "run", "train.max_steps=1"))
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
    assert main(["generate", "--model", str(tiny), *common, "--out", str(tmp_path / "base")]) == 0
    lora = ["--lora", str(tmp_path / "run" / "final")]
    assert main(["generate", "--model", str(tiny), *common, *lora, "--out", str(tmp_path / "tuned")]) == 0
    assert len(list((tmp_path / "tuned").rglob("*.png"))) == 2
    (tmp_path / "neg.csv").write_text("prompt,negative_prompt\na red circle,blurry\n")
    neg = ["generate", "--model", str(tiny), "--prompts", str(tmp_path / "neg.csv"), *common[2:]]
    assert main([*neg, "--out", str(tmp_path / "neg")]) == 0
    (row,) = read_manifest(tmp_path / "neg" / "manifest.jsonl")
    if family == "flux":  # FluxPipeline ignores them without true CFG: not recorded as used, and said so
        assert row.negative_prompt == "" and "samples without negative prompts" in capsys.readouterr().err
    else:
        assert row.negative_prompt == "blurry"

    (tmp_path / "run.yaml").write_text("{}\n")
    refused = {
        "method.name=inversion_dpo": "DDIM inversion and implied noise are defined on a DDPM schedule",
        "method.name=self_npo": "DDIM teacher rollout and re-noising use the DDPM schedule",
        "method.swap_pairs=true": "Diffusion-NPO's negative model is used only through NPO guidance",
        "method.name=personal_dpo": "user path is an IP-Adapter-style projection in a UNet's cross-attention",
    }
    for override, why in refused.items():
        args = ["validate", str(tmp_path / "run.yaml"), f"model.pretrained={tiny}", override]
        assert main([*args, "method.user_vectors=u.safetensors"] if "personal" in override else args) == 2
        err = capsys.readouterr().err
        assert why in err and f"cannot train model.family={family}" in err, err


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


def test_an_sd3_resolution_past_its_position_grid_is_a_config_error(tiny_flow, pair_manifest, tmp_path):
    """SD3's MMDiT embeds at most pos_embed_max_size patches a side: a larger model.resolution was a ValueError
    inside step 1's forward (exit 3 with a log); it is refused once the model is loaded, naming the limit."""
    import json

    from mmalign.config import ConfigError

    model = tiny_flow["sd3"]
    transformer = json.loads((model / "transformer" / "config.json").read_text())
    vae_scale = 2 ** (len(json.loads((model / "vae" / "config.json").read_text())["block_out_channels"]) - 1)
    largest = transformer["pos_embed_max_size"] * transformer["patch_size"] * vae_scale
    with pytest.raises(ConfigError, match=rf"model.resolution={2 * largest}: .*at most {largest} px"):
        train(tiny_cfg(model, pair_manifest, tmp_path / "run", f"model.resolution={2 * largest}"))
