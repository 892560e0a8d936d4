"""``mmalign eval``: model A against model B on paired prompts and seeds under a reward suite.

Both models sample one image or clip per (prompt, seed) from the same initial noise; every reward scores both
as one set (a normalised reward puts A and B on one scale). Each batch is scored as it is sampled and only small
previews of the grid's columns are kept, so memory holds scores, not media. Writes into ``--out``: ``metrics.json`` (win
rate with a paired-bootstrap 95% interval, mean rewards), ``table.md`` and ``grid.png`` (labelled: prompt per
column, rows named after B and A, primary score under each tile; videos show their first frame).

Examples::

    mmalign eval --model-a stabilityai/stable-diffusion-xl-base-1.0 --lora-a outputs/sdxl_dpo/final \\
        --prompts prompts.txt --reward pickscore --reward hpsv2 --device cuda --batch-size 4 --out outputs/eval
    mmalign eval --lora-a outputs/quickstart/run/final       # the toy model with its default prompts and rewards

The family of each model is read from its ``model_index.json`` (local directory or hub id). Without
``--prompts``/``--reward`` the toy world's held-out prompts and reward suite are used, and only for a toy model.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmalign.commands.options import one_line_errors, one_or_many, trained_path
from mmalign.toy import DEFAULT_TOY_MODEL, QUICKSTART_GUIDANCE, QUICKSTART_STEPS

GRID_COLUMNS = 8  # (prompt, seed) columns shown in grid.png


def is_toy_model(model: str) -> bool:
    """A model built by ``mmalign toy build`` / ``build-video`` (its directory records the build)."""
    path = Path(model)
    return (path / "toy_build.json").is_file() or (path / "toy_video_build.json").is_file()


def _run_name(path: str | list[str]) -> str:
    """A label for a trained adapter: its run folder for a run's ``final/`` export (every run has one), else its name;
    several joined with ``+``."""
    if not isinstance(path, str):
        return "+".join(_run_name(p) for p in path)
    p = Path(path)
    return p.parent.name or p.name if p.name == "final" else p.name


def evaluate(
    model_a: str = str(DEFAULT_TOY_MODEL),
    *,
    model_b: str | None = None,
    lora_a: str | list[str] | None = None,
    lora_b: str | list[str] | None = None,
    negative_lora_a: str | None = None,
    npo_alpha: float = 1.0,
    npo_beta: float = 1.0,
    family: str = "auto",
    prompts: Sequence[str] | str | None = None,
    rewards: list[str] | dict[str, Any] | None = None,
    reward_args: list[str] | None = None,
    seeds_per_prompt: int = 6,
    seed: int | None = None,
    guidance: float | None = None,
    guidance_2: float | None = None,
    steps: int | None = None,
    height: int | None = None,
    width: int | None = None,
    num_frames: int | None = None,
    fps: float | None = None,
    label_a: str | None = None,
    label_b: str | None = None,
    out: str | Path = "outputs/eval",
    device: str | None = None,
    dtype: str | None = None,
    batch_size: int = 8,
    cpu_offload: bool = False,
    verbose: bool = False,
    progress: bool = True,
    n_boot: int = 2000,
) -> dict[str, Any]:
    """Sample A and B on paired (prompt, seed), score, write the report. Returns the metrics dict.

    Args:
        model_a: Pipeline under test (hub id or directory); default the toy model.
        model_b: Baseline pipeline (default: ``model_a``).
        lora_a: a run's ``final/`` loaded into A (LoRA or fine-tuned denoiser), or several (all active).
        lora_b: LoRA(s) loaded into B.
        negative_lora_a: NPO guidance on/off: A = B with this negative LoRA in its CFG branch.
        npo_alpha: NPO weight offset alpha.
        npo_beta: NPO weight offset beta.
        family: Pipeline family or ``auto`` (from model_index.json).
        prompts: Prompt list, or a file (txt/JSONL/CSV or a ``generate`` manifest). Toy models: default held-out.
        rewards: ``--reward`` values or built rewards (first = primary). Toy models: default toy suite.
        reward_args: ``key=value`` kwargs for named rewards.
        seeds_per_prompt: Samples per prompt.
        seed: First seed (default: the quickstart's evaluation seeds).
        guidance: CFG scale (default 5.0; FLUX.1: its distilled guidance, 3.5; toy models: the quickstart's 2.0).
        guidance_2: Wan 2.2 A14B: the low-noise expert's CFG scale (None: ``guidance``).
        steps: Sampler steps (default 25; toy models: 20).
        height: Pixel height (None: pipeline default).
        width: Pixel width (None: pipeline default).
        num_frames: Frames per clip for video pipelines.
        fps: Frame rate of the clips, given to rewards that need it (per-second segments, duration; None: the
            family's, e.g. Wan 16, CogVideoX 8).
        label_a: Row name of A (default ``tuned`` with a LoRA, else the model name).
        label_b: Row name of B (default ``base``).
        out: Report directory.
        device: See :mod:`mmalign.pipelines.runtime`.
        dtype: See :mod:`mmalign.pipelines.runtime`.
        batch_size: Samples per pipeline call.
        cpu_offload: diffusers model CPU offload.
        verbose: Library bars and warnings.
        progress: Overall progress bars.
        n_boot: Bootstrap resamples.
    """
    import torch

    from mmalign.commands.score import build_rewards
    from mmalign.data.manifest import read_prompts
    from mmalign.pipelines import (
        check_guidance_2,
        check_num_frames,
        clip_fps,
        detect_family,
        get_family,
        resolve_pretrained,
    )
    from mmalign.pipelines.runtime import (
        iter_samples,
        load_for_inference,
        lora_disabled,
        quiet_libraries,
        trained_kinds,
    )
    from mmalign.rewards.score import SetScores
    from mmalign.toy.evaluate import compare_scores, split_pair, write_eval_report
    from mmalign.toy.quickstart import EVAL_SEED_BASE, QuickstartOptions, eval_rewards, split_prompts
    from mmalign.trainers.report import previews

    kinds_a, kinds_b = trained_kinds(lora_a), trained_kinds(lora_b)  # a wrong folder fails before any loading
    second = check_guidance_2(model_a, guidance_2)
    for model in (model_a, model_b or model_a) if num_frames is not None else ():
        check_num_frames(resolve_pretrained(model), detect_family(model), num_frames)
    if model_b is not None:
        check_guidance_2(model_b, guidance_2)
    toy = is_toy_model(model_a) and (model_b is None or is_toy_model(model_b))
    if prompts is None:
        if not toy:
            raise ValueError(
                "--prompts FILE is required for a non-toy model (txt, JSONL, CSV or a generate manifest)"
            )
        opts = QuickstartOptions()
        prompt_list = split_prompts(opts.train_prompts, opts.eval_prompts, opts.split_seed)[1]
    elif isinstance(prompts, (str, Path)):
        prompt_list = [p.prompt for p in read_prompts(prompts)]
    else:
        prompt_list = list(prompts)
    if not rewards:
        if not toy:
            raise ValueError(
                "--reward is required for a non-toy model (e.g. --reward pickscore --reward hpsv2)"
            )
        built = eval_rewards()
    elif isinstance(rewards, dict):
        built = rewards
    else:
        with quiet_libraries(not verbose):
            built = build_rewards(list(rewards), reward_args, device=device, dtype=dtype)
    if guidance is None:
        guidance = QUICKSTART_GUIDANCE if toy else get_family(detect_family(model_a)).guidance
    steps = steps if steps is not None else (QUICKSTART_STEPS if toy else 25)
    if negative_lora_a and guidance <= 1:
        raise ValueError(
            f"--negative-lora-a acts through classifier-free guidance: --guidance {guidance:g} must be > 1"
            + (" (the toy world samples at 1.0 by default)" if toy else "")
        )

    eval_p = [p for p in prompt_list for _ in range(seeds_per_prompt)]
    first = EVAL_SEED_BASE if seed is None else seed
    eval_s = [first + i for i in range(len(eval_p))]
    runtime = dict(family=family, device=device, dtype=dtype, cpu_offload=cpu_offload, verbose=verbose)
    # A LoRA against its own base: one pipeline, the LoRA switched off for B (one copy of the model in memory).
    share = bool(  # the LoRA switched off gives the base exactly; a full fine-tune's base is another copy
        kinds_a
        and not kinds_b
        and set(kinds_a.values()) == {"lora"}
        and model_b in (None, model_a)
        and not negative_lora_a
    )
    pipe_b, family_b, _ = load_for_inference(model_b or model_a, lora=lora_a if share else lora_b, **runtime)
    if negative_lora_a:  # NPO guidance on (A) vs off (B): A shares B's weights, only its CFG branch differs
        from mmalign.pipelines.npo import npo_guided_pipeline

        with quiet_libraries(not verbose):
            pipe_a = npo_guided_pipeline(pipe_b, negative_lora_a, alpha=npo_alpha, beta=npo_beta)
        label_a = label_a or f"NPO-guided ({_run_name(negative_lora_a)})"
    elif share or (lora_a is None and lora_b is None and model_b in (None, model_a)):
        pipe_a = pipe_b
    else:
        pipe_a, _, _ = load_for_inference(model_a, lora=lora_a, **runtime)
    label_a = label_a or ("tuned" if lora_a else Path(model_a).name)
    label_b = label_b or ("base" if not lora_b else _run_name(lora_b))
    kwargs = dict(
        steps=steps,
        guidance=guidance,
        height=height,
        width=width,
        batch_size=batch_size,
        progress=progress,
        **second,
    )
    if num_frames is not None:
        kwargs["num_frames"] = num_frames
    fps = clip_fps(family_b, fps, model_b or model_a)
    # Stream: each batch is scored as it comes and only small previews of the grid's first columns are kept, so
    # memory holds scores, not the evaluation set (hundreds of SDXL images or Wan clips are tens of GB as float32).
    scorer = SetScores(built)
    shown, is_video = [], False
    sides = (
        (pipe_a, label_a, contextlib.nullcontext),
        (pipe_b, label_b, lora_disabled if share else contextlib.nullcontext),
    )
    for pipe, label, switch in sides:
        kept = []
        with switch(pipe):
            for i, media in iter_samples(pipe, eval_p, eval_s, desc=f"eval {label}", **kwargs):
                is_video = media.dim() == 5
                scorer.add(media, eval_p[i : i + len(media)], fps=fps if is_video else None)
                if i < GRID_COLUMNS:
                    kept.append(previews(media[: GRID_COLUMNS - i]))
        shown.append(torch.cat(kept))
    scores = split_pair(scorer.result(), len(eval_p))
    metrics = compare_scores(scores, n_boot=n_boot)
    metrics.update(
        labels={"a": label_a, "b": label_b},
        models={"a": model_a, "b": model_b or model_a},
        loras={"a": lora_a, "b": lora_b},
        guidance_scale=guidance,
        **second,
        steps=steps,
        kind="video" if is_video else "image",
        **({"fps": fps} if is_video else {}),
    )
    write_eval_report(
        metrics,
        *shown,
        out,
        label_a=label_a,
        label_b=label_b,
        prompts=eval_p,
        scores=scores,
        columns=GRID_COLUMNS,
    )
    return metrics


@one_line_errors("eval")
def run(args: argparse.Namespace) -> int:
    from mmalign.commands.options import runtime_kwargs
    from mmalign.toy.evaluate import markdown_table

    height = args.height or args.size
    width = args.width or args.size
    metrics = evaluate(
        args.model_a,
        model_b=args.model_b,
        lora_a=one_or_many(args.lora_a),
        lora_b=one_or_many(args.lora_b),
        negative_lora_a=args.negative_lora_a,
        npo_alpha=args.npo_alpha,
        npo_beta=args.npo_beta,
        family=args.family,
        prompts=args.prompts,
        rewards=args.reward,
        reward_args=args.reward_arg,
        seeds_per_prompt=args.seeds_per_prompt,
        seed=args.seed,
        guidance=args.guidance,
        guidance_2=args.guidance_2,
        steps=args.steps,
        height=height,
        width=width,
        num_frames=args.num_frames,
        fps=args.fps,
        label_a=args.label_a,
        label_b=args.label_b,
        out=args.out,
        **runtime_kwargs(args),
    )
    print(markdown_table(metrics, metrics["labels"]["a"], metrics["labels"]["b"]))
    print(f"wrote {args.out}/metrics.json, table.md, grid.png")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``mmalign eval``."""
    from mmalign.commands.options import add_runtime_args

    p = subparsers.add_parser(
        "eval",
        help="compare model A with model B on paired prompts/seeds: win rate, "
        "reward means, 95%% CI, labelled grid",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model-a", default=str(DEFAULT_TOY_MODEL), help="pipeline of A: hub id or directory (default: toy)"
    )
    p.add_argument(
        "--lora-a",
        action="append",
        type=trained_path,
        help="a run's final/ loaded into A (LoRA or fully fine-tuned denoiser); repeat for several "
        "(Wan 2.2 A14B: one per expert)",
    )
    p.add_argument("--model-b", help="pipeline of B (default: same as A)")
    p.add_argument(
        "--lora-b", action="append", type=trained_path, help="a run's final/ loaded into B (repeatable)"
    )
    p.add_argument(
        "--negative-lora-a",
        type=trained_path,
        help="NPO guidance on/off: A = B with this negative LoRA in its CFG branch",
    )
    p.add_argument("--npo-alpha", type=float, default=1.0)
    p.add_argument("--npo-beta", type=float, default=1.0)
    p.add_argument("--family", default="auto", help="pipeline family (default: from model_index.json)")
    p.add_argument("--label-a", help="row name of A in the grid and table (default: tuned / the model name)")
    p.add_argument("--label-b", help="row name of B (default: base)")
    p.add_argument(
        "--prompts",
        help="txt (one per line), JSONL/CSV with a prompt column, or a generate manifest "
        "(default, toy models only: the quickstart's held-out prompts)",
    )
    p.add_argument("--seeds-per-prompt", type=int, default=6)
    p.add_argument(
        "--seed", type=int, default=None, help="first seed (default: the quickstart's evaluation seeds)"
    )
    p.add_argument(
        "--reward",
        action="append",
        help="registry name, module:function or YAML spec; repeat for a "
        "suite, the first is primary (default, toy models only: the quickstart suite)",
    )
    p.add_argument("--reward-arg", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--guidance", type=float, default=None, help="CFG scale (default 5.0; FLUX.1 3.5; toy 2.0)"
    )
    p.add_argument(
        "--guidance-2", type=float, default=None, help="Wan 2.2 A14B: the low-noise expert's CFG scale"
    )
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default 25; toy 20)")
    p.add_argument("--height", type=int, default=None, help="pixel height (default: the pipeline's)")
    p.add_argument("--width", type=int, default=None, help="pixel width (default: the pipeline's)")
    p.add_argument("--size", type=int, default=None, help="square size, shorthand for --height/--width")
    p.add_argument("--num-frames", type=int, default=None, help="frames per clip (video pipelines)")
    p.add_argument(
        "--fps",
        type=float,
        default=None,
        help="clip frame rate for rewards with per-second segments or durations (default: the family's: Wan 16, "
        "CogVideoX 8)",
    )
    p.add_argument("--out", default="outputs/eval", help="report directory")
    add_runtime_args(p, batch_size=8)
    p.set_defaults(func=run)
