"""``mmalign label-video --structural``: StructuralDPO pairs with segment labels, any aspect ratio, a judge, errors."""

from __future__ import annotations

import json

import pytest
import torch

from mmalign.cli import main
from mmalign.data.video import read_video, write_video
from mmalign.toy.render import render_video

torch.set_num_threads(1)


class FakeJudge:
    """A pairwise judge: prefers clip 0 in even segments and clip 1 in odd ones (records its calls)."""

    calls: list = []

    def __call__(self, media, prompts):
        return torch.zeros(media.shape[0])

    def compare_segments(self, video_a, video_b, prompts, segment_frames, fps=None):
        FakeJudge.calls.append((tuple(video_a.shape), segment_frames, fps))
        segments = -(-video_a.shape[1] // segment_frames)
        return torch.tensor([[1 if s % 2 == 0 else -1 for s in range(segments)]] * video_a.shape[0])


def fake_judge(**kwargs):
    return FakeJudge()


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    from mmalign.toy.tiny import build_tiny_toy_video

    root = tmp_path_factory.mktemp("label-video")
    build_tiny_toy_video(root / "model")
    for i, prompt in enumerate(["a red circle moving", "a blue square moving"]):
        write_video(root / f"gt{i}.mp4", render_video(prompt, seed=i, frames=8, size=32), 4)
    (root / "clips.jsonl").write_text(
        "".join(
            json.dumps({"prompt": p, "video": f"gt{i}.mp4"}) + "\n"
            for i, p in enumerate(["a red circle moving", "a blue square moving"])
        )
    )
    return root


def run(clips, out, *extra):
    return main(
        [
            "label-video",
            "--structural",
            "--videos",
            str(clips / "clips.jsonl"),
            "--model",
            str(clips / "model"),
            "--out",
            str(out),
            "--steps",
            "2",
            "--device",
            "cpu",
            "--no-progress",
            *extra,
        ]
    )


def test_non_square_pairs_with_reward_labels(clips, tmp_path):
    assert run(clips, tmp_path / "out", "--height", "16", "--width", "24", "--reward", "toy_flicker") == 0
    rows = [json.loads(line) for line in (tmp_path / "out/pairs.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(len(r["labels"]) == 2 for r in rows)  # 8 frames at 4 fps: two 1 s segments
    clip = read_video(tmp_path / "out" / rows[0]["video_0"])
    assert clip.frames.shape[-2:] == (16, 24)


def test_judge_labels_segments(clips, tmp_path):
    FakeJudge.calls.clear()
    assert run(clips, tmp_path / "out", "--judge", "--reward", f"{__name__}:fake_judge", "--lossless") == 0
    rows = [json.loads(line) for line in (tmp_path / "out/pairs.jsonl").read_text().splitlines()]
    assert [r["labels"] for r in rows] == [[1, -1], [1, -1]]
    assert FakeJudge.calls and FakeJudge.calls[0][1:] == (4, 4.0)  # 1 s segments = 4 frames at 4 fps
    import av

    with av.open(str(tmp_path / "out" / rows[0]["video_0"])) as container:  # --lossless: exact RGB clips
        assert container.streams.video[0].codec_context.pix_fmt == "gbrp"  # not yuv420p


def test_bad_input_is_one_line(clips, tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n')
    code = main(
        [
            "label-video",
            "--structural",
            "--videos",
            str(tmp_path / "bad.jsonl"),
            "--model",
            str(clips / "model"),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert (
        code == 2
        and "bad.jsonl:1: a row needs a prompt and a video (one of video, path, media, file)"
        in capsys.readouterr().err
    )
    assert run(clips, tmp_path / "o2", "--judge", "--reward", "toy_flicker") == 2
    assert "pairwise judge" in capsys.readouterr().err
    assert run(clips, tmp_path / "o3", "--reward-arg", "oops") == 2


def test_an_interrupted_run_resumes_and_a_generate_manifest_is_read(clips, tmp_path, monkeypatch, capsys):
    """Pairs are recorded as they finish; a rerun makes only the missing ones and ends with the whole file."""
    import mmalign.data.structural as structural
    import mmalign.data.video as video

    (clips / "generated.jsonl").write_text(  # `mmalign generate` writes the clip under `path`
        "".join(
            json.dumps({"path": f"gt{i}.mp4", "prompt": p, "seed": i, "kind": "video"}) + "\n"
            for i, p in enumerate(["a red circle moving", "a blue square moving"])
        )
    )
    assert run(clips, tmp_path / "whole") == 0
    made, real_pairs, real_write = [], structural.structural_pairs, video.write_video

    def counting(adapter, pipe, frames, prompts, **kwargs):
        made.append(prompts[0])
        return real_pairs(adapter, pipe, frames, prompts, **kwargs)

    def dies_on_the_third_clip(path, *args, **kwargs):
        if path.name.startswith("000001_0"):
            raise RuntimeError("killed")
        return real_write(path, *args, **kwargs)

    monkeypatch.setattr(structural, "structural_pairs", counting)
    monkeypatch.setattr(video, "write_video", dies_on_the_third_clip)
    generated = ["--videos", str(clips / "generated.jsonl")]
    assert run(clips, tmp_path / "cut", *generated) == 3  # the crash: a traceback log, exit 3
    assert not (tmp_path / "cut/pairs.jsonl").exists()  # only the finished pair, in the partial file
    assert len((tmp_path / "cut/pairs.jsonl.partial").read_text().splitlines()) == 1

    monkeypatch.setattr(video, "write_video", real_write)
    made.clear()
    assert run(clips, tmp_path / "cut", *generated) == 0
    assert made == ["a blue square moving"] and not (tmp_path / "cut/pairs.jsonl.partial").exists()
    rows = [json.loads(line) for line in (tmp_path / "cut/pairs.jsonl").read_text().splitlines()]
    whole = [json.loads(line) for line in (tmp_path / "whole/pairs.jsonl").read_text().splitlines()]
    assert [(r["labels"], r["eta"], r["seeds"], r["settings"]) for r in rows] == [
        (r["labels"], r["eta"], r["seeds"], r["settings"]) for r in whole
    ]
    made.clear()
    assert (
        run(clips, tmp_path / "cut", *generated, "--steps", "3") == 0 and len(made) == 2
    )  # settings changed
    made.clear()
    assert run(clips, tmp_path / "cut", *generated, "--steps", "3", "--segment-seconds", "2") == 0
    assert len(made) == 2  # other segments, other labels: made again
    # toy_flicker's 4 sub-segments do not fit a 0.5 s segment of 2 frames: one line naming the row, not a crash
    assert run(clips, tmp_path / "half", *generated, "--segment-seconds", "0.5") == 2
    assert (
        "generated.jsonl:1: --reward toy_flicker on --segment-seconds 0.5 (8 frames"
        in capsys.readouterr().err
    )
