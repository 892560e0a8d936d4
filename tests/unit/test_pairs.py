"""Pair data: manifests, Pick-a-Pic layout, ties, and errors that name the row and file."""

import io
import json

import pytest
import torch
from PIL import Image

from mmalign.data import DataError, load_pairs
from mmalign.data.pairs import PairDataset, collate_pairs, decode_pair


def png_bytes(colour, size=(24, 16)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def image_dir(tmp_path):
    for name, colour in [("a.png", "red"), ("b.png", "blue"), ("c.png", "green")]:
        (tmp_path / name).write_bytes(png_bytes(colour))
    return tmp_path


def test_manifest_chosen_rejected_paths_are_relative_to_manifest(image_dir):
    (image_dir / "m.jsonl").write_text(
        json.dumps({"prompt": "p", "chosen": "a.png", "rejected": "b.png"}) + "\n"
    )
    records, counts = load_pairs(image_dir / "m.jsonl")
    assert counts == {"rows": 1, "ties_dropped": 0}
    assert records[0].chosen == str(image_dir / "a.png") and records[0].rejected == str(image_dir / "b.png")


def test_label_0_orders_winner_first_and_ties_are_dropped_or_kept(image_dir):
    rows = [
        {"prompt": "one", "image_0": "a.png", "image_1": "b.png", "label_0": 1},
        {"prompt": "zero", "image_0": "a.png", "image_1": "b.png", "label_0": 0},
        {"prompt": "tie", "image_0": "a.png", "image_1": "c.png", "label_0": 0.5},
    ]
    (image_dir / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records, counts = load_pairs(image_dir / "m.jsonl")
    assert counts["ties_dropped"] == 1 and len(records) == 2
    assert records[0].chosen.endswith("a.png") and records[1].chosen.endswith("b.png")
    kept, _ = load_pairs(image_dir / "m.jsonl", keep_ties=True)
    assert len(kept) == 3 and kept[2].chosen.endswith("a.png") and kept[2].label_0 == 0.5


def test_csv_manifest(image_dir):
    (image_dir / "m.csv").write_text("prompt,image_0,image_1,label_0\nhello,a.png,b.png,0\n")
    records, _ = load_pairs(image_dir / "m.csv")
    assert (
        records[0].prompt == "hello"
        and records[0].chosen.endswith("b.png")
        and records[0].row.endswith("m.csv:2")
    )


def test_pickapic_parquet_layout(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict(
        {
            "caption": ["a cat", "a dog", "tied"],
            "jpg_0": [png_bytes("red"), png_bytes("red"), png_bytes("red")],
            "jpg_1": [png_bytes("blue"), png_bytes("blue"), png_bytes("blue")],
            "label_0": [1.0, 0.0, 0.5],
            "user_id": [7, 8, 9],
        }
    )
    ds.to_parquet(str(tmp_path / "train-0.parquet"))
    records, counts = load_pairs(tmp_path)
    assert counts == {"rows": 3, "ties_dropped": 1}
    assert [r.user_id for r in records] == [7, 8]
    item = decode_pair(records[1], 16)
    # label_0 = 0: jpg_1 (blue) is the winner
    assert item["pixels_w"][2].mean() > 0.5 and item["pixels_w"][0].mean() < -0.5
    ds.save_to_disk(str(tmp_path / "saved"))
    saved, _ = load_pairs(tmp_path / "saved")
    assert len(saved) == 2


def test_an_image_column_that_stores_file_paths_reads_the_files(tmp_path):
    import datasets

    for name in ("red", "blue"):
        (tmp_path / f"{name}.png").write_bytes(png_bytes(name))
    ds = datasets.Dataset.from_dict(
        {
            "caption": ["a cat"],
            "jpg_0": [str(tmp_path / "red.png")],
            "jpg_1": [str(tmp_path / "blue.png")],
            "label_0": [0.0],
        }
    )
    ds = ds.cast_column("jpg_0", datasets.Image()).cast_column("jpg_1", datasets.Image())
    (tmp_path / "data").mkdir()
    ds.to_parquet(str(tmp_path / "data" / "train-0.parquet"))  # rows hold {"bytes": None, "path": ...}
    records, _ = load_pairs(tmp_path / "data")
    item = decode_pair(records[0], 16)
    assert item["pixels_w"][2].mean() > 0.5 and item["pixels_w"][0].mean() < -0.5  # jpg_1 (blue) won


def test_a_manifest_or_a_broken_file_under_format_pickapic_is_named(tmp_path):
    """A Pick-a-Pic recipe (data.format: pickapic) pointed at a JSONL manifest, or a file that is not parquet:
    one line naming the file and the fix, not pyarrow's traceback."""
    (tmp_path / "pairs.jsonl").write_text(
        json.dumps({"prompt": "p", "chosen": "a.png", "rejected": "b.png"}) + "\n"
    )
    with pytest.raises(
        DataError, match=r"pairs.jsonl is a .jsonl manifest but data.format=pickapic.*format=manifest"
    ):
        load_pairs(tmp_path / "pairs.jsonl", format="pickapic")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"broken.parquet: cannot read it as Pick-a-Pic parquet data"):
        load_pairs(tmp_path / "broken.parquet")


def test_missing_column_and_bad_label_name_the_row(image_dir):
    (image_dir / "m.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "a.png"}) + "\n")
    with pytest.raises(DataError, match=r"m.jsonl:1: missing column 'rejected'"):
        load_pairs(image_dir / "m.jsonl")
    (image_dir / "n.jsonl").write_text(
        "\n" + json.dumps({"prompt": "p", "image_0": "a.png", "image_1": "b.png", "label_0": 2}) + "\n"
    )
    with pytest.raises(DataError, match=r"n.jsonl:2: label_0=2.0"):
        load_pairs(image_dir / "n.jsonl")


def test_corrupt_and_missing_images_name_row_and_file(image_dir):
    (image_dir / "broken.png").write_bytes(b"not an image at all")
    rows = [
        {"prompt": "ok", "chosen": "a.png", "rejected": "b.png"},
        {"prompt": "bad", "chosen": "broken.png", "rejected": "b.png"},
        {"prompt": "gone", "chosen": "a.png", "rejected": "missing.png"},
    ]
    (image_dir / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records, _ = load_pairs(image_dir / "m.jsonl")
    strict = PairDataset(records, 16)
    with pytest.raises(DataError, match=r"m.jsonl:2 \(chosen: .*broken.png\): cannot decode image"):
        strict[1]
    with pytest.raises(DataError, match=r"m.jsonl:3 \(rejected: .*missing.png\): file not found"):
        strict[2]
    lenient = PairDataset(records, 16, skip_bad=True, random_flip=False)
    batch = collate_pairs([lenient[i] for i in range(3)])
    assert len(batch["skipped"]) == 2 and batch["prompt"] == ["ok"]
    assert batch["pixels_w"].shape == (1, 3, 16, 16)


def test_resize_crop_records_sdxl_metadata(image_dir):
    records, _ = load_pairs_for(image_dir)
    item = decode_pair(records[0], 16)
    assert item["original_size"] == (16, 24)  # (height, width) before resizing
    assert item["crop_top_left"] == (0, 4)  # short side 16 -> 16x24, centre crop
    assert item["pixels_w"].min() >= -1 and item["pixels_w"].max() <= 1
    torch.testing.assert_close(item["pixels_w"][0], torch.ones(16, 16))  # red channel saturated


def load_pairs_for(image_dir):
    (image_dir / "m.jsonl").write_text(
        json.dumps({"prompt": "p", "chosen": "a.png", "rejected": "b.png"}) + "\n"
    )
    return load_pairs(image_dir / "m.jsonl")


def test_a_flipped_item_records_the_mirrored_crop(tmp_path):
    """SDXL's add_time_ids carry the crop's top-left; a horizontally flipped image's crop starts from the other side."""
    from mmalign.data.images import mirror_crop

    assert mirror_crop((20, 30), (0, 0), 16) == (0, 24 - 16)  # 20x30 -> 16x24: left 0 mirrors to 8
    assert mirror_crop((20, 30), (0, 4), 16) == (0, 4)  # a centred crop is its own mirror
    assert mirror_crop((30, 20), (3, 0), 16) == (
        3,
        0,
    )  # portrait: the crop spans the width, nothing to mirror

    img = Image.fromarray(
        (torch.rand(20, 30, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy()
    )
    img.save(tmp_path / "a.png")
    img.save(tmp_path / "b.png")
    (tmp_path / "pairs.jsonl").write_text('{"prompt": "x", "chosen": "a.png", "rejected": "b.png"}\n')
    records, _ = load_pairs(tmp_path / "pairs.jsonl")
    ds = PairDataset(records, 16, random_flip=True, random_crop=True)
    checked = 0
    for seed in range(16):
        torch.manual_seed(seed)
        item = ds[0]
        torch.manual_seed(seed)
        ref = decode_pair(records[0], 16, random_crop=True)  # the same crop draw, no flip
        if torch.equal(item["pixels_w"], ref["pixels_w"].flip(-1)) and ref["crop_top_left"][1] != 4:
            assert item["crop_top_left"] == mirror_crop(ref["original_size"], ref["crop_top_left"], 16)
            assert item["crop_top_left"] != ref["crop_top_left"]
            checked += 1
        elif torch.equal(item["pixels_w"], ref["pixels_w"]):
            assert item["crop_top_left"] == ref["crop_top_left"]
    assert checked > 0
