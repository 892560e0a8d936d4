"""Personalisation on tiny models: the user path's exactness, the stock-pipeline loader, personal_dpo training,
the VLM encoder's determinism and cache, PAL few-shot fitting, and bad-input errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import assert_only_trainable_changed, card_commands

from mmalign.personalize.attention import (
    add_user_path,
    load_user_adapter,
    save_user_adapter,
    set_user_scale,
    user_added_cond,
    user_embeds_for_pipeline,
    user_path_parameters,
)
from mmalign.personalize.encoders import Shot, embed_users, get_encoder, save_user_vectors

torch.set_num_threads(1)
PAL = "mmalign.personalize.pal:pal_reward"  # = `--reward pal` once the package's entry points are installed


def unet_inputs(unet, b=2):
    g = torch.Generator().manual_seed(0)
    size = unet.config.sample_size
    x = torch.randn(b, 4, size, size, generator=g)
    t = torch.tensor([10, 600][:b])
    e = torch.randn(b, 77, unet.config.cross_attention_dim, generator=g)
    return x, t, e


def sdxl_added(unet, b=2):
    g = torch.Generator().manual_seed(1)
    proj = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    return {
        "text_embeds": torch.randn(b, proj, generator=g),
        "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]] * b),
    }


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_zero_user_vector_and_scale_zero_give_the_base_output_exactly(family, request):
    from diffusers import UNet2DConditionModel

    path = request.getfixturevalue(f"tiny_{family}")
    base = UNet2DConditionModel.from_pretrained(path, subfolder="unet").eval()
    unet = copy.deepcopy(base)
    params = add_user_path(unet, user_dim=8)
    with torch.no_grad():
        for p in params:  # a trained-looking path, so "adds nothing" is not an artefact of the zero init
            p.add_(torch.randn_like(p) * 0.2)
    x, t, e = unet_inputs(unet)
    extra = sdxl_added(unet) if family == "sdxl" else {}
    user = torch.randn(2, 8)
    with torch.no_grad():
        ref = base(x, t, encoder_hidden_states=e, added_cond_kwargs=extra or None).sample
        zero = unet(
            x, t, encoder_hidden_states=e, added_cond_kwargs={**extra, **user_added_cond(torch.zeros(2, 8))}
        ).sample
        with_user = unet(
            x, t, encoder_hidden_states=e, added_cond_kwargs={**extra, **user_added_cond(user)}
        ).sample
        set_user_scale(unet, 0.0)
        scale0 = unet(
            x, t, encoder_hidden_states=e, added_cond_kwargs={**extra, **user_added_cond(user)}
        ).sample
    assert torch.equal(zero, ref) and torch.equal(scale0, ref)
    assert not torch.allclose(with_user, ref)


def test_a_zeroed_user_vector_gives_the_user_path_no_gradient(tiny_sd15):
    """User dropout only thins personal_dpo's batch: a dropped (zero) vector is the reference exactly, so its
    rows move no user-path weight (docs/personalization.md)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    params = add_user_path(unet, user_dim=8)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.2)
    x, t, e = unet_inputs(unet)

    def grads(user):
        for p in params:
            p.grad = None
        unet(
            x, t, encoder_hidden_states=e, added_cond_kwargs=user_added_cond(user)
        ).sample.square().sum().backward()
        return [p.grad for p in params]

    assert all(g is None or not g.any() for g in grads(torch.zeros(2, 8)))
    assert all(g is not None and g.any() for g in grads(torch.randn(2, 8)))


def test_saved_adapter_loads_into_a_stock_pipeline_and_changes_its_output(tiny_sd15, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    params = add_user_path(unet, user_dim=8, seed=1)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.2)
    meta = json.loads(
        (
            save_user_adapter(unet, tmp_path / "adapter", {"encoder": {"encoder": "mean_diff"}})
            / "user_adapter.json"
        ).read_text()
    )
    assert meta["user_dim"] == 8 and "load_ip_adapter" in meta["load"]

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15)
    pipe.set_progress_bar_config(disable=True)

    def sample(**kw):
        return pipe(
            "a red circle",
            num_inference_steps=2,
            height=16,
            width=16,
            output_type="pt",
            guidance_scale=3.0,
            generator=torch.Generator().manual_seed(0),
            **kw,
        ).images

    before = sample()
    load_user_adapter(
        pipe, tmp_path / "adapter"
    )  # = pipe.load_ip_adapter(dir, subfolder="", weight_name=..., image_encoder_folder=None)
    for name, p in pipe.unet.encoder_hid_proj.named_parameters():
        assert torch.equal(p, dict(unet.encoder_hid_proj.named_parameters())[name])
    u = torch.randn(8)
    assert not torch.allclose(sample(ip_adapter_image_embeds=[user_embeds_for_pipeline(u)]), before)
    assert torch.equal(sample(ip_adapter_image_embeds=[user_embeds_for_pipeline(torch.zeros(8))]), before)


def write_user_pairs(root, users=("a", "b", "c"), per_user=4, size=16):
    import numpy as np
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for u in users:
        for i in range(per_user):
            names = []
            for side in ("w", "l"):
                arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / f"{u}{i}{side}.png")
                names.append(f"{u}{i}{side}.png")
            rows.append({"prompt": "a red circle", "chosen": names[0], "rejected": names[1], "user": u})
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "pairs.jsonl"


class PixelMeans:
    """A deterministic stand-in feature backbone for tests: 4x4 mean-pooled pixels."""

    texts = None

    def images(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(x.float(), 4).flatten(1)


def pixel_means():
    return PixelMeans()


@pytest.mark.parametrize("lora", [False, True], ids=["user_path", "user_path+lora"])
def test_personal_dpo_moves_only_user_path_and_lora_weights(lora, tiny_sd15, tmp_path):
    from diffusers import UNet2DConditionModel

    from mmalign.data.pairs import load_pairs
    from mmalign.data.users import decode_shots, user_groups
    from mmalign.trainers import load_config
    from mmalign.trainers.loop import train

    manifest = write_user_pairs(tmp_path / "pairs")
    records, _ = load_pairs(manifest)
    groups, _ = user_groups(records, n=2, max_groups=2)
    enc = get_encoder("mean_diff", features=f"{__name__}:pixel_means")
    vectors, _, _ = embed_users(
        enc, {u: [decode_shots(g) for g in gs] for u, gs in groups.items()}, progress=False
    )
    vec_path = save_user_vectors(tmp_path / "uv.safetensors", vectors, enc)
    cfg = load_config(
        None,
        [
            f"model.pretrained={tiny_sd15}",
            "model.resolution=16",
            f"data.source={manifest}",
            "method.name=personal_dpo",
            f"method.user_vectors={vec_path}",
            "method.user_dropout=0.0",
            f"train.output_dir={tmp_path / 'run'}",
            "train.max_steps=3",
            "train.batch_size=2",
            "train.report_to=none",
            "train.progress=false",
            "train.learning_rate=1e-2",
            "train.scale_lr=false",
            "train.checkpoint_every=0",
            f"lora.enabled={str(lora).lower()}",
            "lora.rank=2",
            "data.random_flip=false",
        ],
    )
    result = train(cfg, keep_initial=True)
    pretrained = dict(UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet").named_parameters())
    user_params = {id(p) for p in user_path_parameters(result.denoiser)}
    for name, p in result.denoiser.named_parameters():
        if p.requires_grad:
            assert id(p) in user_params or "lora" in name, f"{name} should be frozen"
        elif (
            name not in pretrained and name.replace(".base_layer", "") not in pretrained
        ):  # the path's held biases
            assert "bias" in name and not p.detach().any(), name
    user_pretrained = {
        **pretrained,
        **{
            n: p
            for n, p in result.denoiser.named_parameters()
            if n not in pretrained and n.replace(".base_layer", "") not in pretrained
        },
    }
    trainable, _ = assert_only_trainable_changed(result, user_pretrained)
    assert trainable == len(user_params) + (
        sum("lora" in n for n, _ in result.denoiser.named_parameters()) if lora else 0
    )
    export = result.summary["export"]
    assert (tmp_path / "run" / "final" / "user_adapter.safetensors").is_file()
    assert lora == (tmp_path / "run" / "final" / "pytorch_lora_weights.safetensors").is_file(), export
    (generate, _) = card_commands(tmp_path / "run" / "final")  # its model card's lines
    assert generate.user_adapter == "path/to/this/folder"


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    from mmalign.toy.tiny_rewards import build_tiny_vlm

    return build_tiny_vlm(tmp_path_factory.mktemp("tiny-llava"))


def test_vlm_embedding_is_deterministic_and_cached(tiny_vlm, tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    shots = [
        Shot("a red circle", torch.rand(3, 32, 32, generator=g), torch.rand(3, 32, 32, generator=g))
        for _ in range(4)
    ]
    enc = get_encoder("vlm", model=str(tiny_vlm), max_new_tokens=5, device="cpu")
    first = enc.encode(shots)
    assert first.vector.shape == (32,) and isinstance(first.profile, str)
    again = get_encoder("vlm", model=str(tiny_vlm), max_new_tokens=5, device="cpu").encode(
        shots
    )  # loaded afresh
    assert torch.equal(first.vector, again.vector) and first.profile == again.profile
    # the final layer of the last generated token, by hand
    layer2 = get_encoder("vlm", model=str(tiny_vlm), max_new_tokens=5, device="cpu", layer=1).encode(shots)
    assert not torch.equal(layer2.vector, first.vector)

    vectors, profiles, counts = embed_users(
        enc, {"alice": [shots]}, cache_dir=tmp_path / "cache", progress=False
    )
    assert counts == {"encoded": 1, "cached": 0} and torch.equal(vectors["alice"][0], first.vector)
    monkeypatch.setattr(type(enc), "encode", lambda self, s: pytest.fail("the encoder ran on a cached user"))
    vectors2, profiles2, counts2 = embed_users(
        enc, {"alice": [shots]}, cache_dir=tmp_path / "cache", progress=False
    )
    assert counts2 == {"encoded": 0, "cached": 1}
    assert torch.equal(vectors2["alice"], vectors["alice"]) and profiles2 == profiles
    # other shots -> another key: the encoder would run
    other = [Shot("a red circle", s.dispreferred, s.preferred) for s in shots]
    with pytest.raises(pytest.fail.Exception):
        embed_users(enc, {"alice": [other]}, cache_dir=tmp_path / "cache", progress=False)


def test_pal_fitting_recovers_a_planted_user_on_synthetic_features():
    from mmalign.personalize.pal import fit_user, train_pal

    torch.manual_seed(0)
    d, k, n_users, per_user = 12, 3, 30, 60
    directions = torch.nn.functional.normalize(torch.randn(k, d), dim=1)  # 3 planted prototypes
    true_w = torch.distributions.Dirichlet(torch.full((k,), 0.3)).sample((n_users,))

    def pairs_of(w, n, g):
        x1, x2 = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
        pref = (x1 - x2) @ (w @ directions)
        return torch.where(pref[:, None] > 0, x1, x2), torch.where(pref[:, None] > 0, x2, x1)

    g = torch.Generator().manual_seed(1)
    fw, fl, users = [], [], []
    for u in range(n_users):
        a, b = pairs_of(true_w[u], per_user, g)
        fw.append(a)
        fl.append(b)
        users += [u] * per_user
    model = train_pal(
        torch.cat(fw),
        torch.cat(fl),
        torch.ones(len(users), 1),
        torch.tensor(users),
        n_users,
        dim=32,
        k=k,
        epochs=80,
        lr=3e-3,
        progress=False,
    )
    planted = torch.tensor([0.0, 0.0, 1.0])  # a pure third-prototype user, not among the training users
    ta, tb = pairs_of(planted, 400, g)
    ones = torch.ones(400, 1)

    def accuracy(logits):
        with torch.no_grad():
            return (
                (
                    model.score(ta, ones, logits.expand(400, -1))
                    > model.score(tb, ones, logits.expand(400, -1))
                )
                .float()
                .mean()
            )

    a, b = pairs_of(planted, 20, g)
    fitted = fit_user(
        model, a, b, torch.ones(20, 1)
    )  # the released recipe: only K logits, 20 epochs, lr 5e-3
    best = fit_user(model, ta, tb, ones, epochs=50, lr=5e-2, batch_size=50)  # what the head can do at most
    assert accuracy(fitted) > 0.85 and accuracy(fitted) > accuracy(best) - 0.05
    assert accuracy(-fitted) < 0.35  # the opposite mixture prefers the other image


def test_bad_shots_get_one_clear_error(tmp_path, tiny_vlm):
    from mmalign.personalize.shots import ShotsError, read_shots

    manifest = write_user_pairs(tmp_path / "pairs", users=("a", "b"), per_user=4)
    assert len(read_shots(manifest, user="a")) == 4
    with pytest.raises(ShotsError, match="unknown user 'zed'"):
        read_shots(manifest, user="zed")
    with pytest.raises(ShotsError, match="holds the choices of 2 users \\(a, b\\): pick one with --user"):
        read_shots(manifest)  # shots are one person's: two people's are not pooled into one vector
    (tmp_path / "pairs" / "b2w.png").write_bytes(b"not a png")
    with pytest.raises(ShotsError, match=r"pairs.jsonl:7 \(chosen\).*b2w.png"):
        read_shots(manifest, user="b")
    enc = get_encoder("vlm", model=str(tiny_vlm), max_new_tokens=2, device="cpu")
    with pytest.raises(ValueError, match="need at least 1 shot"):
        enc.encode([])


def test_cli_embed_fit_score_and_their_one_line_errors(tmp_path, capsys):
    from mmalign.cli import main
    from mmalign.personalize.encoders import load_user_vectors

    manifest = write_user_pairs(tmp_path / "pairs", users=("a", "b", "c"), per_user=4)
    feats = f"{__name__}:pixel_means"
    out = tmp_path / "uv.safetensors"
    assert (
        main(
            [
                "personalize",
                "embed",
                str(manifest),
                "--encoder",
                "mean_diff",
                "--encoder-arg",
                f"features={feats}",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    vectors, fp = load_user_vectors(out)
    assert set(vectors) == {"a", "b", "c"} and vectors["a"].shape == (1, 48) and fp["encoder"] == "mean_diff"
    assert '"cached": 0' in capsys.readouterr().out
    assert (
        main(
            [
                "personalize",
                "embed",
                str(manifest),
                "--encoder-arg",
                f"features={feats}",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    assert '"encoded": 0, "cached": 3' in capsys.readouterr().out  # second run: no encoder call

    # too few shots: a clear error, or a counted skip when asked
    assert (
        main(
            [
                "personalize",
                "embed",
                str(manifest),
                "--encoder-arg",
                f"features={feats}",
                "--out",
                str(out),
                "--shots",
                "5",
                "--quiet",
            ]
        )
        == 2
    )
    assert (
        "user 'a': 4 usable (labelled, non-tie) pair(s), fewer than the 5 shots needed"
        in capsys.readouterr().err
    )
    assert (
        main(
            [
                "personalize",
                "embed",
                str(manifest),
                "--encoder-arg",
                f"features={feats}",
                "--out",
                str(out),
                "--shots",
                "5",
                "--on-too-few",
                "skip",
                "--user",
                "a",
                "--quiet",
            ]
        )
        == 2
    )
    assert "no user has 5 usable pairs (1 user(s) skipped)" in capsys.readouterr().err

    # the PAL head: fit, per-user score (seen user and a new user's shots), label for one person
    head = tmp_path / "head"
    assert (
        main(
            [
                "personalize",
                "fit",
                str(manifest),
                "--features",
                feats,
                "--out",
                str(head),
                "--k",
                "2",
                "--dim",
                "8",
                "--epochs",
                "2",
                "--quiet",
            ]
        )
        == 0
    )
    scores = tmp_path / "scores.jsonl"
    assert (
        main(
            [
                "score",
                str(manifest),
                "--reward",
                PAL,
                "--reward-arg",
                f"head={head}",
                "--user",
                "b",
                "--out",
                str(scores),
                "--quiet",
            ]
        )
        == 0
    )
    rows = [json.loads(x) for x in scores.read_text().splitlines()]
    assert len(rows) == 12 and all("pal" in json.dumps(r) for r in rows)
    assert (
        main(
            [
                "score",
                str(manifest),
                "--reward",
                PAL,
                "--reward-arg",
                f"head={head}",
                "--user",
                "zed",
                "--out",
                str(tmp_path / "s2.jsonl"),
                "--quiet",
            ]
        )
        == 2
    )
    assert "unknown user 'zed'" in capsys.readouterr().err
    shots = tmp_path / "pairs" / "pairs.jsonl"
    assert (
        main(
            [
                "score",
                str(manifest),
                "--reward",
                PAL,
                "--reward-arg",
                f"head={head}",
                "--user-shots",
                str(shots),
                "--user",
                "c",
                "--out",
                str(tmp_path / "s3.jsonl"),
                "--quiet",
            ]
        )
        == 0
    )

    # a corrupt image among the shots is named
    (tmp_path / "pairs" / "c1l.png").write_bytes(b"broken")
    capsys.readouterr()
    assert (
        main(
            [
                "personalize",
                "embed",
                str(manifest),
                "--encoder-arg",
                f"features={feats}",
                "--out",
                str(out),
                "--no-cache",
                "--quiet",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pairs.jsonl:10 (rejected" in err and "c1l.png" in err, err


def test_generate_for_a_new_person_from_their_shots_and_for_a_known_user(tiny_sd15, tmp_path, capsys):
    from diffusers import UNet2DConditionModel

    from mmalign.cli import main

    manifest = write_user_pairs(tmp_path / "pairs", users=("a", "b"), per_user=4)
    enc = get_encoder("mean_diff", features=f"{__name__}:pixel_means")
    unet = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    with torch.no_grad():
        for p in add_user_path(unet, user_dim=48):
            p.add_(torch.randn_like(p) * 0.3)
    save_user_adapter(unet, tmp_path / "adapter", {"encoder": enc.fingerprint()})
    common = [
        "generate",
        "--model",
        str(tiny_sd15),
        "--prompt",
        "a red circle",
        "--steps",
        "2",
        "--height",
        "16",
        "--width",
        "16",
        "--guidance",
        "3",
    ]
    assert main([*common, "--out", str(tmp_path / "base")]) == 0
    assert (
        main(
            [
                *common,
                "--out",
                str(tmp_path / "a"),
                "--user-adapter",
                str(tmp_path / "adapter"),
                "--user-shots",
                str(manifest),
                "--user",
                "a",
            ]
        )
        == 0
    )
    from mmalign.rewards.score import load_media

    base, _ = load_media(tmp_path / "base" / "00000.png")
    mine, _ = load_media(tmp_path / "a" / "00000.png")
    assert not torch.equal(base, mine)
    vec_path = save_user_vectors(tmp_path / "uv.safetensors", {"a": torch.randn(2, 48)}, enc)
    assert (
        main(
            [
                *common,
                "--out",
                str(tmp_path / "k"),
                "--user-adapter",
                str(tmp_path / "adapter"),
                "--user",
                f"{vec_path}:a",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        main(
            [
                *common,
                "--out",
                str(tmp_path / "k"),
                "--user-adapter",
                str(tmp_path / "adapter"),
                "--user",
                f"{vec_path}:nobody",
            ]
        )
        == 2
    )
    assert "unknown user 'nobody'" in capsys.readouterr().err
