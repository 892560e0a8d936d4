"""`mmalign generate`: samples from a pipeline directory, with a LoRA from `mmalign train`."""

import torch
from PIL import Image

from mmalign.cli import main
from mmalign.trainers import load_config
from mmalign.trainers.loop import train


def test_generate_with_and_without_a_trained_lora(tiny_sd15, pair_manifest, tmp_path):
    torch.set_num_threads(1)
    cfg = load_config(
        None,
        [
            f"model.pretrained={tiny_sd15}",
            "model.resolution=16",
            f"data.source={pair_manifest}",
            f"train.output_dir={tmp_path / 'run'}",
            "train.max_steps=2",
            "train.batch_size=2",
            "train.report_to=none",
            "train.progress=false",
            "train.learning_rate=5e-2",
            "train.scale_lr=false",
            "lora.rank=2",
        ],
    )
    lora = train(cfg).summary["export"]
    common = [
        "generate",
        "--model",
        str(tiny_sd15),
        "--prompt",
        "a red square",
        "--n",
        "2",
        "--steps",
        "2",
        "--height",
        "16",
        "--width",
        "16",
    ]
    assert main([*common, "--out", str(tmp_path / "base")]) == 0
    assert main([*common, "--lora", lora, "--out", str(tmp_path / "tuned")]) == 0
    base = torch.tensor(list(Image.open(tmp_path / "base/00000.png").getdata()), dtype=torch.float32)
    tuned = torch.tensor(list(Image.open(tmp_path / "tuned/00000.png").getdata()), dtype=torch.float32)
    assert (
        base.shape == tuned.shape and (tmp_path / "base_grid.png").is_file()
    )  # the sheet is outside the media
    assert not (tmp_path / "base/grid.png").exists()
    assert not torch.equal(base, tuned)  # same seed, the LoRA changed the sample
