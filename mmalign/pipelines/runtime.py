"""Where and in what precision a pipeline runs, and seeded batched sampling of images or videos.

Every command that runs a model (``generate``, ``eval``, ``score``, ``label-video``, ``cache``) takes the same
four options, resolved here: ``device`` (default ``cuda`` when present), ``dtype`` (default bf16 on CUDA, fp32
on CPU), ``batch_size`` and ``cpu_offload`` (diffusers' ``enable_model_cpu_offload``: each model moves to the
GPU only while it runs).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from mmalign.pipelines import DENOISERS  # a full fine-tune's final/ holds one of these folders
from mmalign.utils import first_line

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as a torch.device; ``None``/``"auto"`` is ``cuda`` when available, else ``cpu``."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``dtype`` by name (fp32, bf16, fp16); ``None``/``"auto"`` is bf16 on CUDA and fp32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: use one of {sorted(DTYPES)} or auto")
    return DTYPES[dtype]


def place_pipeline(pipe: Any, device: torch.device, *, cpu_offload: bool = False) -> Any:
    """Move a loaded pipeline to ``device``, or enable model CPU offload onto it."""
    if cpu_offload:
        if device.type == "cpu":
            raise ValueError("--cpu-offload needs an accelerator device (--device cuda)")
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    return pipe


def load_for_inference(
    model: str,
    *,
    family: str = "auto",
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    cpu_offload: bool = False,
    lora: str | Sequence[str] | None = None,
    verbose: bool = False,
) -> tuple[Any, str, torch.device]:
    """``load_pipeline`` + trained weights + placement, with diffusers' loading bars and warnings off unless
    ``verbose``. ``lora``: one or more runs' ``final/`` folders, LoRA or full fine-tune (:func:`load_trained`).

    Returns:
        (pipeline, family, device).
    """
    from mmalign.pipelines import load_pipeline

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    with quiet_libraries(not verbose):
        pipe, family = load_pipeline(model, family=family, torch_dtype=torch_dtype)
        if lora:
            load_trained(pipe, lora)
    place_pipeline(pipe, dev, cpu_offload=cpu_offload)
    pipe.set_progress_bar_config(disable=True)
    return pipe, family, dev


LORA_TARGET_FILE = "lora_target.json"  # beside a LoRA for another component than diffusers' default


def trained_kinds(paths: str | Sequence[str] | None) -> dict[str, str]:
    """What ``mmalign train`` left in each of ``paths`` (runs' ``final/``): path -> "lora" or "full" (a denoiser
    folder), in order; ``{}`` for None.

    Raises:
        ValueError: a path that is neither, naming what was looked for.
    """
    from pathlib import Path

    kinds = {}
    for path in [] if paths is None else [paths] if isinstance(paths, str) else paths:
        p = Path(path)
        if (p.is_file() and p.suffix == ".safetensors") or (p / "pytorch_lora_weights.safetensors").is_file():
            kinds[path] = "lora"
        elif any((p / name / "config.json").is_file() for name in DENOISERS):
            kinds[path] = "full"
        elif not p.exists():
            raise ValueError(f"{path}: not found; give a run's final/ folder")
        elif p.name in DENOISERS and (p / "config.json").is_file():
            raise ValueError(
                f"{path}: a fine-tuned {p.name} itself; give the final/ folder that holds it ({p.parent})"
            )
        else:
            raise ValueError(
                f"{path}: no LoRA (pytorch_lora_weights.safetensors) and no fine-tuned denoiser "
                f"({', '.join(n + '/' for n in DENOISERS)}) here; give a run's final/ folder"
            )
    return kinds


def load_trained(pipe: Any, paths: str | Sequence[str]) -> None:
    """Load what ``mmalign train`` exported (each a run's ``final/``) into ``pipe``; several are all active.

    A full fine-tune's denoiser folder replaces the pipeline's component of that name, in the pipeline's dtype.
    A LoRA is loaded into the component it was trained on: a Wan 2.2 low-noise expert's LoRA (``transformer_2``)
    is saved as a transformer LoRA, as diffusers saves it, and the ``lora_target.json`` beside it says to load it
    with ``load_into_transformer_2=True``. Several LoRAs (both A14B experts' runs, or two LoRAs of one UNet) are
    loaded as adapters ``lora_0``, ``lora_1`` ... and switched on together at weight 1 (``set_adapters``).
    """
    import json
    from pathlib import Path

    kinds = trained_kinds(paths)
    for path, kind in kinds.items():
        try:
            if kind == "full":
                names = [n for n in DENOISERS if (Path(path) / n / "config.json").is_file()]
                missing = [n for n in names if getattr(pipe, n, None) is None]
                if missing:  # never drop trained weights silently
                    raise ValueError(f"it has no {missing[0]}")
                for name in names:
                    current = getattr(pipe, name)
                    dtype = next(current.parameters()).dtype
                    pipe.register_modules(
                        **{name: type(current).from_pretrained(path, subfolder=name, torch_dtype=dtype)}
                    )
                continue
            target = Path(path) / LORA_TARGET_FILE
            component = json.loads(target.read_text()).get("component") if target.is_file() else None
            if component == "transformer_2" and getattr(pipe, "transformer_2", None) is None:
                raise ValueError(f"a LoRA of transformer_2 ({LORA_TARGET_FILE}); this pipeline has none")
            into = {"load_into_transformer_2": True} if component == "transformer_2" else {}
            adapter = f"lora_{list(kinds).index(path)}" if len(kinds) > 1 else None
            with _library_logs_off():  # diffusers logs the whole state-dict mismatch before raising it
                pipe.load_lora_weights(path, adapter_name=adapter, **into)
        except (OSError, ValueError, RuntimeError, KeyError, AttributeError, TypeError) as err:
            raise ValueError(
                f"{path}: cannot load it into this {type(pipe).__name__}{_trained_on(path)}: {_gist(err)}"
            ) from err
    loras = [f"lora_{i}" for i, kind in enumerate(kinds.values()) if kind == "lora"]
    if len(kinds) > 1 and loras:
        pipe.set_adapters(loras)


def _trained_on(path: str) -> str:
    """``"; it was trained on <base>"`` from the run's ``mmalign_config.yaml`` beside the export, else ``""``."""
    from pathlib import Path

    from mmalign.config import ConfigError, read_yaml

    try:
        base = read_yaml(Path(path) / "mmalign_config.yaml", "run config").get("model", {}).get("pretrained")
    except (ConfigError, OSError, AttributeError):
        return ""
    return f" (it was trained on {base})" if base else ""


def _gist(err: BaseException) -> str:
    """The first line of a loading error that says what differs (a state dict's first size mismatch)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    mismatch = next((line for line in lines if line.startswith("size mismatch")), None)
    return mismatch or first_line(err)


@contextlib.contextmanager
def _library_logs_off() -> Iterator[None]:
    import logging

    loggers = [logging.getLogger(name) for name in ("diffusers", "peft")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def lora_disabled(pipe: Any) -> Iterator[Any]:
    """The pipeline's loaded LoRA switched off inside the block (diffusers' ``disable_lora``/``enable_lora``).

    The base model's outputs without loading a second copy of it (peft runs only the base layers).
    """
    pipe.disable_lora()
    try:
        yield pipe
    finally:
        pipe.enable_lora()


class quiet_libraries:
    """Context manager: diffusers/transformers progress bars and info/warnings off while loading.

    Args:
        enabled: Off (everything shown) when False, as ``--verbose`` asks.
        python_warnings: Also ignore Python ``FutureWarning``/``UserWarning`` (deprecation notices while loading).
    """

    def __init__(self, enabled: bool = True, python_warnings: bool = True):
        self.enabled = enabled
        self.python_warnings = python_warnings

    def __enter__(self) -> quiet_libraries:
        if self.enabled:
            import warnings

            import diffusers
            import transformers

            self._warnings = warnings.catch_warnings()
            self._warnings.__enter__()
            if self.python_warnings:
                warnings.simplefilter("ignore", FutureWarning)  # e.g. diffusers' torch_dtype -> dtype rename
                warnings.simplefilter("ignore", UserWarning)

            self._levels = (
                diffusers.utils.logging.get_verbosity(),
                transformers.utils.logging.get_verbosity(),
            )
            diffusers.utils.logging.set_verbosity_error()
            transformers.utils.logging.set_verbosity_error()
            diffusers.utils.logging.disable_progress_bar()
            transformers.utils.logging.disable_progress_bar()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            import diffusers
            import transformers

            diffusers.utils.logging.set_verbosity(self._levels[0])
            transformers.utils.logging.set_verbosity(self._levels[1])
            diffusers.utils.logging.enable_progress_bar()
            transformers.utils.logging.enable_progress_bar()
            self._warnings.__exit__(*exc)


@torch.no_grad()
def iter_samples(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    negative_prompts: Sequence[str] | None = None,
    steps: int = 25,
    guidance: float = 5.0,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "sampling",
    **pipe_kwargs: Any,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Sample one image or clip per (prompt, seed), a batch at a time: yields ``(first index, media)``.

    Sample ``i`` depends only on its prompt and seed, not on the batch: each sample gets its own CPU
    ``torch.Generator`` (diffusers draws the initial noise on CPU and moves it), so a seed gives the same noise on
    every device and batch size. Only one batch is held at a time, so a caller that writes or scores each batch
    as it comes needs memory for ``batch_size`` samples, not for the whole set (4,000 SDXL images are 50 GB as
    float32; 100 Wan clips of 81 frames at 480x832 are 39 GB).

    Args:
        pipe: Any diffusers text-to-image or text-to-video pipeline (LoRA/adapters already loaded).
        prompts: One prompt per sample.
        seeds: One seed per sample.
        negative_prompts: One per sample, or None.
        steps: Sampler steps.
        guidance: Classifier-free guidance scale.
        height: Pixel height (None: the pipeline's default).
        width: Pixel width (None: the pipeline's default).
        batch_size: Samples per pipeline call.
        progress: One overall tqdm bar (samples, not denoising steps).
        desc: Bar label.
        pipe_kwargs: Passed on (e.g. ``num_frames`` for a video pipeline; ``max_sequence_length`` defaults to
            :func:`mmalign.pipelines.prompt_length`).

    Yields:
        ``(i, media)``: the index of the batch's first sample and its [B,3,H,W] images or [B,T,3,H,W] clips,
        float32 in [0, 1], on CPU.
    """
    from tqdm.auto import tqdm

    from mmalign.pipelines import prompt_length

    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    text_length = prompt_length(pipe)  # the length the model was trained with, not the pipeline's default
    with tqdm(total=len(prompts), desc=desc, unit="sample", disable=not progress) as bar:
        for i in range(0, len(prompts), batch_size):
            kwargs = {**text_length, **pipe_kwargs}
            if negative_prompts is not None and any(negative_prompts[i : i + batch_size]):
                kwargs["negative_prompt"] = list(negative_prompts[i : i + batch_size])
            if height is not None:
                kwargs["height"] = height
            if width is not None:
                kwargs["width"] = width
            gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds[i : i + batch_size]]
            result = pipe(
                list(prompts[i : i + batch_size]),
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=gens,
                output_type="pt",
                **kwargs,
            )
            media = result.frames if hasattr(result, "frames") else result.images
            yield i, torch.as_tensor(media).float().cpu().clamp(0, 1)
            bar.update(len(gens))


def sample(pipe: Any, prompts: Sequence[str], seeds: Sequence[int], **kwargs: Any) -> torch.Tensor:
    """:func:`iter_samples` gathered into one tensor: [N,3,H,W] images or [N,T,3,H,W] clips in [0, 1], on CPU.

    For small sets (the toy world's evaluations, tests); ``generate`` and ``eval`` stream with :func:`iter_samples`.
    """
    return torch.cat([media for _, media in iter_samples(pipe, prompts, seeds, **kwargs)])
