"""``mmalign generate``: sample images or videos from a pipeline into a folder with a media manifest.

Writes, into ``out``: one file per sample (``00000.png``, or ``00000.mp4`` for a video pipeline) and
``manifest.jsonl`` (prompt, negative prompt, seed, guidance, steps, model, LoRA, path, kind, group, and the other
settings that shaped the file; see ``mmalign/data/manifest.py``). Files are written batch by batch; an interrupted
run leaves ``manifest.jsonl.partial``, and rerunning the same command samples only what is missing
(``--overwrite``: all again). A contact sheet (first frame of each sample, titled with its prompt) goes *outside*
the media folder, to ``<out>_grid.png`` by default, so ``score``/``label`` never see it as a candidate.

Example::

    mmalign generate --model stabilityai/stable-diffusion-xl-base-1.0 --prompts prompts.txt --n-per-prompt 4 \\
        --device cuda --batch-size 4 --out outputs/candidates
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmalign.commands.options import one_line_errors, one_or_many, trained_path
from mmalign.data.manifest import (
    MANIFEST_NAME,
    MediaRecord,
    PromptSpec,
    ResumableRows,
    manifest_row,
    read_prompts,
)

if TYPE_CHECKING:
    import torch

SHEET_SIZE = 64  # samples shown in the contact sheet


def _load_sampler(
    model: str,
    family: str,
    *,
    runtime: dict[str, Any],
    lora: str | list[str] | None,
    negative_lora: str | None,
    npo: tuple[float, float],
    who: tuple[str | None, str | None, str | None, float],
    guidance: float,
) -> tuple[Any, dict[str, Any]]:
    """The pipeline ``generate`` samples with (LoRA, NPO guidance, a person's user path) and its extra call keywords."""
    from mmalign.pipelines.runtime import load_for_inference, quiet_libraries

    pipe, _, _ = load_for_inference(model, family=family, lora=lora, **runtime)
    quiet = not runtime.get("verbose")
    if negative_lora:
        from mmalign.pipelines.npo import enable_npo_guidance

        with quiet_libraries(quiet):
            enable_npo_guidance(pipe, negative_lora, alpha=npo[0], beta=npo[1])
    extra: dict[str, Any] = {}
    user_adapter, user_shots, user, user_scale = who
    if user_shots or user:
        from types import SimpleNamespace

        from mmalign.commands.personalize import user_pipeline_kwargs

        person = SimpleNamespace(
            user_adapter=user_adapter, user_shots=user_shots, user=user, user_scale=user_scale
        )
        with quiet_libraries(quiet):  # diffusers' IP-Adapter loader notes the image encoder it skips
            extra.update(user_pipeline_kwargs(pipe, person, guidance=guidance > 1))
    return pipe, extra


def generate(
    model: str,
    prompts: Sequence[str | PromptSpec],
    out: str | Path,
    *,
    n_per_prompt: int = 1,
    seed: int = 0,
    steps: int = 25,
    guidance: float | None = None,
    guidance_2: float | None = None,
    height: int | None = None,
    width: int | None = None,
    num_frames: int | None = None,
    fps: float | None = None,
    family: str = "auto",
    lora: str | list[str] | None = None,
    negative_lora: str | None = None,
    npo_alpha: float = 1.0,
    npo_beta: float = 1.0,
    grid: str | Path | None = None,
    device: str | None = None,
    dtype: str | None = None,
    batch_size: int = 1,
    cpu_offload: bool = False,
    verbose: bool = False,
    progress: bool = True,
    user_adapter: str | None = None,
    user_shots: str | None = None,
    user: str | None = None,
    user_scale: float = 1.0,
    overwrite: bool = False,
) -> Path:
    """Sample ``n_per_prompt`` candidates per prompt (seeds ``seed, seed+1, ...`` in order) and write the manifest.

    Each batch is written as it is sampled (memory holds one batch) and recorded in ``manifest.jsonl.partial``;
    ``manifest.jsonl`` replaces it once every file is written. A rerun with the same arguments keeps the files
    that an interrupted (or finished) run already wrote with the same settings and samples only the rest.

    Args:
        model: Hub id or local pipeline directory (family detected from its model_index.json).
        prompts: Prompt strings or :class:`PromptSpec` (with negative prompt and group).
        out: Media folder (created).
        n_per_prompt: Candidates per prompt.
        seed: Seed of the first sample; sample ``i`` uses ``seed + i``.
        steps: Sampler steps.
        guidance: CFG scale (None: the family's, 5.0; FLUX.1: its distilled guidance, 3.5).
        guidance_2: Wan 2.2 A14B: the low-noise expert's CFG scale (None: ``guidance``).
        height: Pixel height (None: the pipeline's default).
        width: Pixel width (None: the pipeline's default).
        num_frames: Frames per clip for video pipelines (None: the pipeline's default).
        fps: Frame rate of written mp4 files (None: the family's, e.g. Wan 16, CogVideoX 8).
        family: Pipeline family or ``auto``.
        lora: ``mmalign train``'s ``final/`` (a LoRA or a fine-tuned denoiser), or several (all active).
        negative_lora: Negative LoRA for NPO guidance.
        npo_alpha: NPO weight offset alpha.
        npo_beta: NPO weight offset beta.
        grid: Contact-sheet path (default ``<out>_grid.png``, beside the folder).
        device: See :mod:`mmalign.pipelines.runtime`.
        dtype: See :mod:`mmalign.pipelines.runtime`.
        batch_size: Samples per pipeline call.
        cpu_offload: diffusers model CPU offload.
        verbose: Library loading bars and warnings.
        progress: Overall progress bar.
        user_adapter: a personal_dpo ``final/`` folder: condition on a person (one sample per pipeline call).
        user_shots: that person's choices (pair manifest), embedded by the adapter's encoder.
        user: ``USERS.safetensors:ID`` of a known person, or the row filter of ``user_shots``.
        user_scale: strength of the user path (0 = the base model).
        overwrite: Sample every file again, even those a previous run with the same settings finished.

    Returns:
        The manifest path.
    """
    from mmalign.data.video import video_writer
    from mmalign.pipelines import (
        check_guidance_2,
        check_num_frames,
        clip_fps,
        detect_family,
        get_family,
        resolve_pretrained,
    )
    from mmalign.pipelines.runtime import iter_samples, trained_kinds
    from mmalign.rewards.score import load_media
    from mmalign.trainers.report import contact_sheet, previews

    specs = [p if isinstance(p, PromptSpec) else PromptSpec(str(p)) for p in prompts]
    if not specs:
        raise ValueError("generate: no prompts (give --prompt or --prompts FILE)")
    if n_per_prompt < 1:
        raise ValueError(f"--n-per-prompt {n_per_prompt} must be >= 1")
    trained_kinds(lora)  # a wrong folder fails before anything is written
    if family == "auto":  # from model_index.json: the weights load only once there is something to sample
        family = detect_family(model)
    guidance = guidance if guidance is not None else get_family(family).guidance
    if negative_lora and guidance <= 1:
        raise ValueError(
            f"--negative-lora acts through classifier-free guidance: --guidance {guidance:g} must be > 1"
        )
    second = check_guidance_2(model, guidance_2)
    check_num_frames(resolve_pretrained(model), family, num_frames)
    is_video = get_family(family).video
    fps = clip_fps(family, fps, model)
    if is_video:
        video_writer()  # fail now, not after the sampling
    if not get_family(family).negative_prompts and any(spec.negative_prompt for spec in specs):
        print(  # recorded as used, they would claim an effect they did not have
            f"note: {family} samples without negative prompts (its pipeline uses them only with true CFG); the "
            "prompts' negative_prompt values are left out",
            file=sys.stderr,
        )
        specs = [dataclasses.replace(spec, negative_prompt="") for spec in specs]
    jobs = [spec for spec in specs for _ in range(n_per_prompt)]
    seeds = [seed + i for i in range(len(jobs))]
    if user_shots or user:
        batch_size = 1  # the embeds are one person's for one prompt; diffusers does not repeat them per batch

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {  # what else shapes a file, so a resumed run only keeps files made the same way
        "height": height,
        "width": width,
        "num_frames": num_frames,
        "fps": fps if is_video else None,
        "guidance_2": guidance_2,
        "negative_lora": negative_lora,
        "npo_alpha": npo_alpha if negative_lora else None,
        "npo_beta": npo_beta if negative_lora else None,
        "user_adapter": user_adapter if (user_shots or user) else None,
        "user_shots": user_shots,
        "user": user,
        "user_scale": user_scale if (user_shots or user) else None,
    }
    records = [
        MediaRecord(
            path=str((out / (f"{i:05d}.mp4" if is_video else f"{i:05d}.png")).resolve()),
            prompt=job.prompt,
            negative_prompt=job.negative_prompt,
            seed=s,
            guidance=guidance,
            steps=steps,
            model=str(model),
            lora=lora,
            kind="video" if is_video else "image",
            group=job.group,
            extra={k: v for k, v in settings.items() if v is not None},
        )
        for i, (job, s) in enumerate(zip(jobs, seeds))
    ]
    manifest = ResumableRows(out / MANIFEST_NAME, resume=not overwrite)
    rows = [manifest_row(r, manifest.path) for r in records]
    done = finished_samples(records, rows, manifest.previous)
    manifest.start([rows[i] for i in sorted(done)])
    todo = [i for i in range(len(records)) if i not in done]
    if done:
        print(
            f"generate: {len(done)} of {len(records)} samples already in {out} (same settings); sampling {len(todo)}"
        )
    if len({r.get("path") for r in manifest.previous}) > len(
        done
    ):  # made otherwise: this run writes over them
        print(
            f"note: {out} holds samples this run does not keep (made with another model, --lora, prompt or seed, or "
            "beyond its --n): it writes over them and the grid. Give --out another folder to keep both"
        )
    sheet = {i: previews(load_media(records[i].path)[0][None])[0] for i in sorted(done) if i < SHEET_SIZE}
    batches = []  # every sample done: no weights to load
    if todo:
        pipe, extra = _load_sampler(
            model,
            family,
            runtime={"device": device, "dtype": dtype, "cpu_offload": cpu_offload, "verbose": verbose},
            lora=lora,
            negative_lora=negative_lora,
            npo=(npo_alpha, npo_beta),
            who=(user_adapter, user_shots, user, user_scale),
            guidance=guidance,
        )
        if num_frames is not None:
            extra["num_frames"] = num_frames
        extra.update(second)
        batches = iter_samples(
            pipe,
            [jobs[i].prompt for i in todo],
            [seeds[i] for i in todo],
            negative_prompts=[jobs[i].negative_prompt for i in todo],
            steps=steps,
            guidance=guidance,
            height=height,
            width=width,
            batch_size=batch_size,
            progress=progress,
            desc="generate",
            **extra,
        )
    for first, media in batches:
        batch = todo[first : first + len(media)]
        for i, m in zip(batch, media):
            write_media(Path(records[i].path), m, fps)
            if i < SHEET_SIZE:
                sheet[i] = previews(m[None])[0]  # a small copy: the batch itself is not kept
        manifest.append([rows[i] for i in batch])
    manifest.finish(rows)
    grid = Path(grid) if grid else out.parent / f"{out.name}_grid.png"
    contact_sheet(
        stack_cropped([sheet[i] for i in sorted(sheet)]), [j.prompt for j in jobs[:SHEET_SIZE]]
    ).save(grid)
    return manifest.path


def finished_samples(
    records: Sequence[MediaRecord], rows: Sequence[dict[str, Any]], previous: Sequence[dict[str, Any]]
) -> set[int]:
    """Indices of ``records`` whose file exists and whose manifest row ``rows[i]`` an earlier run wrote."""
    wanted = {json.dumps(row, sort_keys=True): i for i, row in enumerate(rows)}
    found = (wanted.get(json.dumps(row, sort_keys=True)) for row in previous)
    return {i for i in found if i is not None and Path(records[i].path).is_file()}


def stack_cropped(frames: Sequence[torch.Tensor]) -> torch.Tensor:
    """[N,3,h,w] from [3,h,w] previews, cropped to the smallest among them (a clip read back from mp4 can be a pixel
    larger than sampled: yuv420p pads odd sides)."""
    import torch

    h = min(f.shape[-2] for f in frames)
    w = min(f.shape[-1] for f in frames)
    return torch.stack([f[..., :h, :w] for f in frames])


def write_media(path: Path, media: torch.Tensor, fps: float) -> Path:
    """Save [3,H,W] as PNG or [T,3,H,W] as an H.264 mp4 (PyAV, ``mmalign/data/video.py``)."""
    if media.dim() == 4:
        from mmalign.data.video import write_video

        return write_video(path, media, fps)
    from torchvision.utils import save_image

    save_image(media.float(), path)
    return path


def prompt_specs(prompt: list[str] | None, prompts_file: str | None) -> list[PromptSpec]:
    """``--prompt`` values plus the rows of ``--prompts FILE``."""
    specs = [PromptSpec(p) for p in prompt or []]
    if prompts_file:
        specs += read_prompts(prompts_file)
    if not specs:
        raise ValueError("give --prompt TEXT (repeatable) or --prompts FILE (txt, JSONL or CSV)")
    return specs


@one_line_errors("generate")
def run(args: argparse.Namespace) -> int:
    from mmalign.commands.options import runtime_kwargs

    specs = prompt_specs(args.prompt, args.prompts)
    manifest = generate(
        args.model,
        specs,
        args.out,
        n_per_prompt=args.n_per_prompt,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        guidance_2=args.guidance_2,
        height=args.height,
        width=args.width,
        num_frames=args.num_frames,
        fps=args.fps,
        family=args.family,
        lora=one_or_many(args.lora),
        negative_lora=args.negative_lora,
        npo_alpha=args.npo_alpha,
        npo_beta=args.npo_beta,
        grid=args.grid,
        user_adapter=args.user_adapter,
        user_shots=args.user_shots,
        user=args.user,
        user_scale=args.user_scale,
        overwrite=args.overwrite,
        **runtime_kwargs(args),
    )
    out = Path(args.out)
    grid = args.grid or out.parent / f"{out.name}_grid.png"
    print(
        f"wrote {len(specs) * args.n_per_prompt} samples and {manifest.name} to {out}; contact sheet {grid}"
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``mmalign generate``."""
    from mmalign.commands.options import add_runtime_args

    p = subparsers.add_parser(
        "generate",
        help="sample images or videos from a pipeline into a folder + manifest.jsonl",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="hub id or local pipeline directory")
    p.add_argument("--family", default="auto", help="pipeline family (default: from model_index.json)")
    p.add_argument(
        "--lora",
        action="append",
        type=trained_path,
        help="a run's final/ from `mmalign train` (LoRA or fully fine-tuned denoiser); repeat to load several "
        "(Wan 2.2 A14B: one per expert)",
    )
    p.add_argument("--negative-lora", type=trained_path, help="negative LoRA for NPO guidance")
    p.add_argument("--npo-alpha", type=float, default=1.0)
    p.add_argument(
        "--npo-beta",
        type=float,
        default=1.0,
        help="negative = base + alpha (positive - base) + beta delta; alpha=beta=1 as the released scripts",
    )
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument(
        "--prompts",
        help="prompt file: .txt (one per line), .jsonl or .csv (prompt[, negative_prompt, group])",
    )
    p.add_argument(
        "--n-per-prompt", "--n", dest="n_per_prompt", type=int, default=1, help="candidates per prompt"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the first sample (sample i uses seed + i)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="CFG scale (default 5.0; FLUX.1: its distilled guidance, 3.5)",
    )
    p.add_argument(
        "--guidance-2",
        type=float,
        default=None,
        help="Wan 2.2 A14B: the low-noise expert's CFG scale (default: --guidance; its model card: 4.0 / 3.0)",
    )
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--num-frames", type=int, default=None, help="frames per clip (video pipelines)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="sample every file again (default: keep those a previous run with the same settings wrote)",
    )
    p.add_argument(
        "--fps",
        type=float,
        default=None,
        help="frame rate of written mp4 files (default: the family's: Wan 16, CogVideoX 8, others 8)",
    )
    p.add_argument(
        "--out", default="outputs/generate", help="media folder (manifest.jsonl is written inside)"
    )
    p.add_argument("--grid", help="contact sheet path (default: <out>_grid.png, outside the media folder)")
    from mmalign.commands.personalize import add_generate_user_args

    add_generate_user_args(p)
    add_runtime_args(p)
    p.set_defaults(func=run)
