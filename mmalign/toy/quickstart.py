"""``mmalign quickstart``: the whole preference-tuning workflow on the toy world, offline, in minutes on CPU.

generate candidates with the base -> score them with a hybrid reward -> preference pairs -> Diffusion-DPO
LoRA (``mmalign train`` with ``configs/toy/quickstart.yaml``) -> evaluate tuned vs base on held-out prompts
and seeds -> report directory (``report.md``, before/after grids, training curves, ``metrics.json``).

Prompts are every toy caption (colour x shape x optional size x optional position, 225 in all), split once
into training and held-out prompts; evaluation seeds never occur in training. The report also scores a
reward the pairs were not built from (``toy_shape``), so reward hacking would show.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmalign.toy import QUICKSTART_CONFIG
from mmalign.toy.render import COLORS, POSITIONS, SHAPES, SIZES, ShapeSpec, image_grid, to_pil
from mmalign.toy.sample import (
    DEFAULT_TOY_MODEL,
    QUICKSTART_GUIDANCE,
    QUICKSTART_STEPS,
    generate,
    load_toy_pipeline,
)

DEFAULT_CONFIG = QUICKSTART_CONFIG
TRAIN_SEED_BASE = 1_000
EVAL_SEED_BASE = 900_000

# The training reward: cleanliness (speckle/blotch energy) plus the shape's mean colour against the prompt's;
# both already in [0, 1], so no per-batch normalisation is needed and scores are comparable across batches.
# The mean colour rather than the per-pixel match: the per-pixel score also moves when only the shape's edges
# soften, which swamped the colour signal in paired comparisons (the report still shows it, untrained on).
TRAINING_REWARD = [
    {"name": "toy_defect", "weight": 1.0, "normalizer": "none"},
    {"name": "toy_color_mean", "weight": 0.5, "normalizer": "none"},
]


@dataclass
class QuickstartOptions:
    """Sizes of the quickstart protocol (defaults: the shipped run, under 10 minutes on 2 cores)."""

    candidates: int = 8
    train_prompts: int = 176
    eval_prompts: int = 48
    eval_seeds_per_prompt: int = 6
    min_margin: float = 0.05
    pairing: str = "all"  # "all": every candidate pair above the margin; "best_worst": one pair per prompt
    guidance_scale: float = QUICKSTART_GUIDANCE
    steps: int = QUICKSTART_STEPS
    split_seed: int = 0

    @classmethod
    def from_items(cls, items: Sequence[str]) -> QuickstartOptions:
        """``["KEY=VALUE", ...]`` (e.g. ``candidates=12``) over the defaults; ValueError names a bad item."""
        values: dict[str, Any] = {}
        for item in items:
            key, sep, value = item.partition("=")
            if not sep or key not in cls.__dataclass_fields__:
                raise ValueError(
                    f"bad option {item!r}: use KEY=VALUE, KEY one of {', '.join(cls.__dataclass_fields__)}"
                )
            values[key] = type(getattr(cls(), key))(value)
        return cls(**values)


def all_toy_prompts() -> list[str]:
    """Every toy caption: colours x shapes x (no size | small | large) x (no position | 4 positions)."""
    return [
        ShapeSpec(c, s, size, pos).caption()
        for c in sorted(COLORS)
        for s in SHAPES
        for size in (None, *sorted(SIZES))
        for pos in (None, *sorted(POSITIONS))
    ]


def split_prompts(n_train: int, n_eval: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Disjoint training and held-out prompt lists drawn from :func:`all_toy_prompts`."""
    prompts = all_toy_prompts()
    if n_train + n_eval > len(prompts):
        raise ValueError(f"train_prompts + eval_prompts = {n_train + n_eval} > {len(prompts)} toy prompts")
    random.Random(seed).shuffle(prompts)
    return prompts[n_eval : n_eval + n_train], prompts[:n_eval]


def training_reward():
    """The hybrid the pairs are built from (``hybrid`` in the reward registry)."""
    from mmalign.rewards import get_reward

    return get_reward("hybrid", members=TRAINING_REWARD)


def eval_rewards() -> dict[str, Callable]:
    """The evaluation suite: the training reward first (primary), its parts, and rewards it never saw."""
    from mmalign.rewards import get_reward

    return {
        "training_reward": training_reward(),
        "toy_defect": get_reward("toy_defect"),
        "toy_color_mean": get_reward("toy_color_mean"),
        "toy_color_correct": get_reward("toy_color_correct"),
        "toy_color per pixel (not trained on)": get_reward("toy_color"),
        "toy_shape (not trained on)": get_reward("toy_shape"),
    }


def make_pairs(
    prompts: Sequence[str],
    scores: torch.Tensor,
    paths: Sequence[str],
    min_margin: float,
    pairing: str = "all",
) -> list[dict[str, Any]]:
    """Preference pairs among each prompt's candidates, through ``mmalign label``'s pairing
    (:func:`mmalign.rewards.label.make_pairs`): ``all`` = every pair above the margin, ``best_worst`` = the
    best against the worst; pairs with margin <= ``min_margin`` are ties and dropped."""
    from mmalign.rewards.label import make_pairs as label_pairs

    if pairing not in ("all", "best_worst"):
        raise ValueError(f"pairing={pairing!r}: use all or best_worst")
    candidates: dict[str, list[tuple[str, float]]] = {}
    for prompt, path, score in zip(prompts, paths, scores.tolist()):
        candidates.setdefault(prompt, []).append((str(path), float(score)))
    pairs, _ = label_pairs(candidates, "margin" if pairing == "all" else "best_worst", margin=min_margin)
    return pairs


def plot_training_curves(history: list[dict[str, float]], path: Path) -> Path:
    """Loss, implicit accuracy and reward margin against step, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("loss", "implicit_acc", "reward_margin") if history and k in history[0]]
    fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(4 * max(len(keys), 1), 3))
    axes = list(axes) if len(keys) > 1 else [axes]
    steps = [h["step"] for h in history]
    for ax, key in zip(axes, keys):
        values = [h[key] for h in history]
        ax.plot(steps, values, alpha=0.3, color="C0")
        w = max(1, len(values) // 20)
        smooth = [
            sum(values[max(0, i - w + 1) : i + 1]) / len(values[max(0, i - w + 1) : i + 1])
            for i in range(len(values))
        ]
        ax.plot(steps, smooth, color="C0")
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def quickstart(
    out_dir: str | Path = "outputs/quickstart",
    *,
    model: str | Path = DEFAULT_TOY_MODEL,
    config: str | Path = DEFAULT_CONFIG,
    overrides: Sequence[str] = (),
    options: QuickstartOptions | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the toy workflow end to end and write the report directory.

    Args:
        out_dir: report directory (candidates, pairs, the training run and the report go under it).
        model: the base toy pipeline directory.
        config: the training recipe; ``model.pretrained``, ``data.source`` and ``train.output_dir`` are set here.
        overrides: extra ``key=value`` overrides of the recipe (e.g. ``train.max_steps=100``).
        options: protocol sizes.
        log: progress printer.

    Returns:
        The metrics dict written to ``metrics.json``.
    """
    from mmalign.toy.evaluate import flaw_table, markdown_table, paired_grid
    from mmalign.trainers import load_config
    from mmalign.trainers.loop import train

    opts = options or QuickstartOptions()
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    timings: dict[str, float] = {}

    def stage(name: str, t0: float) -> None:
        timings[name] = round(time.time() - t0, 1)
        log(f"[{time.time() - t_start:5.0f}s] {name} done in {timings[name]:.0f}s")

    train_prompts, eval_prompts = split_prompts(opts.train_prompts, opts.eval_prompts, opts.split_seed)
    base = load_toy_pipeline(model)
    sample_kwargs = dict(guidance_scale=opts.guidance_scale, steps=opts.steps)

    # 1. candidates from the base, 2. scores and 3. pairs; a resumed run keeps the pairs its checkpoints trained on
    cand_prompts = [p for p in train_prompts for _ in range(opts.candidates)]
    manifest, stamp_file = out / "pairs.jsonl", out / "pairs.stamp.json"
    stamp = {"model": str(Path(model).resolve()), "options": dataclasses.asdict(opts)}
    resuming = any(o.startswith("train.resume=") for o in overrides)
    # the recipe and its overrides are read before any sampling: a typo fails in a second, not after stage 3
    run_dir = out / "run"
    cfg = load_config(
        config,
        [
            f"model.pretrained={Path(model).resolve()}",
            f"data.source={manifest}",
            f"train.output_dir={run_dir}",
            f"data.cache_dir={out / 'cache'}",
            # the quickstart owns its run folder: a re-run starts a new run there (unless asked to resume)
            *([] if resuming else ["train.overwrite=true"]),
            *overrides,
        ],
    )
    if resuming and manifest.is_file() and _read_json(stamp_file) == stamp:
        pairs = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
        log(f"1-3/5 resuming: the {len(pairs)} pairs of {manifest} (candidates are not sampled again)")
    else:
        pairs = _candidates_and_pairs(base, train_prompts, cand_prompts, out, opts, sample_kwargs, log, stage)
        stamp_file.write_text(json.dumps(stamp, indent=1) + "\n")

    # 4. Diffusion-DPO LoRA through the one training loop
    t0 = time.time()
    log(
        f"4/5 training {cfg.method.name} (LoRA r={cfg.lora.rank}) for {cfg.train.max_steps} steps on {len(pairs)} pairs"
    )
    result = train(cfg)
    summary = getattr(result, "summary", result)  # TrainResult, or the summary dict of older loops
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines() if line]
    plot_training_curves(history, out / "training_curves.png")
    stage("train", t0)

    # 5. evaluate tuned (A) vs base (B) on held-out prompts and seeds
    t0 = time.time()
    eval_p, eval_s = eval_set(opts)
    log(f"5/5 evaluating tuned vs base on {len(eval_p)} held-out (prompt, seed) pairs")
    before = generate(base, eval_p, eval_s, progress="eval base", **sample_kwargs)
    metrics, scored, flags, after = evaluate_lora(model, summary["export"], before, eval_p, eval_s, opts)
    stage("evaluate", t0)

    metrics.update(
        labels={"a": "tuned", "b": "base"},
        method=cfg.method.name,
        steps=summary["steps"],
        train_seconds=summary["seconds"],
        pairs=len(pairs),
        candidates=len(cand_prompts),
        guidance_scale=opts.guidance_scale,
        sampler_steps=opts.steps,
        timings=timings,
        seconds=round(time.time() - t_start, 1),
    )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    image_grid(before[:48], nrow=opts.eval_seeds_per_prompt, scale=4).save(out / "before.png")
    image_grid(after[:48], nrow=opts.eval_seeds_per_prompt, scale=4).save(out / "after.png")
    paired_grid(
        after,
        before,
        n=48,
        per_row=opts.eval_seeds_per_prompt,
        labels=("tuned", "base"),
        prompts=eval_p,
        captions_a=tile_captions(scored, flags["tuned"], 0),
        captions_b=tile_captions(scored, flags["base"], 1),
    ).save(out / "before_after.png")
    table = markdown_table(metrics, "tuned", "base") + "\n" + flaw_table(metrics["flaws"], "tuned", "base")
    write_report(out, metrics, table, eval_prompts[:8], cfg)
    log(
        f"report: {out / 'report.md'}  (win rate {metrics['win_rate']:.3f}, 95% CI "
        f"[{metrics['win_rate_ci'][0]:.3f}, {metrics['win_rate_ci'][1]:.3f}], n={metrics['n']}; "
        f"{metrics['seconds']:.0f}s total)"
    )
    return metrics


def eval_set(opts: QuickstartOptions) -> tuple[list[str], list[int]]:
    """The held-out (prompt, seed) list: each held-out prompt with ``eval_seeds_per_prompt`` unseen seeds."""
    _, eval_prompts = split_prompts(opts.train_prompts, opts.eval_prompts, opts.split_seed)
    eval_p = [p for p in eval_prompts for _ in range(opts.eval_seeds_per_prompt)]
    return eval_p, [EVAL_SEED_BASE + i for i in range(len(eval_p))]


def evaluate_lora(
    model: str | Path,
    lora: str | Path,
    before: torch.Tensor,
    eval_p: Sequence[str],
    eval_s: Sequence[int],
    opts: QuickstartOptions,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, dict[str, torch.Tensor]], torch.Tensor]:
    """Tuned (base + ``lora``, or the UNet a full fine-tune exported there) vs the base's samples ``before`` on
    the same (prompt, seed) list.

    Returns:
        (metrics of :func:`~mmalign.toy.evaluate.compare_scores` with ``flaws``, the per-sample scores, the
        flaw flags of each side, the tuned samples [N,3,H,W]).
    """
    from mmalign.toy.evaluate import compare_scores, flaw_rates, score_pair

    tuned = load_toy_pipeline(model)
    if (Path(lora) / "unet").is_dir():  # a full fine-tune's export (lora.enabled=false): the trained UNet
        from diffusers import UNet2DConditionModel

        tuned.unet = UNet2DConditionModel.from_pretrained(Path(lora) / "unet").eval()
    else:
        tuned.load_lora_weights(str(lora))
    after = generate(
        tuned, eval_p, eval_s, progress="eval tuned", guidance_scale=opts.guidance_scale, steps=opts.steps
    )
    scored = score_pair(eval_rewards(), after, before, eval_p)
    metrics = compare_scores(scored)
    flags = {name: flaw_flags(scored, side) for name, side in (("tuned", 0), ("base", 1))}
    metrics["flaws"] = {k: flaw_rates(flags["tuned"][k], flags["base"][k]) for k in FLAWS}
    return metrics, scored, flags, after


# The flaws the pairs target, as booleans per sample: speckle/blotches (the README's defect rate) and a
# dominant colour other than the prompt's.
FLAWS = ("speckle (toy_defect < 0.5)", "wrong colour (toy_color_correct = 0)", "either flaw")


def flaw_flags(scored: dict[str, tuple[torch.Tensor, torch.Tensor]], side: int) -> dict[str, torch.Tensor]:
    """Per-sample flaw flags of one side (0 = A, 1 = B) of :func:`~mmalign.toy.evaluate.score_pair`'s scores."""
    speckle = scored["toy_defect"][side] < 0.5
    wrong = scored["toy_color_correct"][side] < 0.5
    return dict(zip(FLAWS, (speckle, wrong, speckle | wrong)))


def tile_captions(scored, flags: dict[str, torch.Tensor], side: int) -> list[str]:
    """Under each grid tile: its training reward and the flaws it shows."""
    out = []
    for i, score in enumerate(scored["training_reward"][side].tolist()):
        tags = [t for t, k in (("speckle", FLAWS[0]), ("colour", FLAWS[1])) if flags[k][i]]
        out.append(f"{score:.2f} {' '.join(tags)}".strip())
    return out


def write_report(
    out: Path, metrics: dict[str, Any], table: str, shown_prompts: Sequence[str], cfg: Any
) -> Path:
    """``report.md``: what ran, the result table and the pictures."""
    lo, hi = metrics["win_rate_ci"]
    verdict = "beats" if lo > 0.5 else ("loses to" if hi < 0.5 else "is not distinguishable from")
    text = f"""# mmalign quickstart report

Diffusion-DPO (LoRA r={cfg.lora.rank}, beta={cfg.method.beta}, {metrics["steps"]} steps,
{metrics["train_seconds"]:.0f}s) on {metrics["pairs"]} preference pairs from {metrics["candidates"]}
candidates of the toy base model, scored by the training reward
(`toy_defect` + 0.5 `toy_color_mean`). Sampling: DDIM {metrics["sampler_steps"]} steps, CFG {metrics["guidance_scale"]}.

**Result:** the tuned model {verdict} the base under the training reward: win rate
**{metrics["win_rate"]:.3f}** (95% bootstrap CI [{lo:.3f}, {hi:.3f}]) over n = {metrics["n"]} held-out
(prompt, seed) pairs; the prompts were never used for training and both models start from the same noise.

{table}
`toy_shape` scores whether the shape is the one asked for; the pairs were not built from it, so a drop there
would be reward hacking. `toy_color_correct` is the binary colour-match rate.

## Before / after

Base (top row of each pair) and tuned (below), same prompt and seed per column: `before_after.png`. Under
each tile: its training reward, and `speckle` / `colour` where it shows that flaw (the flaw-rate table above).
Rows of `before.png` / `after.png` are prompts, columns seeds; first prompts: {", ".join(shown_prompts[:8])}.

![before and after](before_after.png)

## Training curves

![training curves](training_curves.png)

Timings (s): {json.dumps(metrics["timings"])}; total {metrics["seconds"]:.0f}s.
Files: `metrics.json`, `pairs.jsonl` (+ `candidates/`), `run/` (config, checkpoints, LoRA in `run/final`).
"""
    path = out / "report.md"
    path.write_text(text)
    return path


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _candidates_and_pairs(
    base: Any,
    train_prompts: list[str],
    cand_prompts: list[str],
    out: Path,
    opts: QuickstartOptions,
    sample_kwargs: dict[str, Any],
    log: Callable[[str], None],
    stage: Callable[[str, float], None],
) -> list[dict[str, Any]]:
    """Stages 1-3: sample candidates from the base, score them with the training reward, write ``pairs.jsonl``."""
    t0 = time.time()
    cand_seeds = [TRAIN_SEED_BASE + i for i in range(len(cand_prompts))]
    log(
        f"1/5 generating {len(cand_prompts)} candidates ({opts.candidates} per prompt, {len(train_prompts)} prompts)"
    )
    candidates = generate(base, cand_prompts, cand_seeds, progress="candidates", **sample_kwargs)
    cand_dir = out / "candidates"
    cand_dir.mkdir(exist_ok=True)
    paths = []
    for i, image in enumerate(candidates):
        path = cand_dir / f"{i:05d}.png"
        to_pil(image).save(path)
        paths.append(str(path))
    stage("generate", t0)

    t0 = time.time()
    scores = training_reward()(candidates, cand_prompts)
    pairs = make_pairs(cand_prompts, scores, paths, opts.min_margin, opts.pairing)
    rows = [
        {
            **p,
            "chosen": Path(p["chosen"]).relative_to(out).as_posix(),
            "rejected": Path(p["rejected"]).relative_to(out).as_posix(),
        }
        for p in pairs
    ]
    manifest = out / "pairs.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    log(
        f"2-3/5 scored candidates (mean training reward {scores.mean():.3f}); {len(pairs)} pairs -> {manifest}"
    )
    stage("score_and_pair", t0)
    return rows
