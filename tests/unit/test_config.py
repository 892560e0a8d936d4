"""Config loading: YAML -> dataclasses, overrides, unknown keys, cross-field checks, shipped recipes."""

from pathlib import Path

import pytest

from mmalign.cli import main
from mmalign.commands.train import shipped_configs
from mmalign.config import ConfigError, RunConfig
from mmalign.trainers import load_config

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_defaults_follow_the_papers():
    cfg = load_config(None)
    assert isinstance(cfg, RunConfig)
    assert cfg.method.name == "diffusion_dpo" and cfg.method.beta == 5000
    assert cfg.data.caption_dropout == 0.2 and cfg.data.keep_ties is False
    assert cfg.train.learning_rate == 1e-8 and cfg.train.scale_lr


def test_overrides_and_yaml_number_quirks(tmp_path):
    path = write(tmp_path, "train:\n  learning_rate: 1e-5\n  max_steps: 10\nmethod:\n  beta: 2000\n")
    cfg = load_config(path, ["train.max_steps=20", "method.loss_type=hinge", "lora.enabled=false"])
    assert cfg.train.learning_rate == pytest.approx(1e-5)  # PyYAML reads 1e-5 as a string; we coerce
    assert cfg.train.max_steps == 20 and cfg.method.beta == 2000.0
    assert cfg.method.loss_type == "hinge" and cfg.lora.enabled is False


@pytest.mark.parametrize(
    "text, key, suggestion",
    [
        ("train:\n  max_step: 5\n", "train.max_step", "max_steps"),
        ("trian:\n  max_steps: 5\n", "trian", "train"),
        ("method:\n  name: diffusion_dpo\n  bata: 5\n", "method.bata", "beta"),
    ],
)
def test_unknown_key_names_key_and_closest(tmp_path, text, key, suggestion):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    assert f"'{key}'" in str(err.value) and f"'{suggestion}'" in str(err.value)


def test_wrong_types_and_cross_field_checks(tmp_path):
    with pytest.raises(ConfigError, match="train.max_steps: expected an integer"):
        load_config(None, ["train.max_steps=lots"])
    with pytest.raises(ConfigError, match="validation_prompts"):
        load_config(None, ["train.validation_every=10"])
    with pytest.raises(ConfigError, match="divergence"):
        load_config(None, ["method.loss_type=hinge", "method.divergence=js"])
    with pytest.raises(ConfigError, match="not a method.*diffusion_dpo"):
        load_config(None, ["method.name=diffusion_dop"])


def test_validate_cli_exit_codes(tmp_path, capsys):
    good = ROOT / "configs/sdxl/diffusion_dpo_lora.yaml"
    assert main(["validate", str(good), "train.max_steps=2000", "method.beta=5000"]) == 0
    bad = write(tmp_path, "train:\n  max_stepz: 5\n")
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "train.max_stepz" in err and "max_steps" in err
    # a model or data path that is not here is a note (the recipe may be checked on another machine), not an error
    assert (
        main(["validate", str(good), "model.pretrained=sd15-typo", f"data.source={tmp_path / 'pairs.jsonl'}"])
        == 0
    )
    err = capsys.readouterr().err
    assert "note: model.pretrained=sd15-typo is not here and is not a Hub id" in err
    assert f"note: data.source={tmp_path / 'pairs.jsonl'} is not here" in err
    assert main(["validate", str(good), f"data.source={tmp_path}"]) == 0  # a hub id and a folder that exists
    assert "note:" not in capsys.readouterr().err


def test_ls_lists_methods_families_and_configs(capsys):
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    assert "diffusion_dpo" in out and "sdxl" in out and "configs/sd15/diffusion_dpo.yaml" in out


RECIPES = [p for p in shipped_configs() if p.parent.name not in ("accelerate", "rewards")]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_recipe_loads(path):
    cfg = load_config(path)
    assert cfg.method.name


def test_every_image_recipe_reads_the_pair_manifest_that_label_writes(pair_manifest):
    """The README's chain: `mmalign cp sdxl/diffusion_dpo_lora.yaml` then `train ... data.source=pairs.jsonl`.
    The Pick-a-Pic recipes once set data.format=pickapic, which refused the manifest."""
    from mmalign.data.pairs import load_pairs

    recipes = [p for p in RECIPES if p.parent.name in ("sd15", "sdxl")]
    assert len(recipes) >= 8
    for path in recipes:
        cfg = load_config(path, [f"data.source={pair_manifest}"])
        records, counts = load_pairs(cfg.data.source, format=cfg.data.format)
        assert len(records) == counts["rows"] == 4, path


@pytest.mark.parametrize(
    "path", [p for p in shipped_configs() if p.parent.name == "accelerate"], ids=lambda p: p.name
)
def test_every_accelerate_config_loads(path):
    from accelerate.commands.config.config_args import ClusterConfig

    cfg = ClusterConfig.from_yaml_file(str(path))
    assert cfg.num_processes >= 1


def test_yaml_1_1_booleans_read_as_users_mean_them(tmp_path):
    """`no` is accelerate's spelling of mixed_precision off; YAML 1.1 read it as False and the key refused it.
    Strings stay strings; boolean keys still take yes/no/on/off."""
    from mmalign.trainers import load_config as load_run_config

    cfg = load_run_config(None, ["train.mixed_precision=no", "lora.enabled=no", "train.progress=off"])
    assert cfg.train.mixed_precision == "no" and cfg.lora.enabled is False and cfg.train.progress is False
    (tmp_path / "r.yaml").write_text("train:\n  mixed_precision: no\n  overwrite: yes\n  scale_lr: False\n")
    cfg = load_run_config(tmp_path / "r.yaml")
    assert cfg.train.mixed_precision == "no" and cfg.train.overwrite is True and cfg.train.scale_lr is False
