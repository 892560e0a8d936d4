"""Method run state (Method.state): Self-NPO's EMA teacher is checkpointed, so resuming is exact."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from mmalign.trainers import load_config
from mmalign.trainers.loop import train

torch.set_num_threads(1)


def test_self_npo_resume_restores_the_ema_teacher(tiny_sd15, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\na photo of a cat\n")

    def cfg(out, *extra):
        return load_config(
            None,
            [
                f"model.pretrained={tiny_sd15}",
                "model.resolution=16",
                f"data.source={prompts}",
                f"train.output_dir={out}",
                "train.batch_size=2",
                "train.report_to=none",
                "train.progress=false",
                "train.learning_rate=1e-2",
                "train.scale_lr=false",
                "train.checkpoint_every=2",
                "lora.rank=2",
                "method.name=self_npo",
                "method.ema_decay=0.5",
                f"data.cache_dir={tmp_path / 'cache'}",
                "data.caption_dropout=0",
                *extra,
            ],
        )

    train(cfg(tmp_path / "straight", "train.max_steps=4"))
    train(cfg(tmp_path / "split", "train.max_steps=2"))
    assert (tmp_path / "split/checkpoints/checkpoint-2/method_state.safetensors").is_file()
    resumed = train(cfg(tmp_path / "split", "train.max_steps=4", "train.resume=latest"))
    assert resumed.summary["steps"] == 4
    a = load_file(tmp_path / "straight/checkpoints/checkpoint-4/trainable.safetensors")
    b = load_file(tmp_path / "split/checkpoints/checkpoint-4/trainable.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    teacher_a = load_file(tmp_path / "straight/checkpoints/checkpoint-4/method_state.safetensors")
    teacher_b = load_file(tmp_path / "split/checkpoints/checkpoint-4/method_state.safetensors")
    assert teacher_a.keys() == {n for n in a} and teacher_a.keys() == teacher_b.keys()
    for name in teacher_a:
        assert torch.equal(teacher_a[name], teacher_b[name]), name
