"""``mmalign score``: score generated media (a ``generate`` folder/manifest, any folder, or a pair manifest).

Examples::

    mmalign score outputs/candidates --reward pickscore --reward aesthetic --device cuda --out outputs/scores.jsonl
    mmalign score pairs.jsonl --reward configs/rewards/hybrid_image.yaml --out pair_scores.csv

A folder written by ``mmalign generate`` is read through its ``manifest.jsonl`` (prompts, groups). Media
without a prompt are refused unless ``--allow-empty-prompt`` (a prompt-conditioned reward would silently score
them against ""). Videos are decoded with ``mmalign/data/video.py`` (``--video-fps``/``--video-frames``
sampling). Hybrid/ensemble rewards are normalised over the whole set or per prompt, never per batch.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmalign.commands.options import check_out, check_table, one_line_errors
from mmalign.utils import first_line

if TYPE_CHECKING:  # torch and the rewards load when a command runs, not when the parser is built
    import torch

    from mmalign.rewards import Reward


def parse_reward_args(items: list[str]) -> dict[str, Any]:
    """``--reward-arg key=value`` pairs; values parsed as YAML (``scale=2`` -> 2, ``device=cuda`` -> "cuda")."""
    import yaml

    from mmalign.config import check_size
    from mmalign.utils import safe_load

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--reward-arg {item[:100]!r}: expected key=value")
        try:
            out[key] = safe_load(value)
        except (yaml.YAMLError, RecursionError) as e:
            raise ValueError(
                f"--reward-arg {item[:100]!r}: the value is not valid YAML ({type(e).__name__})"
            ) from None
        check_size(out[key], f"--reward-arg {key[:100]!r}")
    return out


def build_rewards(
    names: list[str],
    reward_args: list[str] | None = None,
    *,
    device: str | None = None,
    dtype: str | None = None,
) -> dict[str, Reward]:
    """Rewards from ``--reward`` values: registry names, ``module:function`` paths or YAML/JSON spec files.

    ``--reward-arg key=value`` (YAML values) go to every named (non-file) reward; ``device``/``dtype`` go to the
    named rewards whose factory takes them (model rewards; rule rewards run wherever the media are).
    """
    from mmalign.commands.options import resolve_recipe
    from mmalign.config import read_yaml
    from mmalign.rewards import RewardSpec, _resolve, all_rewards
    from mmalign.rewards.score import build_named_rewards, load_reward_config

    kwargs = parse_reward_args(reward_args or [])

    def placement(name: str) -> dict[str, Any]:
        """--device/--dtype for a reward whose factory takes them (model rewards; rules run where the media are)."""
        if device is None and dtype is None:
            return {}
        try:
            params = inspect.signature(_resolve(all_rewards().get(name, name))).parameters
        except (ValueError, TypeError, ImportError, AttributeError):
            params = {}
        out: dict[str, Any] = {}
        if device is not None and "device" in params:
            out["device"] = device
        if dtype is not None and dtype != "auto" and "dtype" in params:
            from mmalign.pipelines.runtime import DTYPES

            out["dtype"] = DTYPES[dtype]
        return out

    def unloadable(what: str, err: OSError) -> ValueError:
        """A reward model neither cached nor downloadable (offline, a typo in its id, gated): one line."""
        import os

        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (HF_HUB_OFFLINE=1: its model must already be in the Hugging Face cache)" if offline else ""
        return ValueError(f"--reward {what}: cannot load its model: {first_line(err, 200)}{hint}")

    out: dict[str, Reward] = {}
    specs = []
    for name in names:
        path = Path(resolve_recipe(name))  # configs/rewards/*.yaml: the shipped spec when not found here
        if path.suffix.lower() in (".yaml", ".yml", ".json"):
            if not path.exists():
                raise ValueError(f"--reward {name}: reward spec file not found")
            read_yaml(
                path, "reward spec file"
            )  # a small regular UTF-8 file without alias bombs, or ConfigError
            try:
                out.update(load_reward_config(path, defaults=placement))
            except (TypeError, AttributeError, RecursionError) as e:  # a spec file of the wrong shape
                raise ValueError(
                    f"{path}: not a reward spec file ({type(e).__name__}: {str(e)[:200]})"
                ) from None
            except OSError as e:
                raise unloadable(name, e) from None
            continue
        specs.append(RewardSpec(name=name, kwargs={**placement(name), **kwargs}))
    if kwargs and not specs:
        raise ValueError(
            f"--reward-arg {' '.join(reward_args)}: goes to rewards named on the command line, and every --reward "
            "here is a spec file (set its arguments under `kwargs:` in the file)"
        )
    try:
        out.update(build_named_rewards(specs))
    except TypeError as e:  # a --reward-arg the factory does not take, or of the wrong type
        raise ValueError(
            f"--reward {', '.join(s.name for s in specs)}: {str(e)[:300]} (check --reward-arg)"
        ) from None
    except OSError as e:
        raise unloadable(", ".join(s.name for s in specs), e) from None
    return out


def scoring_settings(
    names: list[str], reward_args: list[str] | None, video_fps: float | None, video_frames: int | None
) -> dict[str, Any]:
    """What a reward column's scores depend on besides the media and the reward's name: its ``--reward-arg``
    values (``--user`` / ``--user-shots`` among them), the contents of the files they or the spec files name
    (a person's shots, a PAL head, a hybrid's YAML) and the video sampling. ``score_items`` scores a column again
    when a previous run into the same output used other settings."""
    import hashlib

    from mmalign.commands.options import resolve_recipe

    def digest(value: str) -> str | None:
        """sha256 of a file's (a folder's files') contents; None for a value that names none, or over 1 GiB."""
        path = Path(value)
        if not path.exists():
            return None
        files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
        if sum(f.stat().st_size for f in files) > 1 << 30:  # a model folder: its path stands for it
            return None
        h = hashlib.sha256()
        for f in files:
            h.update(str(f.relative_to(path) if path.is_dir() else "").encode() + f.read_bytes())
        return h.hexdigest()[:16]

    args = sorted(reward_args or [])
    values = [a.split("=", 1)[1] for a in args if "=" in a] + [resolve_recipe(n) for n in names]
    files = {v: d for v in values if (d := digest(v)) is not None}
    return {"reward_args": args, "files": files, "video_fps": video_fps, "video_frames": video_frames}


def reward_failures(rewards: dict[str, Reward]) -> dict[str, dict[str, int]]:
    """Per reward, the requests scored NaN by reason (the HTTP judge counts them), for the run summary."""
    return {name: dict(f) for name, reward in rewards.items() if (f := getattr(reward, "failures", None))}


def media_loader(
    video_fps: float | None = None, video_frames: int | None = None
) -> Callable[[Path], tuple[torch.Tensor, float | None]]:
    """``path -> (media, fps)``: images (and GIFs) with PIL, videos with ``mmalign.data.video.read_video`` sampling.

    A ``functools.partial`` of a module-level function, so DataLoader workers can receive it under any start method.
    """
    import functools

    return functools.partial(_load_media, video_fps=video_fps, video_frames=video_frames)


def _load_media(
    path: Path, *, video_fps: float | None, video_frames: int | None
) -> tuple[torch.Tensor, float | None]:
    from mmalign.data.manifest import VIDEO_EXTS
    from mmalign.rewards.score import load_media_uint8

    path = Path(path)
    if path.suffix.lower() in VIDEO_EXTS - {".gif"}:
        from mmalign.data.video import read_video
        from mmalign.rewards.rules import ClipRate

        video = read_video(path, fps=video_fps, num_frames=video_frames)
        return video.frames, ClipRate(video.fps, video.native_fps, video.duration)
    return load_media_uint8(path)  # uint8 until the reward's device: a quarter of the bytes to move


def check_prompts(items: list, allow_empty: bool) -> None:
    """Refuse media without a prompt unless allowed (names the first few)."""
    empty = [it.id for it in items if not str(it.prompt).strip()]
    if empty and not allow_empty:
        shown = ", ".join(map(str, empty[:3])) + (" ..." if len(empty) > 3 else "")
        raise ValueError(
            f"{len(empty)} of {len(items)} media have no prompt ({shown}); score a folder written by "
            "`mmalign generate` (manifest.jsonl), a manifest with a prompt column, or pass "
            "--allow-empty-prompt"
        )


def score(
    source: str | Path,
    rewards: list[str] | dict[str, Reward],
    out: str | Path,
    *,
    reward_args: list[str] | None = None,
    allow_empty_prompt: bool = False,
    normalize_over: str | None = None,
    video_fps: float | None = None,
    video_frames: int | None = None,
    resume: bool = True,
    device: str | None = None,
    dtype: str | None = None,
    batch_size: int = 16,
    verbose: bool = False,
    progress: bool = True,
    cpu_offload: bool = False,
    num_workers: int = 0,
    settings: dict[str, Any] | None = None,
):
    """Score a source with rewards into ``out`` (JSONL/CSV). Returns :class:`mmalign.rewards.score.ScoreSummary`.

    Args:
        source: A ``generate`` folder or ``manifest.jsonl``, any folder of media, or a pair manifest.
        rewards: ``--reward`` values, or built rewards by column name.
        out: Output file.
        reward_args: ``key=value`` kwargs for named rewards.
        allow_empty_prompt: Score media without a prompt.
        normalize_over: ``prompt`` or ``set`` for hybrid/ensemble (default: the reward config's, else prompt).
        video_fps: Resample videos to this rate before scoring.
        video_frames: Keep this many frames per video.
        resume: Keep rows already scored in ``out``.
        device: Device of model rewards (default: cuda when present).
        dtype: Their precision.
        batch_size: Items decoded and scored together (never changes a score).
        verbose: Library warnings.
        progress: Progress bar.
        cpu_offload: Unused (rewards are single models); accepted for a uniform signature.
        num_workers: Processes decoding the next batches while this one is scored (never changes a score).
        settings: For built ``rewards``: column -> what its scores depend on (:func:`scoring_settings`), so a
            previous run's rows scored otherwise are scored again; made here from ``--reward`` values.
    """
    from mmalign.pipelines.runtime import quiet_libraries
    from mmalign.rewards.score import collect_items, score_items

    check_table(source)
    check_out(out)
    items = collect_items(source)
    if not items:
        raise ValueError(f"{source}: no media found")
    check_prompts(items, allow_empty_prompt)
    if not isinstance(rewards, dict):
        with quiet_libraries(not verbose):
            built = build_rewards(list(rewards), reward_args, device=device, dtype=dtype)
        fingerprint = scoring_settings(list(rewards), reward_args, video_fps, video_frames)
        settings = dict.fromkeys(built, fingerprint)
        rewards = built
    try:
        summary = score_items(
            items,
            rewards,
            out,
            batch_size=batch_size,
            resume=resume,
            progress=progress,
            loader=media_loader(video_fps, video_frames),
            normalize_over=normalize_over,
            num_workers=num_workers,
            settings=settings,
        )
    except TypeError as e:  # a reward given arguments of the wrong type fails on the first batch
        raise ValueError(
            f"a reward failed ({type(e).__name__}: {str(e)[:300]}); check --reward / --reward-arg"
        ) from None
    summary.reward_failures = reward_failures(rewards)
    if summary.rescored:
        print(
            f"note: {', '.join(summary.rescored)} in {out} had been scored with other settings (reward arguments, "
            "the files they name, or video sampling): scored again",
            file=sys.stderr,
        )
    return summary


@one_line_errors("score")
def run(args: argparse.Namespace) -> int:
    from mmalign.commands.options import runtime_kwargs

    summary = score(
        args.source,
        args.reward,
        args.out,
        reward_args=args.reward_arg + user_reward_args(args),
        allow_empty_prompt=args.allow_empty_prompt,
        normalize_over=args.normalize_over,
        video_fps=args.video_fps,
        video_frames=args.video_frames,
        resume=not args.no_resume,
        progress=not args.quiet,
        num_workers=args.num_workers,
        **runtime_kwargs(args),
    )
    print(
        json.dumps(
            {
                "out": str(summary.out),
                "items": summary.total,
                "scored": summary.scored,
                "skipped_already_scored": summary.skipped,
                "rescored_other_settings": summary.rescored,
                "errors": summary.errors,
                "reward_failures": getattr(summary, "reward_failures", {}),
            }
        )
    )
    return 0


# per-user rewards that take --user / --user-shots (`pal` is registered through the entry-point group)
PERSONAL_REWARDS = ("pal", "mmalign.personalize.pal:pal_reward")


def user_reward_args(args: argparse.Namespace) -> list[str]:
    """``--user`` / ``--user-shots`` as ``key=value`` reward args of the per-user ``pal`` reward."""
    extra = [f"user={args.user}"] if getattr(args, "user", None) else []
    extra += [f"user_shots={args.user_shots}"] if getattr(args, "user_shots", None) else []
    if extra and (not args.reward or any(r not in PERSONAL_REWARDS for r in args.reward)):
        raise ValueError(
            "--user/--user-shots choose the person for the per-user reward: use --reward pal alone"
        )
    return extra


def add_reward_args(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument(
        "--user",
        help="person for the per-user `pal` reward: a user id its head was trained on "
        "(with --user-shots: that user's rows); --reward-arg head=DIR names the head",
    )
    p.add_argument("--user-shots", help="a new person's choices (pair manifest) to fit the `pal` reward on")
    p.add_argument(
        "--reward",
        action="append",
        required=required,
        default=None if required else [],
        help="Registry name, package.module:function, or a YAML/JSON reward spec file. Repeatable.",
    )
    p.add_argument(
        "--reward-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Keyword argument (YAML value) for the named rewards. Repeatable.",
    )
    p.add_argument("--allow-empty-prompt", action="store_true", help="Score media that have no prompt.")
    p.add_argument(
        "--normalize-over",
        choices=["prompt", "set"],
        default=None,
        help="Hybrid/ensemble normalisation: within each prompt group or over the whole set "
        "(default: the reward config's normalize_over, else prompt). Never per batch.",
    )
    p.add_argument("--video-fps", type=float, default=None, help="Resample videos to this frame rate.")
    p.add_argument(
        "--video-frames",
        type=int,
        default=None,
        help="Frames kept per video (uniform, or the first N at --video-fps).",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``mmalign score``."""
    from mmalign.commands.options import add_runtime_args

    p = subparsers.add_parser(
        "score",
        help="Score a folder, manifest or pair dataset with rewards -> JSONL/CSV.",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "source", help="A `generate` folder or manifest.jsonl, a folder of media, or a pair manifest."
    )
    add_reward_args(p, required=True)
    p.add_argument("--out", required=True, help="Output .jsonl or .csv (one row per item).")
    p.add_argument(
        "--no-resume", action="store_true", help="Rescore everything instead of skipping scored rows."
    )
    p.add_argument("--quiet", action="store_true", help="No progress bar.")
    p.add_argument(
        "--num-workers",
        type=_workers,
        default=0,
        help="Processes decoding media ahead of the scoring (default 0: in this process). Never changes a score.",
    )
    add_runtime_args(p, batch_size=16, offload=False)
    p.set_defaults(func=run)


def _workers(text: str) -> int:
    """argparse type for --num-workers: an integer in [0, 64]."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:50]!r} is not an integer") from None
    if not 0 <= value <= 64:
        raise argparse.ArgumentTypeError(f"{value} must be in [0, 64]")
    return value
