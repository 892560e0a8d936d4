"""Registry, dotted paths, RewardSpec parsing and the shipped reward configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mmalign.rewards as rewards
from mmalign.rewards import REWARDS, RewardSpec, all_rewards, describe_rewards, get_reward, list_rewards

ROOT = Path(__file__).resolve().parents[2]


def make_constant_reward(value: float = 1.0):
    """A test factory reachable through a dotted path."""
    return lambda media, prompts: torch.full((media.shape[0],), value)


def test_registry_is_a_plain_dict_of_resolvable_factories():
    assert type(REWARDS) is dict
    for name, target in REWARDS.items():
        assert callable(rewards._resolve(target)), name
    assert list_rewards() == sorted(all_rewards())
    described = dict(describe_rewards())
    assert set(described) == set(all_rewards())
    assert all(described[n] for n in ("pickscore", "hpsv2", "aesthetic", "vlm_judge", "hybrid"))


def test_toy_rewards_come_from_the_entry_point_group_not_the_library():
    plugins = rewards.plugin_rewards()
    assert {"toy_color", "toy_defect", "toy_flicker"} <= set(plugins)
    assert not any(str(target).startswith("mmalign.toy") for target in REWARDS.values())
    assert callable(get_reward("toy_color"))


def test_get_reward_by_name_and_dotted_path():
    x = torch.rand(3, 3, 8, 8)
    assert torch.allclose(
        get_reward("brightness")(x, [""] * 3), x.mean((2, 3)) @ torch.tensor([0.299, 0.587, 0.114])
    )
    r = get_reward(f"{__name__}:make_constant_reward", value=2.5)
    assert torch.equal(r(x, [""] * 3), torch.full((3,), 2.5))


def test_unknown_reward_suggests_close_name():
    with pytest.raises(KeyError, match="pickscore"):
        get_reward("pickscor")
    with pytest.raises(ValueError, match="no 'nope'"):
        get_reward("mmalign.rewards.rules:nope")


def test_reward_spec_from_dict_validates():
    spec = RewardSpec.from_dict({"name": "contrast", "weight": 2, "kwargs": {"target": 0.2}})
    assert spec == RewardSpec("contrast", 2.0, {"target": 0.2})
    assert RewardSpec.from_dict("sharpness").weight == 1.0
    with pytest.raises(ValueError, match="unknown reward spec key"):
        RewardSpec.from_dict({"name": "contrast", "wieght": 2})
    r = spec.build()
    x = torch.full((1, 3, 4, 4), 0.5)
    assert torch.allclose(r(x, [""]), torch.tensor([-0.2]))  # -|0 - 0.2|


RULES = {
    "brightness",
    "saturation",
    "contrast",
    "sharpness",
    "colorfulness",
    "color_match",
    "jpeg_size",
    "jpeg_compressibility",
    "resolution",
    "aspect_ratio",
    "duration",
    "frame_rate",
    "flicker",
    "motion",
}


def _names(spec: RewardSpec) -> set[str]:
    members = spec.kwargs.get("members") or []
    if spec.name in ("hybrid", "ensemble"):
        return set().union(
            *(
                _names(
                    RewardSpec.from_dict(
                        m if isinstance(m, str) else {k: m[k] for k in ("name", "kwargs") if k in m}
                    )
                )
                for m in members
            )
        )
    return {spec.name}


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "rewards").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_reward_configs_load(path):
    import yaml

    from mmalign.rewards.score import load_reward_config

    data = yaml.safe_load(path.read_text())
    specs = [RewardSpec.from_dict(s) for s in data["rewards"]]
    assert specs
    for spec in specs:
        assert spec.name in all_rewards() or ":" in spec.name
    assert data.get("combine") in (None, "hybrid", "ensemble")
    names = set().union(*(_names(s) for s in specs))
    assert names <= set(all_rewards())
    if names <= RULES:  # weight-free configs build and run offline
        built = load_reward_config(path)
        video = any(n in ("duration", "frame_rate", "flicker", "motion") for n in names)
        x = torch.rand(2, 8, 3, 16, 16) if video else torch.rand(2, 3, 16, 16)
        for reward in built.values():
            kwargs = {"fps": 4.0} if getattr(reward, "accepts_fps", False) else {}
            out = reward(x, ["a red circle", "a blue square"], **kwargs)
            assert out.shape[0] == 2 and torch.isfinite(out).all()
