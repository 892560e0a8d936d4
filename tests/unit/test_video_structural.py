"""StructuralDPO pairs on a tiny toy video pipeline, reward segment labels, and the shipped DenseDPO recipes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmalign.config import ConfigError
from mmalign.data.structural import reward_segment_labels, segment_slices, structural_pairs
from mmalign.pipelines import load_pipeline, make_adapter
from mmalign.toy.render import render_video
from mmalign.trainers import load_config

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]


def test_structural_pairs_share_eta_and_differ_by_seed(tmp_path):
    from mmalign.toy.tiny import build_tiny_toy_video

    build_tiny_toy_video(tmp_path / "m")
    pipe, family = load_pipeline(str(tmp_path / "m"))
    pipe.set_progress_bar_config(disable=True)
    adapter = make_adapter(pipe, family)
    gt = torch.stack([render_video("a red circle", seed=s, frames=4, size=16) for s in range(2)])
    v0, v1, etas = structural_pairs(adapter, pipe, gt, ["a red circle"] * 2, seed=3, steps=4)
    assert v0.shape == v1.shape == (2, 4, 3, 16, 16) and 0 <= v0.min() and v0.max() <= 1
    assert len(etas) == 2 and all(0.65 <= e <= 0.8 for e in etas)
    assert not torch.allclose(v0, v1)  # two seeds
    again, _, etas2 = structural_pairs(adapter, pipe, gt, ["a red circle"] * 2, seed=3, steps=4)
    assert etas2 == etas and torch.allclose(again, v0)


def test_reward_segment_labels_call_the_reward_per_segment():
    assert segment_slices(8, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    v0 = torch.zeros(1, 8, 3, 2, 2)
    v1 = torch.zeros(1, 8, 3, 2, 2)
    v0[:, 4:] = 1.0  # clip 0 brighter in segment 1 only

    def brightness(media, prompts):
        return media.mean(dim=(1, 2, 3, 4))

    assert reward_segment_labels(brightness, v0, v1, ["x"], fps=4).tolist() == [[0, 1]]
    assert reward_segment_labels(brightness, v1, v0, ["x"], fps=4).tolist() == [[0, -1]]


@pytest.mark.parametrize("family", ["cogvideox", "wan", "toy"])
def test_shipped_recipes_load_with_paper_values(family):
    cfg = load_config(ROOT / "configs" / family / "dense_dpo.yaml")
    assert cfg.method.name == "dense_dpo" and cfg.method.beta == 500
    if family == "toy":  # the benchmark's settings: 8 frames at 4 fps in 0.5 s segments
        assert cfg.method.segment_seconds == 0.5 and cfg.method.num_frames == 8
    else:
        assert cfg.method.segment_seconds == 1.0  # the paper's 1 s segments
        assert cfg.lora.rank == 128 and cfg.train.learning_rate == 1e-5 and cfg.train.warmup_steps == 250
        assert (cfg.method.num_frames - 1) % 4 == 0  # causal 4x VAE: 4k+1 frames


def test_config_errors_say_how_to_fix():
    with pytest.raises(ConfigError, match="dense, vanilla|'dense', 'vanilla'"):
        load_config(None, ["method.name=dense_dpo", "method.loss=sum"])
    with pytest.raises(ConfigError, match="multiple of 8"):
        load_config(None, ["method.name=dense_dpo", "method.height=100"])
