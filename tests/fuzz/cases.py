"""A seeded generator of bad (and good) inputs for ``mmalign validate|train|score|label``.

Every case says what a correct program does with it: ``expect="error"`` (exit 2 with one line naming the
file, key or row) or ``expect="accept"`` (exit 0; for ``score``/``train`` with unreadable items, the run must
also *report* them: ``errors`` in the score summary, ``skipped`` in the training log). Cases are plain data:
the runner (``run.py``) writes each case's files into its own folder and runs the command in a subprocess.

Placeholders in arguments and text files: ``{dir}`` (the case's folder) and ``{fx}`` (shared fixtures built
once by the runner: a tiny SD1.5 pipeline, good images, a pair manifest, a scores file, large images).
"""

from __future__ import annotations

import io
import json
import random
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

# File contents: bytes, or a special kind the runner creates.
FIFO, DIR = ("fifo",), ("dir",)


def symlink(target: str) -> tuple[str, str]:
    return ("symlink", target)


@dataclass
class Case:
    id: str
    command: str  # validate | train | score | label
    label: str  # family/mutation, e.g. "validate/range:train.log_every"
    expect: str  # error | accept
    argv: list[str]
    files: dict[str, Any] = field(default_factory=dict)
    report: int | None = (
        None  # accept cases with bad items: how many must be reported (score errors / train skipped)
    )


# --------------------------------------------------------------------------------------------------
# media


def png(w: int = 12, h: int = 10, mode: str = "RGB", seed: int = 0) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16))
    else:
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def encoded(fmt: str, seed: int = 0, **kw: Any) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    frames = [Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)) for _ in range(3)]
    buf = io.BytesIO()
    if fmt == "GIF":
        frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    elif fmt == "CMYK":
        frames[0].convert("CMYK").save(buf, format="JPEG")
    else:
        frames[0].save(buf, format=fmt, **kw)
    return buf.getvalue()


def bomb_png(w: int, h: int) -> bytes:
    """A valid 1x1 PNG whose header claims ``w x h`` (CRC fixed): tiny on disk, huge once decoded."""
    data = bytearray(png(1, 1))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", w, h)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


# name -> (content, is it readable media?) ; contents referring to {fx} are prebuilt fixtures
def bad_media(rng: random.Random) -> dict[str, tuple[Any, bool]]:
    good = png(seed=rng.randrange(1000))
    return {
        "missing": (None, False),
        "directory": (DIR, False),
        "dev_zero": (symlink("/dev/zero"), False),
        "fifo": (FIFO, False),
        "empty": (b"", False),
        "truncated_png": (good[: len(good) // 2], False),
        "random_bytes": (bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400))), False),
        "text_as_png": (b"hello, I am not an image\n" * 3, False),
        "png_header_only": (good[:33], False),
        "bomb_100k": (bomb_png(100_000, 100_000), False),
        "bomb_10k": (bomb_png(10_000, 9_000), False),
        "bomb_zero": (bomb_png(0, 0), False),
        "huge_declared_gif": (b"GIF89a" + struct.pack("<HH", 65535, 65535) + b"\x00\x00\x00;", False),
        "over_pixel_limit": ("{fx}/media/big.png", False),
        "truncated_jpeg": (encoded("JPEG")[:200], False),
        "ok_1x1": (png(1, 1), True),
        "ok_rgba": (png(mode="RGBA"), True),
        "ok_gray16": (png(mode="I;16"), True),
        "ok_palette": (png(mode="P"), True),
        "ok_gif": (encoded("GIF"), True),
        "ok_jpeg_cmyk": (encoded("CMYK"), True),
        "ok_webp": (encoded("WEBP"), True),
        "ok_bmp": (encoded("BMP"), True),
        "ok_tall": (png(3, 200), True),
    }


# --------------------------------------------------------------------------------------------------
# configs


def base_config() -> dict[str, Any]:
    return {
        "model": {"pretrained": "{fx}/tiny", "resolution": 16},
        "data": {"source": "{fx}/pairs.jsonl", "cache_dir": "{dir}/cache", "bucket_step": 8},
        "train": {
            "output_dir": "{dir}/run",
            "max_steps": 1,
            "batch_size": 2,
            "report_to": "none",
            "progress": False,
            "checkpoint_every": 0,
            "learning_rate": 1e-4,
            "scale_lr": False,
        },
        "lora": {"rank": 2},
    }


INF = float("inf")
# key -> (kind, low, high, low_inclusive, high_inclusive); ints and floats that carry a range
RANGES: dict[str, tuple] = {
    "model.resolution": ("int8", 8, 8192),
    "lora.rank": ("int", 1, 4096),
    "data.max_items": ("int", 1, None),
    "data.num_workers": ("int", 0, 64),
    "data.cache_batch_size": ("int", 1, 4096),
    "data.bucket_step": ("int8", 8, 1024),
    "data.bucket_max_ratio": ("float", 1, 8, True, True),
    "train.max_steps": ("int", 1, 10**9),
    "train.batch_size": ("int", 1, 65536),
    "train.gradient_accumulation_steps": ("int", 1, 65536),
    "train.warmup_steps": ("int", 0, 10**9),
    "train.seed": ("int", 0, 2**32 - 1),
    "train.checkpoint_every": ("int", 0, None),
    "train.checkpoints_total_limit": ("int", 1, None),
    "train.log_every": ("int", 1, None),
    "train.validation_steps": ("int", 1, 1000),
    "train.validation_seed": ("int", 0, 2**63 - 1),
    "lora.alpha": ("float>", 0, None),
    "lora.dropout": ("float", 0, 1, True, False),
    "data.caption_dropout": ("float", 0, 1, True, False),
    "train.learning_rate": ("float", 0, None),
    "train.weight_decay": ("float", 0, None),
    "train.adam_beta1": ("float", 0, 1, True, False),
    "train.adam_beta2": ("float", 0, 1, True, False),
    "train.adam_epsilon": ("float>", 0, None),
    "train.max_grad_norm": ("float", 0, None),
    "train.validation_guidance": ("float", None, None),
    "method.beta": ("float>", 0, None),
    "method.sft_weight": ("float", 0, None),
    "method.alpha": ("float>", 0, None),
}
OPTIONAL = {
    "data.max_items",
    "train.checkpoints_total_limit",
    "lora.alpha",
}  # None means "no limit" / "default"
CHOICES: dict[str, list[str]] = {
    "model.family": ["auto", "sd15", "sdxl", "cogvideox", "wan", "toy_video"],
    "data.format": ["auto", "manifest", "pickapic"],
    "data.on_bad_item": ["error", "skip"],
    "train.mixed_precision": ["no", "fp16", "bf16"],
    "train.optimizer": ["adamw", "adafactor", "adamw8bit"],
    "train.report_to": ["tensorboard", "wandb", "none"],
    "train.lr_scheduler": [
        "constant",
        "constant_with_warmup",
        "linear",
        "cosine",
        "cosine_with_restarts",
        "polynomial",
    ],
    "lora.init": ["gaussian", "default"],
    "method.loss_type": ["sigmoid", "hinge", "ipo"],
    "train.compile": ["none", "regional", "full"],
    "train.attention_backend": ["sdpa", "xformers"],
}
BOOLS = [
    "lora.enabled",
    "data.keep_ties",
    "data.random_flip",
    "data.random_crop",
    "data.cache",
    "data.buckets",
    "train.channels_last",
    "train.fused_adamw",
    "train.scale_lr",
    "train.gradient_checkpointing",
    "train.allow_tf32",
    "train.progress",
    "model.trust_remote_code",
    "method.independent_noise",
    "method.swap_pairs",
]
STRINGS = ["model.pretrained", "train.output_dir", "data.split"]  # non-empty strings
OTHER_METHODS: dict[str, dict[str, tuple]] = {  # method -> key -> (valid values, invalid values)
    "inversion_dpo": {
        "num_inversion_steps": ([10, 80, 1000], [0, -5, 1001, 10**12]),
        "trajectory_steps": ([1, 8], [0, 81, -1]),
        "sign": ([1, -1], [0, 2, 0.5]),
        "mode": (["inverted_noise", "trajectory"], ["x", 3]),
        "cache_dtype": (["float16"], ["int8"]),
        "inversion_batch_size": ([1, 64], [0, 10**7]),
        "steps_offset": ([0, 1], [-1, 5000]),
        "inversion_guidance": ([1.0, 7.5], [".nan", ".inf"]),
    },
    "self_npo": {
        "teacher_steps": ([1, 5], [0, 25, -3]),
        "grid_steps": ([6, 1000], [1, 1001]),
        "ema_decay": ([0.0, 0.999, 1.0], [1.5, -0.1, ".nan"]),
        "huber_c": ([1e-3], [0, -1, ".inf"]),
        "teacher_guidance": ([-5, 0], [".inf"]),
        "start": (["noise", "real"], ["x"]),
    },
    "dense_dpo": {
        "segment_seconds": ([0.5, 1.0], [0, -1, 10**6]),
        "min_non_tie": ([0, 0.5], [1, 1.5, -0.1]),
        "height": ([64, 480], [7, 0, 100000]),
        "width": ([832], [9, -8]),
        "num_frames": ([49], [0, -1, 10**9]),
        "fps": ([8, 16], [0, -1, ".nan"]),
        "straddle": (["tie", "agree"], ["x"]),
        "sft_weight": ([0, 100.0], [-1, ".nan"]),
    },
}


def dump(tree: Any) -> bytes:
    import yaml

    return yaml.safe_dump(tree, sort_keys=False, allow_unicode=True).encode()


def set_key(tree: dict, dotted: str, value: Any) -> None:
    section, key = dotted.split(".", 1)
    tree.setdefault(section, {})[key] = value


def in_range(spec: tuple, value: float) -> bool:
    kind, lo, hi = spec[:3]
    lo_incl = not kind.endswith(">") if len(spec) < 4 else spec[3]
    hi_incl = True if len(spec) < 5 else spec[4]
    ok = lo is None or (value >= lo if lo_incl else value > lo)
    return ok and (hi is None or (value <= hi if hi_incl else value < hi))


def valid_value(rng: random.Random, key: str) -> Any:
    kind, lo, hi = RANGES[key][:3]
    if kind.startswith("int"):
        top = hi if hi is not None else 10**6
        value = rng.choice([lo, top, rng.randint(lo, min(top, lo + 1000))])
        return value - value % 8 if kind == "int8" and value % 8 else value
    lo_f = lo if lo is not None else -1e3
    value = rng.choice([rng.uniform(lo_f, hi if hi is not None else 1e3), lo_f + 1e-6])
    return value if in_range(RANGES[key], value) else (lo_f + (hi or lo_f + 1)) / 2


def invalid_value(rng: random.Random, key: str) -> Any:
    kind, lo, hi = RANGES[key][:3]
    options: list[Any] = ["abc", [1, 2], {"a": 1}, True, ".nan", ".inf", "-.inf"]
    if kind.startswith("int"):
        options += [1.5, "1e30"] + (
            [] if key in OPTIONAL else [None]
        )  # None is valid where the field is optional
        if lo is not None:
            options += [lo - 1, lo - 10**12]
        if hi is not None:
            options += [hi + 1, 10**30]
        if kind == "int8":
            options += [lo + 3, 20]
    else:
        if lo is not None:
            options += [lo - 1e-3, -1e30] + ([lo] if kind.endswith(">") else [])
        if hi is not None:
            options += [hi + 0.5, 1e30] + ([hi] if len(RANGES[key]) > 4 and not RANGES[key][4] else [])
    value = rng.choice(options)
    return value


def config_text(tree: dict, raw: dict[str, str] | None = None) -> bytes:
    """YAML of ``tree``; ``raw`` maps dotted keys to YAML spellings written verbatim (``.nan``, ``1e30``)."""
    for n, dotted in enumerate(raw or {}):
        set_key(tree, dotted, f"__RAW{n}__")
    text = dump(tree).decode()
    for n, spelling in enumerate((raw or {}).values()):
        text = text.replace(f"__RAW{n}__", spelling)
    return text.encode()


SPECIAL = {".nan", ".inf", "-.inf", "1e30"}


def validate_case(rng: random.Random, i: int) -> Case:
    tree = base_config()
    raw: dict[str, str] = {}
    files: dict[str, Any] = {}
    overrides: list[str] = []
    cfg_path = "{dir}/cfg.yaml"
    kind = rng.choices(
        [
            "range_bad",
            "range_good",
            "choice",
            "bool",
            "string",
            "method",
            "structure",
            "file",
            "override",
            "anchor",
        ],
        [22, 12, 8, 5, 6, 14, 12, 8, 10, 3],
    )[0]
    expect = "error"
    label = kind
    if kind in ("range_bad", "range_good"):
        key = rng.choice(list(RANGES))
        good = kind == "range_good"
        value = valid_value(rng, key) if good else invalid_value(rng, key)
        expect = "accept" if good else "error"
        label = f"{kind}:{key}"
        if isinstance(value, str) and value in SPECIAL:
            raw[key] = value
        else:
            set_key(tree, key, value)
    elif kind == "choice":
        key = rng.choice(list(CHOICES))
        if rng.random() < 0.4:
            set_key(tree, key, rng.choice(CHOICES[key]))
            expect = "accept"
        else:
            set_key(tree, key, rng.choice(["", "nope", 5, [1], None, "x" * 5000, CHOICES[key][0].upper()]))
        label = f"choice:{key}"
    elif kind == "bool":
        key = rng.choice(BOOLS)
        value = rng.choice([True, False, "maybe", 2, [True], None, "true"])
        expect = "accept" if isinstance(value, bool) else "error"
        set_key(tree, key, value)
        label = f"bool:{key}"
    elif kind == "string":
        key = rng.choice(STRINGS)
        value = rng.choice(["", "   ", "x" * 5000, [1, 2], {"a": "b"}, "ok/path", "unicodé ☃", "nul\x00byte"])
        expect = "accept" if value in ("ok/path", "unicodé ☃") else "error"
        set_key(tree, key, value)
        label = f"string:{key}"
    elif kind == "method":
        name = rng.choice(list(OTHER_METHODS) + ["diffusion_dpo", "bogus", 5, None, ["x"]])
        label = f"method:{name}"
        if isinstance(name, str) and name in OTHER_METHODS:
            key = rng.choice(list(OTHER_METHODS[name]))
            good_values, bad_values = OTHER_METHODS[name][key]
            good = rng.random() < 0.4
            value = rng.choice(good_values if good else bad_values)
            expect = "accept" if good else "error"
            tree["method"] = {"name": name}
            if isinstance(value, str) and value in SPECIAL:
                raw[f"method.{key}"] = value
            else:
                tree["method"][key] = value
            label += f".{key}"
        elif name == "diffusion_dpo":
            choice = rng.choice(["js_hinge", "js_sigmoid", "alpha", "unknown_key"])
            tree["method"] = {
                "name": name,
                **{
                    "js_hinge": {"divergence": "js", "loss_type": "hinge"},
                    "js_sigmoid": {"divergence": "js"},
                    "alpha": {"divergence": "alpha", "alpha": 0.3},
                    "unknown_key": {"bata": 5},
                }[choice],
            }
            expect = "accept" if choice in ("js_sigmoid", "alpha") else "error"
            label += f".{choice}"
        else:
            tree["method"] = {"name": name}
    elif kind == "structure":
        variant = rng.choice(
            [
                "unknown_key",
                "typo_section",
                "section_scalar",
                "section_list",
                "method_scalar",
                "top_list",
                "top_scalar",
                "empty_file",
                "null_section",
                "int_key",
                "yaml_error",
                "tabs",
                "python_tag",
                "deep_nesting",
                "duplicate_keys",
                "long_key",
                "bom",
            ]
        )
        label = f"structure:{variant}"
        text = None
        if variant == "unknown_key":
            section = rng.choice(["model", "data", "train", "lora", "method"])
            tree.setdefault(section, {})[
                rng.choice(["max_step", "lr", "x", "learning-rate", "Resolution"])
            ] = 1
        elif variant == "typo_section":
            tree["trian"] = {"max_steps": 3}
        elif variant == "section_scalar":
            tree[rng.choice(["model", "data", "train", "lora"])] = rng.choice([5, "x", True])
        elif variant == "section_list":
            tree[rng.choice(["model", "data", "train", "lora"])] = [1, 2]
        elif variant == "method_scalar":
            tree["method"] = rng.choice(["diffusion_dpo", 3, [1]])
        elif variant == "top_list":
            text = b"- model\n- train\n"
        elif variant == "top_scalar":
            text = b"just a string\n"
        elif variant == "empty_file":
            text, expect = b"", "accept"
        elif variant == "null_section":
            text, expect = dump(tree) + b"lora:\n", "accept"
        elif variant == "int_key":
            text = dump(tree) + b"1: 2\n"
        elif variant == "yaml_error":
            full = dump(tree)
            text = full[: rng.randrange(5, len(full))] + rng.choice([b"[", b": : :", b"\n  - ]", b"{a: [}"])
        elif variant == "tabs":
            text = b"train:\n\tmax_steps: 3\n"
        elif variant == "python_tag":
            text = b"train: !!python/object/apply:os.system ['echo pwned']\n"
        elif variant == "deep_nesting":
            depth = rng.choice([200, 5000, 50000])
            text = b"train:\n  validation_prompts: " + b"[" * depth + b"]" * depth + b"\n"
        elif variant == "duplicate_keys":
            text, expect = dump(tree) + b"lora:\n  rank: 4\n", "accept"
        elif variant == "long_key":
            tree["train"]["k" * 100000] = 1
        elif variant == "bom":
            text, expect = b"\xef\xbb\xbf" + dump(tree), "accept"
        if text is not None:
            files["cfg.yaml"] = text
    elif kind == "file":
        variant = rng.choice(
            [
                "missing",
                "directory",
                "dev_zero",
                "fifo",
                "binary",
                "latin1",
                "utf16",
                "huge",
                "nul_bytes",
                "symlink_loop",
            ]
        )
        label = f"file:{variant}"
        if variant == "missing":
            cfg_path = "{dir}/nope.yaml"
        elif variant == "directory":
            files["cfg.yaml"] = DIR
        elif variant == "dev_zero":
            cfg_path = "/dev/zero"
        elif variant == "fifo":
            files["cfg.yaml"] = FIFO
        elif variant == "binary":
            files["cfg.yaml"] = bytes(rng.randrange(256) for _ in range(300))
        elif variant == "latin1":
            files["cfg.yaml"] = "train:\n  output_dir: caf\xe9\n".encode("latin-1")
        elif variant == "utf16":
            files["cfg.yaml"] = "train:\n  max_steps: 3\n".encode("utf-16")
        elif variant == "huge":
            files["cfg.yaml"] = dump(tree) + b"# " + b"x" * (3 << 20) + b"\n"
        elif variant == "nul_bytes":
            files["cfg.yaml"] = dump(tree) + b"\x00\x00"
        elif variant == "symlink_loop":
            files["cfg.yaml"] = symlink("{dir}/cfg.yaml")
    elif kind == "override":
        variant = rng.choice(
            [
                "no_equals",
                "empty_key",
                "double_dot",
                "bad_yaml",
                "section_to_scalar",
                "unknown",
                "good",
                "good_method",
                "python_tag",
                "long",
                "alias_bomb",
                "dot_key",
            ]
        )
        label = f"override:{variant}"
        overrides.append(
            {
                "no_equals": "train.max_steps",
                "empty_key": "=5",
                "double_dot": "train..max_steps=3",
                "bad_yaml": "train.max_steps=[1,",
                "section_to_scalar": "train=5",
                "unknown": "train.nope=1",
                "good": "train.max_steps=7",
                "good_method": "method.name=self_npo",
                "python_tag": "train.max_steps=!!python/name:os.system",
                "long": "train.output_dir=" + "x" * 10000,
                "alias_bomb": "train.validation_prompts=" + billion_laughs_flow(),
                "dot_key": "train.=3",
            }[variant]
        )
        expect = "accept" if variant.startswith("good") else "error"
    elif kind == "anchor":
        variant = rng.choice(["bomb", "legit"])
        label = f"anchor:{variant}"
        if variant == "bomb":
            files["cfg.yaml"] = billion_laughs(
                rng.choice(
                    [
                        "train.validation_prompts",
                        "lora.target_modules",
                        "train.max_steps",
                        "model.pretrained",
                        "nonsense",
                    ]
                )
            )
        else:
            files["cfg.yaml"] = (
                b"model: {pretrained: &p '{fx}/tiny', resolution: 16}\ntrain: {output_dir: *p, max_steps: 2}\n"
            )
            expect = "accept"
    if "cfg.yaml" not in files and cfg_path == "{dir}/cfg.yaml":
        files["cfg.yaml"] = config_text(tree, raw)
    return Case(
        f"validate-{i:05d}",
        "validate",
        f"validate/{label}",
        expect,
        ["validate", cfg_path, *overrides],
        files,
    )


def billion_laughs(key: str) -> bytes:
    """About 300 bytes that expand to 9**8 strings: every level is an anchored list of nine aliases of the last."""
    levels = ["&a [lol,lol,lol,lol,lol,lol,lol,lol,lol]"]
    for prev, name in zip("abcdefg", "bcdefgh"):
        levels.append(f"&{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    value = "[" + ", ".join(levels) + "]"
    section, _, field_name = key.partition(".")
    if field_name in ("validation_prompts", "target_modules"):
        value = f"[{value}]"  # the first item of the list is the bomb
    return (f"{section}:\n  {field_name}: {value}\n" if field_name else f"{section}: {value}\n").encode()


def billion_laughs_flow() -> str:
    return "&a [[&b [&c [lol,lol,lol,lol,lol,lol,lol,lol], *c, *c, *c, *c, *c, *c, *c], *b, *b, *b, *b, *b, *b, *b]]"


# --------------------------------------------------------------------------------------------------
# train: configs valid for validate that training must run or refuse cleanly, and bad data


def train_config_case(rng: random.Random, i: int) -> Case:
    tree = base_config()
    options = {
        "lr_cosine": ("train.lr_scheduler", "cosine", "accept"),
        "lr_poly": ("train.lr_scheduler", "polynomial", "accept"),
        "restarts": ("train.lr_scheduler", "cosine_with_restarts", "accept"),
        "adafactor": ("train.optimizer", "adafactor", "accept"),
        "adamw8bit": ("train.optimizer", "adamw8bit", "error"),
        "fp16": ("train.mixed_precision", "fp16", "error"),  # CPU: no fp16 autocast, refused before loading
        "bf16": ("train.mixed_precision", "bf16", "accept"),
        "batch_64": ("train.batch_size", 64, "error"),
        "accum_3": ("train.gradient_accumulation_steps", 3, "accept"),
        "max_items_1": ("data.max_items", 1, "accept"),
        "workers_2": ("data.num_workers", 2, "accept"),
        "res_8": ("model.resolution", 8, "accept"),
        "res_24": ("model.resolution", 24, "accept"),
        "dropout_09": ("data.caption_dropout", 0.9, "accept"),
        "no_cache": ("data.cache", False, "accept"),
        "random_crop": ("data.random_crop", True, "accept"),
        "warmup_big": ("train.warmup_steps", 1000, "accept"),
        "ckpt_every_1": ("train.checkpoint_every", 1, "accept"),
        "log_every_1000": ("train.log_every", 1000, "accept"),
        "full_ft": ("lora.enabled", False, "accept"),
        "ipo": ("method.loss_type", "ipo", "accept"),
        "rank_64": ("lora.rank", 64, "accept"),
        "bad_target": ("lora.target_modules", ["nonexistent_module"], "error"),
        "missing_model": ("model.pretrained", "{dir}/no-model", "error"),
        "model_is_file": ("model.pretrained", "{fx}/pairs.jsonl", "error"),
        "hub_id_offline": ("model.pretrained", "someone/not-cached-model", "error"),
        "broken_model_index": ("model.pretrained", "{dir}/broken-model", "error"),
        "source_missing": ("data.source", "{dir}/none.jsonl", "error"),
        "source_empty": ("data.source", "", "error"),
        "source_dir": ("data.source", "{fx}/media", "error"),
        "source_dev_zero": ("data.source", "/dev/zero", "error"),
        "resume_missing": ("train.resume", "{dir}/no-ckpt", "error"),
        "family_wrong": ("model.family", "sdxl", "error"),
        "output_is_file": ("train.output_dir", "{fx}/pairs.jsonl", "error"),
        "validation": ("train.validation_every", 1, "accept"),
    }
    name = rng.choice(list(options))
    key, value, expect = options[name]
    set_key(tree, key, value)
    files: dict[str, Any] = {}
    if name == "max_items_1":
        set_key(tree, "train.batch_size", 1)
    if name == "validation":
        set_key(tree, "train.validation_prompts", ["a red square"])
        set_key(tree, "train.validation_steps", 2)
    if name == "broken_model_index":
        files["broken-model/model_index.json"] = rng.choice([b"{not json", b"[1,2]", b'{"_class_name": 5}'])
    files["cfg.yaml"] = dump(tree)
    return Case(f"train-{i:05d}", "train", f"train-config/{name}", expect, ["train", "{dir}/cfg.yaml"], files)


def manifest_rows(n: int = 4) -> list[dict[str, Any]]:
    return [
        {"prompt": "a red square", "chosen": f"{{fx}}/img/{k}_w.png", "rejected": f"{{fx}}/img/{k}_l.png"}
        for k in range(n)
    ]


def jsonl(rows: list[Any]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def train_data_case(rng: random.Random, i: int) -> Case:
    tree = base_config()
    tree["data"]["source"] = "{dir}/pairs.jsonl"
    skip = rng.random() < 0.5
    tree["data"]["on_bad_item"] = "skip" if skip else "error"
    files: dict[str, Any] = {}
    rows: list[Any] = manifest_rows()
    report = None
    if rng.random() < 0.6:  # one bad (or unusual but fine) image in an otherwise good manifest
        media = bad_media(rng)
        name = rng.choice(list(media))
        content, readable = media[name]
        side = rng.choice(["chosen", "rejected"])
        target = f"{{dir}}/item_{name}.png"
        if isinstance(content, str):
            target = content
        elif content is not None:
            files[f"item_{name}.png"] = content
        rows[rng.randrange(len(rows))][side] = target
        expect = "accept" if readable or skip else "error"
        report = None if readable else 1
        label = f"train-data/{'skip' if skip else 'error'}:{name}"
        files["pairs.jsonl"] = jsonl(rows)
    else:
        variant = rng.choice(
            [
                "bad_json_line",
                "list_row",
                "missing_prompt",
                "label_bad",
                "label_2",
                "wrong_columns",
                "empty",
                "binary",
                "latin1",
                "prompt_number",
                "prompt_dict",
                "path_number",
                "null_chosen",
                "csv_ok",
                "csv_ragged",
                "all_bad",
                "pickapic_ok",
                "blank_lines",
                "huge_line",
                "nested_path",
            ]
        )
        label = f"train-data/{variant}"
        expect = "error"
        text = None
        if variant == "bad_json_line":
            text = jsonl(rows[:2]) + b'{"prompt": "x", "chosen": \n' + jsonl(rows[2:])
        elif variant == "list_row":
            text = jsonl(rows[:2] + [["a", "b"]] + rows[2:])
        elif variant == "missing_prompt":
            del rows[1]["prompt"]
        elif variant == "label_bad":
            rows = [
                {"prompt": "p", "image_0": r["chosen"], "image_1": r["rejected"], "label_0": "x"}
                for r in rows
            ]
        elif variant == "label_2":
            rows = [
                {"prompt": "p", "image_0": r["chosen"], "image_1": r["rejected"], "label_0": 2} for r in rows
            ]
        elif variant == "wrong_columns":
            rows = [{"text": "p", "a": r["chosen"]} for r in rows]
        elif variant == "empty":
            text = b""
        elif variant == "binary":
            text = bytes(rng.randrange(256) for _ in range(500))
        elif variant == "latin1":
            text = jsonl(rows).replace(b"a red square", "caf\xe9".encode("latin-1"))
        elif variant == "prompt_number":
            rows[0]["prompt"], expect = 12345, "accept"
        elif variant == "prompt_dict":
            rows[0]["prompt"] = {"a": 1}
        elif variant == "path_number":
            rows[0]["chosen"], expect = 7, ("accept" if skip else "error")
            report = 1
        elif variant == "null_chosen":
            rows[0]["chosen"] = None
        elif variant == "csv_ok":
            tree["data"]["source"] = "{dir}/pairs.csv"
            files["pairs.csv"] = (
                "prompt,chosen,rejected\n"
                + "".join(f"{r['prompt']},{r['chosen']},{r['rejected']}\n" for r in rows)
            ).encode()
            expect = "accept"
        elif variant == "csv_ragged":
            tree["data"]["source"] = "{dir}/pairs.csv"
            files["pairs.csv"] = b"prompt,chosen,rejected\na,b\n,,,,,\n"
        elif variant == "all_bad":
            rows = [{"prompt": "p", "chosen": "{dir}/nope.png", "rejected": "{dir}/nope2.png"}]
        elif variant == "pickapic_ok":
            rows = [
                {"caption": "a red square", "jpg_0": r["chosen"], "jpg_1": r["rejected"], "label_0": 1}
                for r in rows
            ]
            expect = "accept"
        elif variant == "blank_lines":
            text, expect = b"\n\n" + jsonl(rows) + b"\n   \n", "accept"
        elif variant == "huge_line":
            rows[0]["prompt"], expect = "red " * 50000, "accept"
        elif variant == "nested_path":
            rows[0]["chosen"] = {"path": rows[0]["chosen"]}
        if "pairs.csv" not in files:
            files["pairs.jsonl"] = text if text is not None else jsonl(rows)
    files["cfg.yaml"] = dump(tree)
    return Case(f"train-{i:05d}", "train", label, expect, ["train", "{dir}/cfg.yaml"], files, report)


# --------------------------------------------------------------------------------------------------
# score and label


def score_case(rng: random.Random, i: int) -> Case:
    files: dict[str, Any] = {}
    reward = ["--reward", rng.choice(["brightness", "color_match"])]
    out = ["--out", "{dir}/scores.jsonl"]
    kind = rng.choices(["folder_item", "manifest_item", "manifest", "reward", "args"], [35, 20, 20, 15, 10])[
        0
    ]
    report = None
    for k in range(3):
        files[f"media/ok{k}.png"] = png(seed=k)
    files["media/prompt.txt"] = b"a red square\n"  # score refuses media without a prompt
    source = "{dir}/media"
    if kind in ("folder_item", "manifest_item"):
        media = bad_media(rng)
        name = rng.choice(list(media))
        content, readable = media[name]
        if kind == "folder_item":
            if content is None or isinstance(content, str):
                content = (
                    b"not an image" if content is None else None
                )  # over_pixel_limit: copied by the runner
            files[f"media/bad_{name}.png"] = (
                content if content is not None else ("copy", "{fx}/media/big.png")
            )
            listed = content not in (DIR, FIFO) and not (
                isinstance(content, tuple) and content[0] == "symlink"
            )
            report = 0 if (readable or not listed) else 1
        else:
            target = content if isinstance(content, str) else f"{{dir}}/bad_{name}.png"
            if content is not None and not isinstance(content, str):
                files[f"bad_{name}.png"] = content
            rows = [{"path": f"media/ok{k}.png", "prompt": "a red square"} for k in range(3)]
            rows.append({"path": target, "prompt": "a blue square"})
            files["m.jsonl"] = jsonl(rows)
            source = "{dir}/m.jsonl"
            report = 0 if readable else 1
        label = f"score/{kind}:{name}"
        expect = "accept"
    elif kind == "manifest":
        variant = rng.choice(
            [
                "bad_json_middle",
                "no_media_column",
                "list_row",
                "wrong_ext",
                "binary",
                "dev_zero",
                "fifo",
                "same_media_two_prompts",
                "csv_ok",
                "empty",
                "null_path",
                "dir_source_missing",
            ]
        )
        label = f"score/manifest:{variant}"
        expect = "error"
        rows: list[Any] = [{"path": f"media/ok{k}.png", "prompt": "a red square"} for k in range(3)]
        name = "m.jsonl"
        content: Any = None
        if variant == "bad_json_middle":
            content = jsonl(rows[:1]) + b"{broken\n" + jsonl(rows[1:])
        elif variant == "no_media_column":
            rows[1] = {"prompt": "x"}
        elif variant == "list_row":
            rows.insert(1, [1, 2])
        elif variant == "wrong_ext":
            name = "m.txt"
        elif variant == "binary":
            content = bytes(rng.randrange(256) for _ in range(300))
        elif variant == "dev_zero":
            content = symlink("/dev/zero")
        elif variant == "fifo":
            content = FIFO
        elif variant == "same_media_two_prompts":
            rows.append({"path": "media/ok0.png", "prompt": "a blue square"})
            expect = "accept"
            report = 0
        elif variant == "csv_ok":
            name, expect, report = "m.csv", "accept", 0
            content = ("path,prompt\n" + "".join(f"{r['path']},{r['prompt']}\n" for r in rows)).encode()
        elif variant == "empty":
            content = b""  # no media: nothing to score is an error
        elif variant == "null_path":
            rows[0]["path"] = None
        elif variant == "dir_source_missing":
            name = None
        if name is not None:
            files[name] = content if content is not None else jsonl(rows)
            source = "{dir}/" + name
        else:
            source = "{dir}/no-such-folder"
    elif kind == "reward":
        variant = rng.choice(
            [
                "unknown",
                "spec_bomb",
                "spec_list_of_ints",
                "spec_no_rewards",
                "spec_unknown_key",
                "spec_good",
                "spec_binary",
                "dotted_missing",
                "spec_combine_bad",
                "spec_dev_zero",
            ]
        )
        label = f"score/reward:{variant}"
        expect = "error"
        spec = "{dir}/r.yaml"
        if variant == "unknown":
            reward = ["--reward", "no_such_reward"]
        elif variant == "dotted_missing":
            reward = ["--reward", "nonexistent.module:fn"]
        else:
            reward = ["--reward", spec]
            files["r.yaml"] = {
                "spec_bomb": billion_laughs("rewards"),
                "spec_list_of_ints": b"rewards: [1, 2]\n",
                "spec_no_rewards": b"rewards: []\n",
                "spec_unknown_key": b"rewards: [{name: brightness}]\nfoo: 1\n",
                "spec_good": b"rewards: [{name: brightness}, {name: saturation, weight: 2}]\n",
                "spec_binary": bytes(range(256)),
                "spec_combine_bad": b"rewards: [{name: brightness}]\ncombine: nope\n",
                "spec_dev_zero": symlink("/dev/zero"),
            }[variant]
            if variant == "spec_good":
                expect, report = "accept", 0
    else:
        variant = rng.choice(
            [
                "reward_arg_unknown",
                "reward_arg_type",
                "reward_arg_yaml",
                "reward_arg_no_eq",
                "batch_zero",
                "batch_negative",
                "out_is_dir",
                "out_bad_ext_ok",
                "existing_out_garbage",
            ]
        )
        label = f"score/args:{variant}"
        expect = "error"
        extra = {
            "reward_arg_unknown": ["--reward-arg", "scale=abc"],
            "reward_arg_type": ["--reward-arg", "target=abc"],
            "reward_arg_yaml": ["--reward-arg", "target=[1,"],
            "reward_arg_no_eq": ["--reward-arg", "target"],
            "batch_zero": ["--batch-size", "0"],
            "batch_negative": ["--batch-size", "-3"],
        }.get(variant, [])
        reward = ["--reward", "brightness", *extra]
        if variant == "out_is_dir":
            files["outdir"] = DIR
            out = ["--out", "{dir}/outdir"]
        elif variant == "out_bad_ext_ok":
            out, expect, report = ["--out", "{dir}/scores.csv"], "accept", 0
        elif variant == "existing_out_garbage":
            files["scores.jsonl"] = b'{"id": 1}\nnot json at all\n{"id": 2}\n'
    return Case(
        f"score-{i:05d}", "score", label, expect, ["score", source, *reward, *out, "--quiet"], files, report
    )


def label_case(rng: random.Random, i: int) -> Case:
    files: dict[str, Any] = {}
    good = [
        {"id": f"{k}.png", "prompt": f"p{k % 2}", "path": f"{k}.png", "brightness": 0.1 * k} for k in range(6)
    ]
    variant = rng.choice(
        [
            "good",
            "bad_json",
            "missing_key",
            "non_numeric",
            "nan_scores",
            "empty",
            "binary",
            "dev_zero",
            "fifo",
            "directory",
            "list_rows",
            "two_columns_no_key",
            "huge_numbers",
            "prompt_types",
            "csv_good",
            "missing_file",
            "strategy_margin",
            "margin_nan",
        ]
    )
    expect = "error"
    key = ["--key", "brightness"]
    name = "scores.jsonl"
    content: Any = jsonl(good)
    extra: list[str] = []
    if variant == "good":
        expect = "accept"
    elif variant == "bad_json":
        content = jsonl(good[:2]) + b"{oops\n" + jsonl(good[2:])
    elif variant == "missing_key":
        key = ["--key", "nope"]
    elif variant == "non_numeric":
        content, expect = jsonl([{**r, "brightness": "high"} for r in good]), "accept"
    elif variant == "nan_scores":
        content, expect = jsonl(good).replace(b"0.1", b"NaN"), "accept"
    elif variant == "empty":
        content, key, expect = b"", [], "error"
    elif variant == "binary":
        content = bytes(rng.randrange(256) for _ in range(400))
    elif variant == "dev_zero":
        content = symlink("/dev/zero")
    elif variant == "fifo":
        content = FIFO
    elif variant == "directory":
        content = DIR
    elif variant == "list_rows":
        content = jsonl([[1, 2], [3]] + good[:1])
    elif variant == "two_columns_no_key":
        content, key = jsonl([{**r, "saturation": 1.0} for r in good]), []
    elif variant == "huge_numbers":
        content, expect = (
            jsonl([{**r, "brightness": 10.0**300 * (k + 1)} for k, r in enumerate(good)]),
            "accept",
        )
    elif variant == "prompt_types":
        content, expect = jsonl([{**r, "prompt": [k]} if k % 2 else r for k, r in enumerate(good)]), "accept"
    elif variant == "csv_good":
        name, expect = "scores.csv", "accept"
        content = (
            "id,prompt,path,brightness\n"
            + "".join(f"{r['id']},{r['prompt']},{r['path']},{r['brightness']}\n" for r in good)
        ).encode()
    elif variant == "missing_file":
        name, content = "other.jsonl", None
    elif variant == "strategy_margin":
        extra, expect = ["--strategy", "margin", "--margin", "0.15"], "accept"
    elif variant == "margin_nan":
        extra = ["--strategy", "margin", "--margin", "nan"]
    if content is not None:
        files[name] = content
    argv = [
        "label",
        "--scores",
        "{dir}/" + ("scores.jsonl" if variant == "missing_file" else name),
        *key,
        *extra,
        "--out",
        "{dir}/pairs.jsonl",
        "--quiet",
    ]
    return Case(f"label-{i:05d}", "label", f"label/{variant}", expect, argv, files)


GENERATORS = {
    "validate": validate_case,
    "train-config": train_config_case,
    "train-data": train_data_case,
    "score": score_case,
    "label": label_case,
}
WEIGHTS = {"validate": 64, "train-config": 4, "train-data": 6, "score": 15, "label": 11}


def generate(n: int, seed: int = 0, weights: dict[str, int] | None = None) -> list[Case]:
    """``n`` cases, the same for the same ``(n, seed)``; the first ``k`` cases of a longer run are ``generate(k, seed)``."""
    rng = random.Random(seed)
    weights = weights or WEIGHTS
    families = list(weights)
    cases = []
    for i in range(n):
        family = rng.choices(families, [weights[f] for f in families])[0]
        cases.append(GENERATORS[family](rng, i))
    return cases
