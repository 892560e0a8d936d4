"""Wan 2.2 on tiny pipelines: an A14B run trains one expert on its own timesteps; TI2V-5B trains as Wan 2.1 does."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_only_trainable_changed, card_code
from test_dense_dpo_train import video_cfg, write_video_pairs

from mmalign.config import ConfigError
from mmalign.pipelines import load_model, load_pipeline, make_adapter
from mmalign.trainers.loop import train

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def a14b(tmp_path_factory):
    from mmalign.toy.tiny import build_tiny_wan

    path = tmp_path_factory.mktemp("tiny-wan22-a14b")
    build_tiny_wan(path, variant="2.2-a14b")
    return path


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_video_pairs(tmp_path_factory.mktemp("wan22-pairs"), frames=9)


def model_cfg(path, *extra):
    from mmalign.trainers import load_config

    return load_config(None, [f"model.pretrained={path}", "method.name=dense_dpo", *extra]).model


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal"])
def test_each_expert_loads_alone_and_draws_its_own_timesteps(a14b, sampling):
    """The pipeline switches experts at t = 875 (transformer above); an expert's draws are the full-range
    distribution conditioned on its range: the same quantiles as full-range draws that fall there."""
    full = make_adapter(load_pipeline(str(a14b))[0], "wan", timestep_sampling=sampling)
    g = torch.Generator().manual_seed(0)
    ref = full.sample_timesteps(200_000, g, torch.device("cpu"))
    q = torch.linspace(0.05, 0.95, 19)
    for expert, name, other in [
        ("high_noise", "transformer", "transformer_2"),
        ("low_noise", "transformer_2", "transformer"),
    ]:
        opts = f"model.adapter_options={{expert: {expert}, timestep_sampling: {sampling}}}"
        pipe, _, adapter = load_model(model_cfg(a14b, opts))
        assert adapter.denoiser_name == name and getattr(pipe, name) is not None
        assert getattr(pipe, other) is None  # the expert a run does not train is not loaded
        t = adapter.sample_timesteps(20_000, torch.Generator().manual_seed(1), torch.device("cpu"))
        inside = (t >= 875) if expert == "high_noise" else (t < 875)
        assert inside.all()
        kept = ref[(ref >= 875) if expert == "high_noise" else (ref < 875)]
        assert torch.allclose(t.quantile(q), kept.quantile(q), atol=4.0)  # timesteps in [0, 1000]


def test_a14b_runs_are_refused_unless_they_name_one_expert(a14b, tmp_path, capsys):
    """From model_index.json alone (`mmalign validate`, before a job is queued) and again on the loaded pipeline
    (the loop): an A14B run names one expert; a Wan 2.1 run names none."""
    from mmalign.cli import main
    from mmalign.pipelines.wan import WanAdapter
    from mmalign.toy.tiny import build_tiny_wan
    from mmalign.trainers import load_config

    pipe, _, _ = load_model(model_cfg(a14b))
    base = [f"model.pretrained={a14b}", "method.name=dense_dpo"]
    expert = [*base, "model.adapter_options={expert: high_noise}"]
    no_expert = "two-expert Wan 2.2 pipeline .*adapter_options.expert=high_noise or low_noise"
    for index in (dict(pipe.config), json.loads((a14b / "model_index.json").read_text())):
        with pytest.raises(ConfigError, match=no_expert):
            WanAdapter.check_config(index, load_config(None, base))
        WanAdapter.check_config(index, load_config(None, expert))
    (tmp_path / "run.yaml").write_text("{}\n")
    assert main(["validate", str(tmp_path / "run.yaml"), *base]) == 2
    assert "transformer_2 below): train one per run" in capsys.readouterr().err
    assert main(["validate", str(tmp_path / "run.yaml"), *expert]) == 0

    build_tiny_wan(tmp_path / "wan21")
    one = make_adapter(load_pipeline(str(tmp_path / "wan21"))[0], "wan", expert="low_noise")
    assert one.denoiser_name == "transformer" and one.t_range == (0.0, 1000)
    wan21 = [
        f"model.pretrained={tmp_path / 'wan21'}",
        "method.name=dense_dpo",
        "model.adapter_options={expert: low_noise}",
    ]
    with pytest.raises(ConfigError, match="expert=low_noise is for a two-expert Wan 2.2 A14B pipeline"):
        WanAdapter.check_config(dict(one.pipeline.config), load_config(None, wan21))
    assert main(["validate", str(tmp_path / "run.yaml"), *wan21]) == 2


def test_an_expert_runs_validation_with_the_other_expert_from_the_base(a14b, pairs, tmp_path, monkeypatch):
    """Sampling needs both experts: the first validation grid loads the one the run does not train (frozen, from
    the base pipeline, once), so the step-0 clips are the base pipeline's own; later grids show the trained expert."""
    from mmalign.pipelines.runtime import load_for_inference
    from mmalign.trainers import loop

    grids = {}
    real_log = loop.log_validation

    def log(accelerator, media, prompts, step, path):
        grids[step] = media
        real_log(accelerator, media, prompts, step, path)

    monkeypatch.setattr(loop, "log_validation", log)
    loads = []
    real_load = loop.load_unused
    monkeypatch.setattr(loop, "load_unused", lambda *a, **k: loads.append(real_load(*a, **k)) or loads[-1])
    cfg = video_cfg(
        a14b,
        pairs,
        tmp_path / "run",
        "model.adapter_options={expert: low_noise}",
        "method.num_frames=9",
        "train.learning_rate=3e-2",
        "train.max_steps=2",
        "train.validation_every=1",
        "train.validation_prompts=[a red circle]",
        "train.validation_steps=2",  # t = 1000 (high-noise expert), then 47 (the trained low-noise one)
        "train.validation_guidance=1.0",
    )
    result = train(cfg)
    assert sorted(grids) == [0, 1, 2] and loads == [["transformer"], [], []]
    assert result.pipeline.transformer is not None and not result.pipeline.transformer.training

    base, _, _ = load_model(model_cfg(a14b))
    adapter = make_adapter(base, "wan", expert="low_noise")
    clip = {"num_frames": 9, "height": 16, "width": 16}
    before = loop.sample_validation(base, base.transformer_2, adapter, cfg.train, **clip)
    assert grids[0].shape == before.shape == (1, 9, 3, 16, 16)
    assert torch.allclose(grids[0], before, atol=1e-6)  # the LoRA starts at zero: the base pipeline's clip
    # later grids sample with the trained expert: its exported LoRA loaded into the base pipeline gives them
    tuned, _, _ = load_for_inference(str(a14b), lora=str(tmp_path / "run" / "final"), device="cpu")
    after = loop.sample_validation(tuned, tuned.transformer_2, adapter, cfg.train, **clip)
    assert torch.allclose(grids[2], after, atol=1e-6) and not torch.equal(grids[2], grids[0])
    assert sorted(p.name for p in (tmp_path / "run" / "validation").glob("*.png")) == [
        f"step-{n:06d}.png" for n in (0, 1, 2)
    ]


def test_cache_encodes_an_a14b_without_reading_either_expert(a14b, pairs, tmp_path, monkeypatch):
    """`mmalign cache` needs neither 14B expert (57 GB each in fp32): both are built from their configs, empty,
    whether or not the recipe names one."""
    from diffusers import WanTransformer3DModel

    from mmalign.cli import main

    def no_weights(*args, **kwargs):
        raise AssertionError("mmalign cache read an expert's weights")

    (tmp_path / "cfg.yaml").write_text("method:\n  name: dense_dpo\n  num_frames: 9\n")
    common = [f"model.pretrained={a14b}", "model.resolution=16", f"data.source={pairs}", "data.cache=true"]
    with monkeypatch.context() as patch:
        patch.setattr(WanTransformer3DModel, "from_pretrained", no_weights)
        for expert in ([], ["model.adapter_options={expert: low_noise}"]):
            cache = f"data.cache_dir={tmp_path / 'cache' / str(len(expert))}"
            assert (
                main(["cache", str(tmp_path / "cfg.yaml"), *common, *expert, cache, "--device", "cpu"]) == 0
            )
    assert list((tmp_path / "cache").rglob("*.safetensors"))


def test_low_noise_expert_trains_exports_and_loads_into_transformer_2(a14b, pairs, tmp_path):
    """Only transformer_2's LoRA moves; the export loads back into transformer_2 (lora_target.json), so sampling
    with it changes only the steps below the boundary."""
    from diffusers import WanTransformer3DModel

    from mmalign.pipelines.runtime import load_for_inference, sample

    cfg = video_cfg(
        a14b,
        pairs,
        tmp_path / "run",
        "model.adapter_options={expert: low_noise}",
        "method.num_frames=9",
        "train.learning_rate=3e-2",
        "train.max_steps=2",
    )
    result = train(cfg, keep_initial=True)
    assert result.denoiser is result.pipeline.transformer_2 and result.pipeline.transformer is None
    start = dict(WanTransformer3DModel.from_pretrained(a14b, subfolder="transformer_2").named_parameters())
    trainable, frozen = assert_only_trainable_changed(result, start)
    assert trainable > 0 and frozen > 0
    final = tmp_path / "run" / "final"
    assert (final / "lora_target.json").is_file()
    card = card_code(final)["pipe"]  # the model card's lines load it into transformer_2
    assert any("lora" in n for n, _ in card.transformer_2.named_parameters())
    assert not any("lora" in n for n, _ in card.transformer.named_parameters())

    pipe, _, _ = load_for_inference(str(a14b), lora=str(final), device="cpu")
    assert not any("lora" in n for n, _ in pipe.transformer.named_parameters())
    assert any("lora" in n for n, _ in pipe.transformer_2.named_parameters())
    base, _, _ = load_for_inference(str(a14b), device="cpu")
    kw = dict(steps=1, height=16, width=16, num_frames=9, guidance=1.0, progress=False)
    # FlowMatchEuler at shift 7: 1 step is t = 1000 only (the high-noise expert); the LoRA is not used
    assert torch.equal(sample(pipe, ["a red circle"], [0], **kw), sample(base, ["a red circle"], [0], **kw))
    kw["steps"] = 2  # t = 1000, 47: the second step is the low-noise expert's, with its LoRA
    low_only = sample(pipe, ["a red circle"], [0], **kw)
    assert not torch.equal(low_only, sample(base, ["a red circle"], [0], **kw))

    # the other expert's run too, and both LoRAs at once (generate/eval --lora A --lora B): each in its expert
    high = tmp_path / "high"
    train(video_cfg(a14b, pairs, high, "model.adapter_options={expert: high_noise}", "method.num_frames=9"))
    both, _, _ = load_for_inference(str(a14b), lora=[str(high / "final"), str(final)], device="cpu")
    assert both.get_list_adapters() == {"transformer": ["lora_0"], "transformer_2": ["lora_1"]}
    high_only, _, _ = load_for_inference(str(a14b), lora=str(high / "final"), device="cpu")
    two = sample(both, ["a red circle"], [0], **kw)
    assert not torch.equal(two, low_only)
    assert not torch.equal(two, sample(high_only, ["a red circle"], [0], **kw))
    kw["steps"] = 1  # the high-noise expert alone: its LoRA, as loaded by itself
    assert torch.equal(
        sample(both, ["a red circle"], [0], **kw), sample(high_only, ["a red circle"], [0], **kw)
    )


def test_ti2v_5b_trains_like_wan21(tmp_path):
    """48-channel VAE with 16x spatial compression; its pipeline's per-token timesteps equal one per clip."""
    from mmalign.toy.tiny import build_tiny_wan

    build_tiny_wan(tmp_path / "5b", variant="2.2-ti2v-5b")
    pipe, family = load_pipeline(str(tmp_path / "5b"))
    adapter = make_adapter(pipe, family)
    assert pipe.config.expand_timesteps and adapter.denoiser_name == "transformer"
    from mmalign.pipelines import clip_fps

    assert clip_fps("wan", None, str(tmp_path / "5b")) == 24.0  # generate/eval: TI2V-5B clips play at 24 fps
    clip = torch.rand(1, 9, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x0 = adapter.encode_media(clip)
    assert x0.shape == (1, 48, 3, 2, 2)
    cond = adapter.encode_prompts(["a red circle"])
    t = torch.tensor([700.0])
    per_clip = adapter.predict(pipe.transformer, x0, t, cond)
    tokens = 3 * 1 * 1  # latent frames x (h / 2) x (w / 2) patches, as WanPipeline expands them
    per_token = adapter.predict(pipe.transformer, x0, t[:, None].expand(1, tokens), cond)
    assert torch.allclose(per_clip, per_token, atol=1e-5)
    pairs = write_video_pairs(tmp_path / "pairs", frames=9, size=32)
    cfg = video_cfg(tmp_path / "5b", pairs, tmp_path / "run", "model.resolution=32", "method.num_frames=9")
    result = train(cfg, keep_initial=True)
    trainable, _ = assert_only_trainable_changed(result, dict(pipe.transformer.named_parameters()))
    assert trainable > 0


def test_guidance_2_sets_the_low_noise_experts_scale_and_only_there(a14b, tiny_sd15, tmp_path, capsys):
    import json

    from mmalign.cli import main
    from mmalign.rewards.score import load_media

    args = ["generate", "--model", str(a14b), "--prompt", "a red circle", "--num-frames", "9"]
    args += [
        "--height",
        "16",
        "--width",
        "16",
        "--steps",
        "2",
        "--guidance",
        "4",
    ]  # t = 1000 (high), 47 (low)
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    assert main([*args, "--guidance-2", "1.5", "--out", str(tmp_path / "two")]) == 0
    one, two = (load_media(tmp_path / d / "00000.mp4")[0] for d in ("one", "two"))
    assert not torch.equal(one, two)
    assert json.loads((tmp_path / "two" / "manifest.jsonl").read_text().splitlines()[0])["guidance_2"] == 1.5
    capsys.readouterr()
    one_denoiser = ["generate", "--model", str(tiny_sd15), "--prompt", "a red circle", "--guidance-2", "3"]
    assert main([*one_denoiser, "--out", str(tmp_path / "sd")]) == 2
    assert "has one denoiser: use --guidance" in capsys.readouterr().err
