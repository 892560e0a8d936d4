"""Bad input never crashes or hangs: configs, media, manifests and the CLI's exit codes (issue 14, item 5),
and score rows keyed by (media, prompt) (item 6)."""

from __future__ import annotations

import json
import os
import struct
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmalign.cli import main
from mmalign.config import ConfigError
from mmalign.trainers import load_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fuzz"))
from cases import billion_laughs, bomb_png  # noqa: E402


def write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


# --------------------------------------------------------------------------------------------------
# configs


@pytest.mark.parametrize(
    "key", ["model.pretrained", "train.validation_prompts", "lora.target_modules", "train.max_steps"]
)
def test_billion_laughs_yaml_fails_fast(tmp_path, key):
    cfg = write(tmp_path / "bomb.yaml", billion_laughs(key))
    assert len(cfg.read_bytes()) < 400
    start = time.monotonic()
    with pytest.raises(ConfigError, match="more than 100000 values"):
        load_config(cfg)
    assert time.monotonic() - start < 5


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.num_workers=65", "data.num_workers=65 must be <= 64"),
        ("data.num_workers=1e30", "data.num_workers: expected an integer"),
        ("train.log_every=0", "train.log_every=0 must be >= 1"),
        ("train.learning_rate=.nan", "train.learning_rate: expected a finite number"),
        ("train.adam_beta2=1", "train.adam_beta2=1.0 must be < 1"),
        ("train.seed=-1", "train.seed=-1 must be >= 0"),
        ("train.checkpoints_total_limit=-1", "train.checkpoints_total_limit=-1 must be >= 1"),
        ("data.caption_dropout=1.5", "data.caption_dropout=1.5 must be in [0, 1)"),
        ("model.resolution=100000", "model.resolution=100000 must be <= 8192"),
        ("lora.dropout=-0.1", "lora.dropout=-0.1 must be >= 0"),
        ("train.lr_scheduler=cosinus", "train.lr_scheduler='cosinus': choose from constant"),
        ("method.beta=.inf", "method.beta: expected a finite number"),
        ("train.output_dir=", "train.output_dir must not be empty"),
        ("data.bucket_step=4", "data.bucket_step=4 must be >= 8"),
        ("data.bucket_max_ratio=0.5", "data.bucket_max_ratio=0.5 must be >= 1"),
    ],
)
def test_every_range_is_checked_at_validate_time(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


@pytest.mark.parametrize(
    "method, override",
    [
        ("self_npo", "method.ema_decay=1.5"),
        ("self_npo", "method.grid_steps=5000"),
        ("inversion_dpo", "method.steps_offset=-1"),
        ("inversion_dpo", "method.inversion_batch_size=0"),
        ("dense_dpo", "method.fps=0"),
        ("dense_dpo", "method.num_frames=0"),
        ("dense_dpo", "method.height=7"),
    ],
)
def test_method_configs_are_range_checked(method, override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config(None, [f"method.name={method}", override])


def test_error_messages_truncate_long_values(tmp_path):
    long = "x" * 4000
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"train.optimizer={long}"])
    assert len(str(err.value)) < 300 and "..." in str(err.value)
    with pytest.raises(ConfigError, match="the limit is 4096") as err:
        load_config(None, ["train.output_dir=" + "y" * 10000])
    assert len(str(err.value)) < 300


@pytest.mark.parametrize(
    "text, message",
    [
        (b"method: 5\n", "method: expected a mapping"),
        (b"train: [1, 2]\n", "train: expected a mapping"),
        (b"- a\n- b\n", "the top level must be a mapping"),
        (b"train:\n\tmax_steps: 3\n", "not valid YAML"),
        ("train:\n  output_dir: caf\xe9\n".encode("latin-1"), "not UTF-8 text"),
        (b"train: !!python/object/apply:os.system ['echo pwned']\n", "not valid YAML"),
        (b"train:\n  validation_prompts: " + b"[" * 50000 + b"]" * 50000 + b"\n", "not valid YAML"),
        (b"model: {pretrained: x}\x00\x00", "NUL bytes"),
    ],
    ids=["method-scalar", "section-list", "top-list", "tabs", "latin1", "python-tag", "deep", "nul"],
)
def test_malformed_files_are_one_config_error(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path / "c.yaml", text))


@pytest.mark.parametrize(
    "override",
    [
        "train.max_steps",
        "=5",
        "train..max_steps=3",
        "train.max_steps=[1,",
        "train=5",
        "train.max_steps=!!python/name:os.system",
    ],
)
def test_malformed_overrides_are_one_config_error(override):
    with pytest.raises(ConfigError):
        load_config(None, [override])


def test_config_paths_that_are_not_regular_files(tmp_path):
    os.mkfifo(tmp_path / "fifo.yaml")
    for path in ["/dev/zero", tmp_path / "fifo.yaml", tmp_path]:
        with pytest.raises(ConfigError, match="not a regular file"):
            load_config(path)


# --------------------------------------------------------------------------------------------------
# media


@pytest.fixture()
def bad_files(tmp_path):
    os.mkfifo(tmp_path / "fifo.png")
    (tmp_path / "dir.png").mkdir()
    os.symlink("/dev/zero", tmp_path / "zero.png")
    write(
        tmp_path / "bomb.png", bomb_png(100_000, 100_000)
    )  # PIL itself refuses this at open (> 2x its limit)
    write(tmp_path / "bomb2.png", bomb_png(9_000, 9_000))  # 81 M pixels: under PIL's limit, over ours
    write(tmp_path / "empty.png", b"")
    return {name: tmp_path / f"{name}.png" for name in ("fifo", "dir", "zero", "bomb", "bomb2", "empty")}


def test_bomb_png_is_what_it_claims():
    data = bomb_png(100, 50)
    ihdr = data.index(b"IHDR")
    assert struct.unpack(">II", data[ihdr + 4 : ihdr + 12]) == (100, 50)
    assert (
        zlib.crc32(data[ihdr : ihdr + 17]) & 0xFFFFFFFF == struct.unpack(">I", data[ihdr + 17 : ihdr + 21])[0]
    )


def test_images_open_only_regular_files_within_limits(bad_files):
    from mmalign.data.images import DataError, open_image

    expected = {
        "fifo": "not a regular file",
        "dir": "a directory",
        "zero": "not a regular file",
        "bomb": "pixels",
        "bomb2": "over the limit",
        "empty": "empty file",
    }
    for name, path in bad_files.items():
        start = time.monotonic()
        with pytest.raises(DataError, match=expected[name]):
            open_image(str(path), where=f"row {name}")
        assert time.monotonic() - start < 2
    with pytest.raises(DataError, match="pixels"):
        open_image(bomb_png(9_000, 9_000), where="bytes")  # Pick-a-Pic style bytes too


def test_skip_mode_counts_bombs_and_fifos_as_bad_items(bad_files, tmp_path):
    from mmalign.data.pairs import PairDataset, PairRecord

    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(good)
    records = [
        PairRecord("p", str(good), str(path), f"m.jsonl:{i}") for i, path in enumerate(bad_files.values())
    ]
    items = [PairDataset(records, 8, skip_bad=True)[i] for i in range(len(records))]
    assert all("skipped" in it for it in items)


def test_cache_key_never_reads_fifos_or_devices(bad_files, tmp_path):
    from mmalign.data.cache import pair_key
    from mmalign.data.images import DataError
    from mmalign.data.pairs import PairRecord

    for name in ("fifo", "zero", "dir"):
        with pytest.raises(DataError, match="m.jsonl:1"):
            pair_key(PairRecord("p", str(bad_files[name]), str(bad_files[name]), "m.jsonl:1"))


def test_video_reader_refuses_devices(bad_files):
    from mmalign.data.images import DataError
    from mmalign.data.video import available_backends, read_video

    if not available_backends():
        pytest.skip("no video backend")
    for name in ("fifo", "zero", "dir", "empty"):
        with pytest.raises(DataError):
            read_video(bad_files[name])


def test_score_loading_refuses_bad_media_and_counts_it(bad_files, tmp_path):
    from mmalign.rewards import get_reward
    from mmalign.rewards.score import Item, load_media, read_table, score_items

    for path in bad_files.values():
        with pytest.raises(ValueError):
            load_media(path)
    items = [Item(name, "a red square", {"media": path}) for name, path in bad_files.items()]
    summary = score_items(items, {"c": get_reward("color_match")}, tmp_path / "s.jsonl", progress=False)
    assert summary.errors == len(bad_files) == len(read_table(tmp_path / "s.jsonl"))


def test_a_decoder_that_never_returns_becomes_a_bad_item(tmp_path, monkeypatch):
    """Per-item decode timeout: an endless decode (PyAV on a crafted stream loops between frames the same
    way) is stopped after MMALIGN_DECODE_TIMEOUT and counted, in score, in training data and in video."""
    from mmalign import limits
    from mmalign.data import images, video
    from mmalign.data.images import DataError
    from mmalign.rewards import get_reward, score
    from mmalign.rewards.score import Item, load_media, read_table, score_items

    monkeypatch.setattr(limits, "DECODE_TIMEOUT", 0.3)

    def endless(*args, **kwargs):
        while True:
            time.sleep(0.01)

    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(good)
    assert load_media(good)[0].shape == (3, 12, 12)  # a normal decode is untouched by the armed timer

    monkeypatch.setattr(score, "_decode_media", endless)
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"good.png: decoding took over 0.3 s \(MMALIGN_DECODE_TIMEOUT\)"):
        load_media(good)
    items = [Item("a", "a red square", {"media": good}), Item("b", "a red square", {"media": good})]
    summary = score_items(items, {"c": get_reward("color_match")}, tmp_path / "s.jsonl", progress=False)
    assert summary.errors == 2 == len(read_table(tmp_path / "s.jsonl"))

    monkeypatch.setattr(images.Image.Image, "load", endless)
    with pytest.raises(DataError, match="row 3: decoding took over"):
        images.open_image(good, where="row 3")

    monkeypatch.setattr(video, "_DECODERS", {name: endless for name in video._DECODERS})
    monkeypatch.setattr(video, "available_backends", lambda: ["pyav"])
    with pytest.raises(DataError, match="decoding took over"):
        video.read_video(good, backend="pyav")
    assert time.monotonic() - start < 5
    assert signal_timer_is_clear()


def signal_timer_is_clear() -> bool:
    import signal

    return signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_nested_decode_deadlines_keep_the_outer_one():
    import signal

    from mmalign.limits import MediaError, decode_deadline

    with pytest.raises(MediaError, match="outer"):
        with decode_deadline("outer", 0.4):
            with decode_deadline("inner", 5):
                pass
            remaining = signal.getitimer(signal.ITIMER_REAL)[0]
            assert 0 < remaining <= 0.4
            time.sleep(1)
    assert signal_timer_is_clear()


# --------------------------------------------------------------------------------------------------
# the CLI: one line and exit 2 for the user's mistakes, exit 3 with a log for the rest


def test_cli_user_errors_are_one_line(tmp_path, capsys):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    runs = [
        (["ls", "--keys", "nonsense"], "not a method"),
        (
            [
                "score",
                str(tmp_path),
                "--reward",
                "brightness",
                "--reward-arg",
                "scale=abc",
                "--allow-empty-prompt",
                "--out",
                str(tmp_path / "o.jsonl"),
                "--quiet",
            ],
            "unexpected keyword argument 'scale'",
        ),
        (["validate", str(write(tmp_path / "m.yaml", b"method: [1]\n"))], "method: expected a mapping"),
        (["validate", "/dev/zero"], "not a regular file"),
    ]
    for argv, message in runs:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and "Traceback" not in err and len(err.splitlines()) == 1, err


def test_missing_model_is_one_config_error(tmp_path):
    from mmalign.config import ModelConfig
    from mmalign.pipelines import load_model, load_pipeline

    for name in [str(tmp_path / "no-model"), "someone/not-in-the-offline-cache"]:
        with pytest.raises(ConfigError, match="cannot load the diffusers pipeline"):
            load_pipeline(name)
        # `mmalign cache` (denoisers built empty) read model_index.json first: an internal error, not this line
        with pytest.raises(ConfigError, match="cannot load the diffusers pipeline"):
            load_model(ModelConfig(pretrained=name), denoisers=False)


def test_a_missing_vae_is_blamed_on_model_vae_not_the_pipeline(tiny_sd15, monkeypatch):
    """The SDXL recipes name madebyollin/sdxl-vae-fp16-fix; offline without it the error must point at model.vae."""
    from mmalign.pipelines import load_pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"cannot load the VAE someone/no-such-vae \(model.vae\).*offline"):
        load_pipeline(str(tiny_sd15), vae="someone/no-such-vae")


def test_internal_errors_exit_3_with_a_log(tmp_path, monkeypatch, capsys):
    import mmalign.cli as cli
    import mmalign.commands.train as train_commands

    def boom(args):
        raise RuntimeError("something inside broke")

    monkeypatch.setenv("MMALIGN_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.setattr(train_commands, "cmd_validate", boom)
    assert cli.main(["validate", "x.yaml"]) == 3
    err = capsys.readouterr().err.strip()
    assert err.startswith(
        "mmalign validate: internal error: RuntimeError: something inside broke (traceback in "
    )
    log = Path(err.rsplit("traceback in ", 1)[1].rstrip(")"))
    assert (
        log.is_file() and "Traceback (most recent call last)" in log.read_text() and "boom" in log.read_text()
    )


def test_ctrl_c_and_a_closed_pipe_are_one_line_or_none_not_a_traceback(tmp_path, monkeypatch, capsys):
    """Ctrl-C in a command is one line and exit 130, as a shell reports it; a reader that leaves early
    (`mmalign annotate stats ... | head -1`) ends the command quietly with 141 (128 + SIGPIPE), no log."""
    import mmalign.cli as cli
    import mmalign.commands.train as train_commands

    def interrupted(args):
        raise KeyboardInterrupt

    def reader_left(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setenv("MMALIGN_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.setattr(train_commands, "cmd_validate", interrupted)
    assert cli.main(["validate", "x.yaml"]) == 130
    assert capsys.readouterr().err == "mmalign validate: interrupted\n"

    def import_cut_short(args):  # Ctrl-C inside an import: the import machinery fails later, in its own words
        import os
        import signal

        os.kill(
            os.getpid(), signal.SIGINT
        )  # noted by mmalign's handler, which raises KeyboardInterrupt here...

    def swallowed(args):
        try:
            import_cut_short(args)
        except KeyboardInterrupt:  # ...that a library's import lock swallows ("Exception ignored in ...")
            pass
        raise RecursionError("maximum recursion depth exceeded")  # numpy, half imported

    for broken in (import_cut_short, swallowed):
        monkeypatch.setattr(train_commands, "cmd_validate", broken)
        assert cli.main(["validate", "x.yaml"]) == 130
        assert capsys.readouterr().err == "mmalign validate: interrupted\n"
    assert not (tmp_path / "logs").exists()  # no internal-error log for it
    monkeypatch.setattr(train_commands, "cmd_validate", reader_left)
    assert cli.main(["validate", "x.yaml"]) == 141
    assert capsys.readouterr().err == "" and not (tmp_path / "logs").exists()


def test_training_stopped_exits_3_with_a_log(tmp_path, monkeypatch, capsys):
    import mmalign.cli as cli
    import mmalign.commands.train as train_commands
    from mmalign.trainers.loop import TrainingError

    def nan(args):
        raise TrainingError("non-finite loss (nan) at step 3 on items [0]; last checkpoint: none.")

    monkeypatch.setenv("MMALIGN_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.setattr(train_commands, "cmd_validate", nan)
    assert cli.main(["validate", "x.yaml"]) == 3
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("mmalign validate: training stopped: non-finite loss (nan) at step 3")
        and len(err.splitlines()) == 1
    )
    log = Path(err.rsplit("traceback in ", 1)[1].rstrip(")"))
    assert log.is_file() and "TrainingError: non-finite loss" in log.read_text()


# --------------------------------------------------------------------------------------------------
# item 6: one image scored with two prompts is two rows


def test_score_rows_are_keyed_by_media_and_prompt(tmp_path):
    from mmalign.rewards import get_reward
    from mmalign.rewards.score import collect_items, read_table, score_items

    arr = np.zeros((16, 16, 3), np.uint8)
    arr[..., 0] = 220
    Image.fromarray(arr).save(tmp_path / "red.png")
    rows = [{"path": "red.png", "prompt": "a red square"}, {"path": "red.png", "prompt": "a blue square"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "s.jsonl"
    reward = {"c": get_reward("color_match")}
    summary = score_items(collect_items(tmp_path / "m.jsonl"), reward, out, progress=False)
    scored = read_table(out)
    assert summary.scored == 2 and [r["prompt"] for r in scored] == ["a red square", "a blue square"]
    assert scored[0]["c"] > scored[1]["c"]  # each row scored with its own prompt
    again = score_items(collect_items(tmp_path / "m.jsonl"), reward, out, progress=False)  # resume: both done
    assert again.skipped == 2 and again.scored == 0 and read_table(out) == scored


def test_lora_targets_that_match_nothing_are_one_config_error(tiny_sd15):
    """Fuzz case train-00631: peft's NoMatchingPeftModuleError was an exit-3 internal error."""
    from mmalign.pipelines import load_pipeline
    from mmalign.trainers.loop import add_lora

    cfg = load_config(None, ["lora.target_modules=[nonexistent_module]"])
    pipe, _ = load_pipeline(str(tiny_sd15))
    with pytest.raises(
        ConfigError, match=r"lora.target_modules=\['nonexistent_module'\] on UNet2DConditionModel"
    ):
        add_lora(pipe.unet, cfg.lora)


def test_a_byte_order_mark_is_not_part_of_the_first_column_or_prompt(tmp_path):
    """Excel's "CSV UTF-8" and Windows editors start a file with a byte-order mark: it used to glue itself to the
    first column name (a pairs CSV lost its `prompt` column) or to the first prompt of a .txt file."""
    from conftest import write_pair_images

    from mmalign.data.manifest import read_prompts
    from mmalign.data.pairs import load_pairs
    from mmalign.rewards.score import collect_items

    bom = "\ufeff"
    (tmp_path / "p.txt").write_text(bom + "a red circle\nblue square\n", encoding="utf-8")
    (tmp_path / "p.csv").write_text(bom + "prompt,group\nred circle,g1\n", encoding="utf-8")
    assert [p.prompt for p in read_prompts(tmp_path / "p.txt")] == ["a red circle", "blue square"]
    assert [(p.prompt, p.group) for p in read_prompts(tmp_path / "p.csv")] == [("red circle", "g1")]

    manifest = write_pair_images(tmp_path / "pairs", n=2)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    csv_pairs = tmp_path / "pairs" / "pairs.csv"
    csv_pairs.write_text(
        bom
        + "prompt,chosen,rejected\n"
        + "".join(f"{r['prompt']},{r['chosen']},{r['rejected']}\n" for r in rows),
        encoding="utf-8",
    )
    jsonl_pairs = tmp_path / "pairs" / "bom.jsonl"
    jsonl_pairs.write_text(bom + manifest.read_text(), encoding="utf-8")
    for source in (csv_pairs, jsonl_pairs):
        assert [r.prompt for r in load_pairs(source)[0]] == [r["prompt"] for r in rows]
    assert [it.prompt for it in collect_items(csv_pairs)] == [r["prompt"] for r in rows]


def test_an_empty_prompt_row_is_named_as_such_and_an_empty_row_skipped(tmp_path):
    from mmalign.data.images import DataError
    from mmalign.data.manifest import read_prompts

    (tmp_path / "p.csv").write_text('prompt,negative_prompt\n"a red, circle",blurry\n,\nblue square,\n')
    assert [p.prompt for p in read_prompts(tmp_path / "p.csv")] == ["a red, circle", "blue square"]
    (tmp_path / "q.csv").write_text("prompt,negative_prompt\nred,\n,blurry\n")
    with pytest.raises(DataError, match=r"q.csv:3: empty prompt \(the row has negative_prompt='blurry'\)"):
        read_prompts(tmp_path / "q.csv")


def test_a_trained_path_that_is_missing_or_one_level_too_deep_says_so(tmp_path):
    from mmalign.pipelines.runtime import trained_kinds

    with pytest.raises(ValueError, match="nope: not found; give a run's final/ folder"):
        trained_kinds(str(tmp_path / "nope"))
    unet = tmp_path / "final" / "unet"
    unet.mkdir(parents=True)
    (unet / "config.json").write_text("{}")
    with pytest.raises(
        ValueError,
        match=f"a fine-tuned unet itself; give the final/ folder that holds it \\({tmp_path / 'final'}\\)",
    ):
        trained_kinds(str(unet))
    assert trained_kinds(str(tmp_path / "final")) == {str(tmp_path / "final"): "full"}


def test_a_reward_model_that_is_not_cached_offline_is_an_input_error(tmp_path, monkeypatch, capsys):
    """`--reward pickscore` offline with nothing cached: one line naming the reward (exit 2), not an internal error."""
    from PIL import Image

    from mmalign.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red square")
    assert main(["score", str(tmp_path), "--reward", "pickscore", "--out", str(tmp_path / "s.jsonl")]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("mmalign score: error: --reward pickscore: cannot load its model")
        and "HF_HUB_OFFLINE=1" in err
    )
