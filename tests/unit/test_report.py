"""Labelled grids, contact sheets, training curves and validation images to the tracker."""

from __future__ import annotations

import torch

from mmalign.trainers.report import contact_sheet, labelled_grid, log_validation, write_training_curves


def test_labelled_grid_upscales_small_tiles_and_draws_text():
    a, b = torch.zeros(3, 3, 16, 16), torch.ones(3, 3, 16, 16)
    plain = labelled_grid([b, a])
    labelled = labelled_grid(
        [b, a],
        row_names=["base", "tuned"],
        column_titles=["a red circle"] * 3,
        captions=[["r 0.10"] * 3, ["r 0.90"] * 3],
    )
    assert plain.height >= 2 * 128  # 16 px tiles upscaled to >= 128 px
    assert labelled.width > plain.width and labelled.height > plain.height  # room for names, titles, scores
    pixels = torch.tensor(list(labelled.convert("L").getdata())).view(labelled.height, labelled.width)
    assert (pixels[:10] < 128).any()  # title text drawn above the tiles
    clips = torch.rand(2, 4, 3, 8, 8)
    assert contact_sheet(clips, ["x", "y"]).width >= 2 * 128


def test_training_curves_and_validation_to_tensorboard(tmp_path):
    history = [{"step": i, "loss": 1.0 / i, "implicit_acc": 0.5} for i in range(1, 20)]
    assert write_training_curves(history, tmp_path / "curves.png").stat().st_size > 0
    assert write_training_curves([{"step": 1}], tmp_path / "none.png") is None
    from accelerate import Accelerator

    acc = Accelerator(log_with="tensorboard", project_dir=str(tmp_path / "logs"))
    acc.init_trackers("run")
    log_validation(acc, torch.rand(2, 3, 8, 8), ["a", "b"], 0, tmp_path / "val" / "step-0.png")
    acc.end_training()
    assert (tmp_path / "val" / "step-0.png").is_file()
    assert list((tmp_path / "logs").rglob("events.out.tfevents*"))


def test_previews_are_small_first_frames_that_keep_no_batch_alive():
    """What generate and eval keep of each streamed batch for their grids: not the batch (nor a view of it)."""
    from mmalign.trainers.report import PREVIEW_SIDE, previews

    clips = torch.rand(2, 5, 3, 600, 1024)  # [B,T,3,H,W]
    small = previews(clips)
    assert small.shape == (2, 3, 150, PREVIEW_SIDE)  # the first frame, longer side 256, aspect kept
    assert torch.allclose(small.mean(), clips[:, 0].mean(), atol=1e-3)  # area resampling keeps the mean
    tiny = torch.rand(4, 3, 32, 32)
    kept = previews(tiny[:1])
    assert (
        torch.equal(kept, tiny[:1]) and kept.untyped_storage().nbytes() == 3 * 32 * 32 * 4
    )  # a copy, not a view
