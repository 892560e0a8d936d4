"""`mmalign score` and `mmalign label` end to end: folders, manifests, pairs, resume, errors, CLI, training."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mmalign.rewards.label import make_pairs
from mmalign.rewards.score import collect_items, load_media, read_table, score_items

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}


def write_candidates(root: Path, n_per_prompt: int = 4, size: int = 20) -> Path:
    """Two prompt folders of candidates: shapes whose redness/blueness varies, plus one corrupt file."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for k, colour in enumerate(["red", "blue"]):
        folder = root / f"p{k}"
        folder.mkdir(parents=True)
        (folder / "prompt.txt").write_text(f"a {colour} square")
        for i in range(n_per_prompt):
            mix = i / (n_per_prompt - 1)
            rgb = np.array(COLOURS[colour]) * mix + np.array(COLOURS["green"]) * (1 - mix)
            arr = np.full((size, size + 4, 3), 128, np.uint8)
            top, left = rng.integers(0, size // 2, 2)
            arr[top : top + size // 2, left : left + size // 2] = rgb.astype(np.uint8)
            Image.fromarray(arr).save(folder / f"{i}.png")
    (root / "p0" / "broken.png").write_bytes(b"not a png")
    return root


@pytest.fixture()
def candidates(tmp_path):
    return write_candidates(tmp_path / "cands")


def test_score_folder_writes_one_row_per_item_with_error_rows(candidates, tmp_path):
    from mmalign.rewards import get_reward

    out = tmp_path / "scores.jsonl"
    summary = score_items(
        collect_items(candidates), {"color": get_reward("color_match")}, out, batch_size=3, progress=False
    )
    rows = read_table(out)
    assert summary.total == len(rows) == 9 and summary.errors == 1
    bad = next(r for r in rows if r["id"] == "p0/broken.png")
    assert "cannot decode" in bad["error"] and "color" not in bad
    good = [r for r in rows if not r.get("error")]
    assert all(r["prompt"] in ("a red square", "a blue square") for r in good)
    assert all((out.parent / r["path"]).is_file() for r in good)  # paths relative to the output
    red = sorted((r for r in good if r["prompt"] == "a red square"), key=lambda r: r["id"])
    assert [r["color"] for r in red] == sorted(r["color"] for r in red)  # redder candidates score higher


def test_score_resumes_after_interruption_and_skips_scored_rows(candidates, tmp_path):
    from mmalign.rewards import get_reward

    rewards = {"color": get_reward("color_match")}
    items = collect_items(candidates)
    clean = tmp_path / "clean.jsonl"
    score_items(items, rewards, clean, batch_size=2, progress=False)

    out = tmp_path / "scores.jsonl"

    def stop_after_two(batches: int) -> None:
        if batches == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        score_items(items, rewards, out, batch_size=2, progress=False, on_batch=stop_after_two)
    assert not out.exists() and len(read_table(out.with_name(out.name + ".partial"))) == 4
    resumed = score_items(items, rewards, out, batch_size=2, progress=False)
    assert resumed.skipped == 4 and resumed.scored == 5  # the first two batches are kept
    assert read_table(out) == read_table(clean)
    again = score_items(items, rewards, out, batch_size=2, progress=False)
    assert again.scored == 1 and again.skipped == 8  # only the unreadable file is tried again
    assert not out.with_name(out.name + ".partial").exists()

    # a user's file with a malformed last row is an error naming the line (it was dropped silently: 2 of 3 items)
    torn = tmp_path / "torn.jsonl"
    torn.write_text(out.read_text() + '{"prompt": "a blue square", "path": "x.png"\n')
    with pytest.raises(ValueError, match=r"torn\.jsonl:10: not valid JSON"):
        read_table(torn)


def test_score_pair_manifest_to_csv_with_hybrid_components(pair_manifest, tmp_path):
    from mmalign.rewards.combine import hybrid

    out = tmp_path / "pairs.csv"
    r = hybrid([{"name": "color_match", "normalizer": "none"}, {"name": "saturation", "weight": 0.5}])
    summary = score_items(collect_items(pair_manifest), {"h": r}, out, batch_size=3, progress=False)
    rows = read_table(out)
    assert summary.errors == 0 and len(rows) == 4
    for row in rows:
        for side in ("chosen", "rejected"):
            for col in (
                "h",
                "h.color_match/raw",
                "h.color_match/norm",
                "h.color_match/confidence",
                "h.saturation/raw",
                "h.saturation/norm",
            ):
                assert row[f"{side}.{col}"] != "", col
        assert row["h.agrees"] == "True"  # the red square is chosen and the prompt asks for red


def test_score_gif_video_per_segment(tmp_path):
    from PIL import Image

    from mmalign.rewards import get_reward

    levels = [255 if i == 5 else 10 * i for i in range(8)]  # distinct frames (GIF merges equal ones)
    frames = [Image.fromarray(np.full((8, 8, 3), v, np.uint8)) for v in levels]
    frames[0].save(tmp_path / "clip.gif", save_all=True, append_images=frames[1:], duration=250, loop=0)
    video, fps = load_media(tmp_path / "clip.gif")
    assert video.shape == (8, 3, 8, 8) and fps == 4.0
    rewards = {
        "flicker": get_reward("flicker", segment_seconds=1.0),
        "dur": get_reward("duration", target_seconds=2),
    }
    score_items(collect_items(tmp_path), rewards, tmp_path / "v.jsonl", progress=False)
    row = read_table(tmp_path / "v.jsonl")[0]
    by_frames = get_reward("flicker", segment_frames=4)(video[None], [""])[0]  # 1 s = 4 frames at 4 fps
    assert row["flicker"] == pytest.approx(by_frames.tolist()) and len(row["flicker"]) == 2
    assert row["flicker"][1] < row["flicker"][0]  # the bright frame 5 flickers in the second second
    assert row["dur"] == pytest.approx(1.0)
    # label ranks a candidate on one number: a per-segment column is refused by row, naming the per-clip ones
    from mmalign.rewards.label import candidates_from_scores

    with pytest.raises(
        ValueError, match=r"score row 1: column 'flicker' holds one score per segment .*'dur'"
    ):
        candidates_from_scores([row], "flicker", tmp_path)


def test_video_timing_rules_judge_the_file_not_the_resampled_frames(tmp_path, capsys):
    """duration and frame_rate read the file's own length and rate: resampling (--video-fps, as the README's
    video_rules command does) or frame sampling (--video-frames) changes the frames the other rules see, not
    them; flicker still counts its seconds on the frames it gets. Also through decoding worker processes."""
    from mmalign.cli import main
    from mmalign.data.video import write_video
    from mmalign.rewards.rules import ClipRate
    from mmalign.toy.render import render_video

    folder = tmp_path / "clips"
    folder.mkdir()
    write_video(
        folder / "a.mp4", render_video("a red circle", seed=0, frames=24, size=16), 16
    )  # 1.5 s at 16 fps
    (folder / "a.txt").write_text("a red circle")
    rows = {}
    for name, extra in {
        "native": [],
        "fps8": ["--video-fps", "8"],
        "frames3": ["--video-frames", "3", "--num-workers", "1"],
    }.items():
        out = tmp_path / f"{name}.jsonl"
        # a --reward-arg goes to every named reward: frame_rate and duration take different ones
        assert (
            main(
                [
                    "score",
                    str(folder),
                    "--reward",
                    "frame_rate",
                    "--reward-arg",
                    "target_fps=16",
                    "--out",
                    str(out),
                    "--quiet",
                    *extra,
                ]
            )
            == 0
        )
        dur = tmp_path / f"{name}-dur.jsonl"
        assert (
            main(
                [
                    "score",
                    str(folder),
                    "--reward",
                    "duration",
                    "--reward-arg",
                    "target_seconds=1.5",
                    "--out",
                    str(dur),
                    "--quiet",
                    *extra,
                ]
            )
            == 0
        )
        rows[name] = (read_table(out)[0]["frame_rate"], read_table(dur)[0]["duration"])
    capsys.readouterr()
    # before: frame_rate 0.5 at --video-fps 8 (the resampled rate), duration off at --video-frames 3 (3 frames at
    # the 1.6 fps they were sampled at)
    assert rows["native"] == rows["fps8"] == rows["frames3"] == (1.0, pytest.approx(1.0))
    rate = ClipRate(8.0, 16.0, 1.5)  # what the rules see: a float (8 fps) that remembers the file
    assert rate + 0 == 8.0 and rate != ClipRate(8.0, 16.0, 2.0) and len({rate, ClipRate(8.0, 16.0, 1.5)}) == 1


def test_make_pairs_strategies_and_tie_counts():
    cands = {
        "p": [("a", 0.9), ("b", 0.5), ("c", 0.45), ("d", 0.1)],
        "q": [("e", 1.0), ("f", 1.0)],
        "r": [("g", 3.0)],
    }
    pairs, s = make_pairs(cands, "best_worst", margin=0.0)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("a", "d")]
    assert pairs[0]["margin"] == pytest.approx(0.8) and s.ties == 1 and s.singletons == 1
    pairs, s = make_pairs(cands, "margin", margin=0.1)
    assert {(p["chosen"], p["rejected"]) for p in pairs} == {
        ("a", "b"),
        ("a", "c"),
        ("a", "d"),
        ("b", "d"),
        ("c", "d"),
    }
    assert s.ties == 2 and s.pairs == 5  # b-c (0.05) and e-f (0.0)
    pairs, s = make_pairs(cands, "curriculum", margin=0.1)
    assert [p["margin"] for p in pairs] == pytest.approx(
        [0.8, 0.45, 0.4, 0.4, 0.35]
    )  # a-d, a-c, a-b, b-d, c-d
    assert [p["stage"] for p in pairs] == [0, 1, 2, 3, 4]
    two = {"p": [("a", 1.0), ("b", 0.0), ("c", 0.5)], "q": [("d", 2.0), ("e", 0.0)]}
    pairs, _ = make_pairs(two, "curriculum")
    assert [(p["prompt"], p["stage"]) for p in pairs] == [
        ("q", 0),
        ("p", 0),
        ("p", 1),
        ("p", 2),
    ]  # easy first


def test_a_rerun_with_other_reward_settings_scores_again(candidates, tmp_path, capsys):
    """Resuming keeps a row only if its reward column was scored with the same settings: another --reward-arg
    (a person's --user is one) scores the column again; the same settings keep every row. The settings include
    the contents of the files the arguments name (a person's shots, a PAL head), and the video sampling."""
    from mmalign.cli import main
    from mmalign.commands.score import scoring_settings

    out = tmp_path / "scores.jsonl"

    def score(*extra):
        assert (
            main(["score", str(candidates), "--reward", "brightness", "--out", str(out), "--quiet", *extra])
            == 0
        )
        captured = capsys.readouterr()
        rows = {r["id"]: r["brightness"] for r in read_table(out) if not r.get("error")}
        return json.loads(captured.out.strip().splitlines()[-1]), rows, captured.err

    first, plain, _ = score()
    assert first["scored"] == 9 and first["rescored_other_settings"] == []
    again, same, _ = score()
    assert (
        again["scored"] == 1 and again["skipped_already_scored"] == 8 and same == plain
    )  # the broken file only
    changed, toward, note = score("--reward-arg", "target=0.2")
    assert changed["scored"] == 9 and changed["rescored_other_settings"] == ["brightness"]
    assert "brightness in" in note and "scored with other settings" in note
    assert all(v <= 0 for v in toward.values()) and toward != plain  # -|luma - target| now
    kept, _, _ = score("--reward-arg", "target=0.2")
    assert kept["skipped_already_scored"] == 8
    settings = json.loads(out.with_name(out.name + ".settings.json").read_text())
    assert settings["brightness"]["reward_args"] == ["target=0.2"]

    shots = tmp_path / "shots.jsonl"
    shots.write_text('{"prompt": "a", "chosen": "x.png", "rejected": "y.png"}\n')
    before = scoring_settings(["pal"], [f"user_shots={shots}"], None, None)
    shots.write_text('{"prompt": "a", "chosen": "y.png", "rejected": "x.png"}\n')  # same name, other choices
    assert scoring_settings(["pal"], [f"user_shots={shots}"], None, None) != before
    assert scoring_settings(["pal"], [f"user_shots={shots}"], 8.0, None) != scoring_settings(
        ["pal"], [f"user_shots={shots}"], None, None
    )


def test_cli_score_then_label_writes_a_train_manifest(candidates, tmp_path, capsys):
    from mmalign.cli import main

    scores = tmp_path / "out" / "scores.jsonl"
    assert main(["score", str(candidates), "--reward", "color_match", "--out", str(scores), "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["items"] == 9 and report["errors"] == 1
    manifest = tmp_path / "out" / "pairs.jsonl"
    assert (
        main(
            [
                "label",
                "--scores",
                str(scores),
                "--strategy",
                "margin",
                "--margin",
                "0.05",
                "--out",
                str(manifest),
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = read_table(manifest)
    assert (
        report["pairs"] == len(rows) > 0 and report["dropped_ties"] > 0 and report["unscored_candidates"] == 1
    )
    assert report["pairs"] + report["dropped_ties"] == 2 * 6  # 4 candidates per prompt -> 6 pairs each
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected", "margin"} and row["margin"] > 0.05
        assert not Path(row["chosen"]).is_absolute() and (manifest.parent / row["chosen"]).is_file()
    # label can also score first
    direct = tmp_path / "direct.jsonl"
    assert main(["label", str(candidates), "--reward", "color_match", "--out", str(direct), "--quiet"]) == 0
    assert len(read_table(direct)) == 2  # best-vs-worst per prompt
    assert main(["label", "--out", str(direct)]) == 2


def test_label_finds_the_reward_column_of_a_scored_generate_folder_and_keeps_the_scores(tmp_path, capsys):
    """A `generate` manifest's rows carry height/width (and more settings): label's default --key is the one reward
    `score` wrote (its settings file names it), and --out may not be the --scores file it reads."""
    from mmalign.cli import main

    folder = write_candidates(tmp_path / "cands")
    write_generate_manifest(folder)
    scores = tmp_path / "scores.jsonl"
    assert main(["score", str(folder), "--reward", "color_match", "--out", str(scores), "--quiet"]) == 0
    assert {"height", "width", "color_match"} <= set(read_table(scores)[0])  # carried from the manifest
    scores.with_name(
        scores.name + ".settings.json"
    ).unlink()  # a scores file from before the settings file, too
    assert main(["label", "--scores", str(scores), "--out", str(tmp_path / "pairs.jsonl")]) == 0
    assert len(read_table(tmp_path / "pairs.jsonl")) == 2
    before = scores.read_text()
    assert main(["label", "--scores", str(scores), "--key", "color_match", "--out", str(scores)]) == 2
    assert "is the --scores file" in capsys.readouterr().err and scores.read_text() == before


def write_generate_manifest(folder: Path) -> Path:
    """The candidates as `mmalign generate` lists them: manifest.jsonl rows with its recorded settings."""
    rows = [
        {
            "path": str(p.relative_to(folder)),
            "prompt": (p.parent / "prompt.txt").read_text(),
            "seed": i,
            "kind": "image",
            "height": 20,
            "width": 24,
        }
        for i, p in enumerate(sorted(folder.rglob("*.png")))
        if p.name != "broken.png"
    ]
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def test_label_manifest_trains_with_mmalign_train(candidates, tiny_sd15, tmp_path):
    from mmalign.commands.score import build_rewards
    from mmalign.rewards.label import label_scores
    from mmalign.trainers import load_config
    from mmalign.trainers.loop import train

    scores = tmp_path / "scores.jsonl"
    score_items(collect_items(candidates), build_rewards(["color_match"]), scores, progress=False)
    manifest = tmp_path / "pairs.jsonl"
    summary = label_scores(scores, manifest, strategy="margin", margin=0.05)
    assert summary.pairs >= 4
    torch.manual_seed(0)
    result = train(
        load_config(
            None,
            [
                f"model.pretrained={tiny_sd15}",
                "model.resolution=16",
                f"data.source={manifest}",
                f"train.output_dir={tmp_path / 'run'}",
                "train.max_steps=2",
                "train.batch_size=2",
                "train.report_to=none",
                "train.progress=false",
                "train.checkpoint_every=0",
                "lora.rank=2",
                "data.cache=false",
            ],
        )
    )
    assert result.summary["steps"] == 2 and math.isfinite(result.summary["final_metrics"]["loss"])


def test_shipped_reward_specs_resolve_from_any_directory(tmp_path, monkeypatch):
    """The README's ``--reward configs/rewards/*.yaml`` works outside the repository (a wheel install ships them)."""
    from mmalign.commands.score import build_rewards

    monkeypatch.chdir(tmp_path)
    assert sorted(build_rewards(["configs/rewards/video_rules.yaml"])) == [
        "duration",
        "flicker",
        "frame_rate",
        "motion",
    ]
    (tmp_path / "configs" / "rewards").mkdir(parents=True)
    (tmp_path / "configs" / "rewards" / "video_rules.yaml").write_text("rewards:\n  - {name: sharpness}\n")
    assert list(build_rewards(["configs/rewards/video_rules.yaml"])) == ["sharpness"]  # a local file wins
    with pytest.raises(ValueError, match="no_such.yaml: reward spec file not found"):
        build_rewards(["configs/rewards/no_such.yaml"])


def placed_reward(device: str = "cpu", dtype=torch.float32, bias: float = 0.0):
    """A reward that records where --device/--dtype put it (a spec file's ``name: test_score_label:placed_reward``)."""

    def reward(media, prompts, **kwargs):
        return torch.full((media.shape[0],), bias)

    reward.placed = (device, dtype)
    return reward


def test_spec_files_take_device_and_dtype_and_refuse_reward_args(tmp_path, monkeypatch):
    """--device/--dtype reach a spec file's model rewards (a file's own kwargs win); --reward-arg with only spec files
    is refused rather than ignored; a model reward that cannot load is one line naming the file."""
    from mmalign.commands.score import build_rewards

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "rewards:\n  - {name: 'test_score_label:placed_reward'}\n"
        "  - {name: 'test_score_label:placed_reward', kwargs: {dtype: float16}}\n  - {name: sharpness}\n"
    )
    built = build_rewards([str(spec)], device="meta", dtype="bf16")
    assert built["test_score_label:placed_reward"].placed == ("meta", torch.bfloat16)
    assert built["test_score_label:placed_reward#2"].placed == ("meta", "float16")
    with pytest.raises(ValueError, match=r"--reward-arg bias=1: .*every --reward here is a spec file"):
        build_rewards([str(spec)], ["bias=1"])

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(sys.modules[__name__], "placed_reward", offline)
    with pytest.raises(
        ValueError, match=r"--reward .*spec\.yaml: cannot load its model: We couldn't connect"
    ):
        build_rewards([str(spec)])
