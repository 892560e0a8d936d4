"""Pipeline adapters: one per diffusers family, behind the :class:`PipelineAdapter` protocol.

``FAMILIES`` maps a family name to a :class:`Family`: the diffusers pipeline class it loads, its adapter
class and its noise process. Adding a family is one adapter module plus one line here
(docs/adding_a_family.md); a test or a user script may also add an entry at run time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmalign.config import ConfigError
from mmalign.pipelines.base import (
    NoiseProcess,
    PipelineAdapter,
    VideoAdapter,
    is_video,
    per_frame_mse,
    per_sample_mse,
)
from mmalign.pipelines.cogvideox import CogVideoXAdapter
from mmalign.pipelines.flux import FluxAdapter
from mmalign.pipelines.sd3 import SD3Adapter
from mmalign.pipelines.sd15 import SD15Adapter
from mmalign.pipelines.sdxl import SDXLAdapter
from mmalign.pipelines.toy_video import ToyVideoAdapter
from mmalign.pipelines.wan import WanAdapter, other_expert, wan_fps
from mmalign.utils import first_line


@dataclass(frozen=True)
class Family:
    """A registered pipeline family.

    Attributes:
        pipeline_class: diffusers pipeline class name (looked up in ``diffusers``) or the class itself.
        adapter: the adapter class; called with the loaded pipeline.
        noise_process: "ddpm" or "flow", known before any weight is loaded (config validation uses it).
        video: whether the adapter is a :class:`VideoAdapter`.
        fps: the frame rate a video family's clips are made to play at (Wan 2.1: 16, CogVideoX: 8): what
            ``generate`` writes into mp4 files and ``eval`` gives to rewards when ``--fps`` is not set.
        unused_components: ``model.adapter_options`` -> pipeline components a training run need not load (Wan 2.2
            A14B: the expert it does not train).
        model_fps: a model's ``model_index.json`` -> its clips' frame rate where it differs from ``fps`` within the
            family (Wan 2.2 TI2V-5B: 24), else None.
        guidance: the guidance scale ``generate`` and ``eval`` sample at unless told (FLUX.1 [dev]: its distilled
            guidance input, 3.5, as its pipeline's default).
        negative_prompts: whether its pipeline samples with negative prompts as ``generate`` calls it (FLUX.1: only
            with true CFG, which ``generate`` does not turn on).
    """

    pipeline_class: str | type
    adapter: type
    noise_process: NoiseProcess
    video: bool = False
    fps: float | None = None
    unused_components: Callable[[dict[str, Any]], list[str]] | None = None
    model_fps: Callable[[dict[str, Any]], float | None] | None = None
    guidance: float = 5.0
    negative_prompts: bool = True

    @property
    def pipeline_class_name(self) -> str:
        return self.pipeline_class if isinstance(self.pipeline_class, str) else self.pipeline_class.__name__


FAMILIES: dict[str, Family] = {
    "sd15": Family("StableDiffusionPipeline", SD15Adapter, "ddpm"),
    "sdxl": Family("StableDiffusionXLPipeline", SDXLAdapter, "ddpm"),
    "sd3": Family("StableDiffusion3Pipeline", SD3Adapter, "flow"),
    "flux": Family("FluxPipeline", FluxAdapter, "flow", guidance=3.5, negative_prompts=False),
    "cogvideox": Family("CogVideoXPipeline", CogVideoXAdapter, "ddpm", video=True, fps=8.0),
    "wan": Family(
        "WanPipeline",
        WanAdapter,
        "flow",
        video=True,
        fps=16.0,
        unused_components=other_expert,
        model_fps=wan_fps,
    ),
    "toy_video": Family("AnimateDiffPipeline", ToyVideoAdapter, "ddpm", video=True, fps=8.0),
}


def pipeline_index(pretrained: str, revision: str | None = None) -> dict[str, Any]:
    """The pipeline's ``model_index.json`` (local directory or hub id); no weights are read."""
    index = Path(pretrained) / "model_index.json"
    if index.is_file():
        meta = json.loads(index.read_text())
        return meta if isinstance(meta, dict) else {}
    from diffusers import DiffusionPipeline

    try:
        return dict(DiffusionPipeline.load_config(pretrained, revision=revision))
    except Exception as err:  # hub errors come in many types (offline, not found, gated)
        raise ValueError(
            f"{pretrained}: not a local pipeline directory, and its model_index.json could not be "
            f"read from the hub ({type(err).__name__}: {first_line(err, 200)})"
        ) from None


def check_num_frames(
    pretrained: str, family: str, num_frames: int | None, flag: str = "--num-frames"
) -> None:
    """Refuse a clip length the family's pipeline would change on its own. A causal video VAE with temporal
    compression c keeps frame 0 and compresses the rest c-fold, so Wan and CogVideoX clips have c k + 1 frames:
    diffusers rounds any other count with a warning, and the manifest, the pair settings and the user would all
    believe the count asked for. Reads the VAE's config only (nothing when it cannot be read: loading says why)."""
    spec = get_family(family)
    compression_of = getattr(spec.adapter, "temporal_compression_of", None)
    if num_frames is None or compression_of is None:
        return
    try:
        config = _component_class(pretrained, "vae", None).load_config(pretrained, subfolder="vae")
        c = int(compression_of(config))
    except (OSError, ValueError, KeyError, TypeError):
        return
    if c > 1 and (num_frames - 1) % c:
        lower = (num_frames - 1) // c * c + 1
        asked = f"{flag} {num_frames}" if flag.startswith("--") else f"{flag}={num_frames}"
        raise ValueError(
            f"{asked}: {family} clips have {c}k+1 frames (its VAE keeps frame 0 and compresses the rest {c}x); "
            f"use {lower} or {lower + c}"
        )


def check_guidance_2(
    pretrained: str, guidance_2: float | None, flag: str = "--guidance-2"
) -> dict[str, float]:
    """``{"guidance_scale_2": g}`` for a two-expert pipeline (Wan 2.2 A14B: the low-noise expert's CFG scale;
    its model card samples at 4.0 / 3.0), ``{}`` when unset; refused for a model without a second expert, where
    diffusers would ignore it. Reads ``model_index.json`` only."""
    if guidance_2 is None:
        return {}
    if pipeline_index(resolve_pretrained(pretrained)).get("boundary_ratio") is None:
        raise ValueError(
            f"{flag} {guidance_2:g} sets the low-noise expert's CFG scale of a two-expert pipeline (Wan 2.2 A14B); "
            f"{pretrained} has one denoiser: use --guidance"
        )
    return {"guidance_scale_2": float(guidance_2)}


def pipeline_class_name(pretrained: str, revision: str | None = None) -> str | None:
    """``_class_name`` of the pipeline's ``model_index.json`` (local directory or hub id)."""
    return pipeline_index(pretrained, revision).get("_class_name")


def family_of_class(class_name: str | None) -> str | None:
    """The registered family whose pipeline class is ``class_name`` (None if none)."""
    for family, spec in FAMILIES.items():
        if spec.pipeline_class_name == class_name:
            return family
    return None


PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding the ``mmalign`` package


def resolve_pretrained(pretrained: str) -> str:
    """A path written relative to the package (``mmalign/toy/assets/toy-sd`` in the toy recipes) resolved against
    the installed package when it does not exist relative to the current directory; anything else unchanged."""
    path = Path(pretrained)
    if not path.exists() and path.parts[:1] == ("mmalign",) and (PACKAGE_ROOT / path).exists():
        return str(PACKAGE_ROOT / path)
    return pretrained


def detect_family(pretrained: str, revision: str | None = None) -> str:
    """Family from the pipeline's ``model_index.json`` ``_class_name`` (local directory or hub id)."""
    pretrained = resolve_pretrained(pretrained)
    class_name = pipeline_class_name(pretrained, revision)
    family = family_of_class(class_name)
    if family is None:
        raise ValueError(
            f"{pretrained}: pipeline class {class_name!r} has no mmalign adapter; set model.family to one of {sorted(FAMILIES)}"
        )
    return family


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"model.family={name!r} is unknown; choose from {sorted(FAMILIES)} or auto")
    return FAMILIES[name]


DEFAULT_FPS = 8.0


def clip_fps(family: str, fps: float | None = None, model: str | None = None) -> float:
    """``fps`` when given, else the frame rate ``model``'s clips are made for (:attr:`Family.model_fps`, from its
    ``model_index.json``: Wan 2.2 TI2V-5B 24), else the family's own (:attr:`Family.fps`), else 8."""
    if fps:
        return float(fps)
    spec = get_family(family)
    if model is not None and spec.model_fps is not None:
        try:
            found = spec.model_fps(pipeline_index(resolve_pretrained(model)))
        except ValueError:  # unreadable here: loading the model reports it
            found = None
        if found:
            return float(found)
    return float(spec.fps or DEFAULT_FPS)


def load_pipeline(
    pretrained: str,
    *,
    family: str = "auto",
    revision: str | None = None,
    variant: str | None = None,
    vae: str | None = None,
    torch_dtype: Any = None,
    trust_remote_code: bool = False,
    skip: Sequence[str] = (),
    empty: Sequence[str] = (),
) -> tuple[Any, str]:
    """Load a diffusers pipeline with ``from_pretrained`` (hub id or local path). Returns (pipeline, family).

    ``skip`` names components not to load (None in the pipeline), e.g. the Wan 2.2 expert a run does not train.
    ``empty`` names components built from their config with no weights (:func:`empty_component`).

    Raises:
        ConfigError: one line naming ``pretrained`` when it is missing (locally, or offline and not in the hub
            cache), incomplete or not a pipeline mmalign knows.
    """
    try:
        return _load_pipeline(
            pretrained, family, revision, variant, vae, torch_dtype, trust_remote_code, skip, empty
        )
    except ConfigError:
        raise
    except (
        OSError,
        ValueError,
        KeyError,
        TypeError,
    ) as err:  # hub/offline/missing files, bad model_index.json
        raise _cannot_load(pretrained, err) from err


def _cannot_load(pretrained: str, err: Exception) -> ConfigError:
    from mmalign.config import clip

    return ConfigError(
        f"cannot load the diffusers pipeline {clip(pretrained)} (model.pretrained / --model): {clip(first_line(err))}"
    )


DENOISERS = ("unet", "transformer", "transformer_2")  # the pipeline components mmalign trains


def empty_component(pretrained: str, name: str, revision: str | None = None) -> Any:
    """Pipeline component ``name`` built from its ``config.json`` on the meta device: its config is there (an
    adapter may read it, as CogVideoX's reads ``max_text_seq_length``), its weights are neither read nor allocated.
    For work that never runs the component (``mmalign cache``; real SDXL from a bf16 checkpoint, which
    ``from_pretrained`` upcasts: 1.3 GB peak instead of 15.5 GB, BENCHMARKS.md)."""
    from accelerate import init_empty_weights

    cls = _component_class(pretrained, name, revision)
    with init_empty_weights():
        return cls.from_config(cls.load_config(pretrained, subfolder=name, revision=revision))


def _component_class(pretrained: str, name: str, revision: str | None) -> type:
    """The diffusers class of pipeline component ``name``, from ``model_index.json``."""
    import diffusers

    entry = pipeline_index(pretrained, revision).get(name)
    if not (isinstance(entry, list) and len(entry) == 2 and hasattr(diffusers, str(entry[1]))):
        raise ValueError(f"{pretrained}: model_index.json has no diffusers component {name!r}")
    return getattr(diffusers, entry[1])


def load_unused(pipe: Any, family: str, model: Any, *, device: Any, dtype: Any) -> list[str]:
    """Load, for sampling, what :func:`load_model` left out of ``pipe`` as unused by training
    (``Family.unused_components``: the other expert of a Wan 2.2 A14B run), frozen and in ``dtype``; components
    already in the pipeline stay as they are. Returns the names it loaded.

    On an accelerator ``device`` each is kept on the host and streamed to the device one block at a time while it
    runs (diffusers' ``enable_group_offload``), so sampling needs about one block of device memory for it, not
    the whole model (an A14B expert: 28 GB in bf16) beside the one in training; on a CPU it simply stays there.
    """
    import torch

    unused = get_family(family).unused_components
    names = [n for n in (unused(model.adapter_options) if unused else []) if getattr(pipe, n, None) is None]
    device = torch.device(device)
    pretrained = resolve_pretrained(model.pretrained)
    for name in names:
        cls = _component_class(pretrained, name, model.revision)
        component = cls.from_pretrained(
            pretrained, subfolder=name, revision=model.revision, variant=model.variant, torch_dtype=dtype
        )
        component.requires_grad_(False).eval()
        if device.type != "cpu" and hasattr(component, "enable_group_offload"):  # diffusers >= 0.33
            component.enable_group_offload(
                onload_device=device,
                offload_device=torch.device("cpu"),
                offload_type="block_level",
                num_blocks_per_group=1,
                use_stream=device.type == "cuda",
            )
        elif device.type != "cpu":
            component.to(device)
        setattr(pipe, name, component)
    return names


def _load_pipeline(
    pretrained: str,
    family: str,
    revision: str | None,
    variant: str | None,
    vae: str | None,
    torch_dtype: Any,
    trust_remote_code: bool,
    skip: Sequence[str] = (),
    empty: Sequence[str] = (),
) -> tuple[Any, str]:
    import diffusers

    pretrained = resolve_pretrained(pretrained)
    if family == "auto":
        family = detect_family(pretrained, revision)
    else:  # a family that contradicts model_index.json (an SD1.5 pipeline trained as SDXL) would run silently
        try:
            class_name = pipeline_class_name(pretrained, revision)
        except (OSError, ValueError):
            class_name = None
        expected = get_family(family).pipeline_class_name
        if family_of_class(class_name) is not None and class_name != expected:
            raise ConfigError(
                f"model.family={family} expects a {expected} but {pretrained} is a {class_name} "
                f"(family {family_of_class(class_name)}); set model.family=auto or the matching family"
            )
    spec = get_family(family)
    cls = (
        getattr(diffusers, spec.pipeline_class)
        if isinstance(spec.pipeline_class, str)
        else spec.pipeline_class
    )
    kwargs: dict[str, Any] = {
        "revision": revision,
        "variant": variant,
        **dict.fromkeys(skip),
        **{name: empty_component(pretrained, name, revision) for name in empty if name not in skip},
    }
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    if vae is not None:
        try:
            kwargs["vae"] = diffusers.AutoencoderKL.from_pretrained(vae, torch_dtype=torch_dtype)
        except (OSError, ValueError, KeyError, TypeError) as err:
            from mmalign.config import clip

            hint = (
                " (offline: a hub id must already be in the cache; or give a local directory, or set model.vae=null "
                "to use the pipeline's own)"
                if os.environ.get("HF_HUB_OFFLINE") == "1"
                else ""
            )
            raise ConfigError(
                f"cannot load the VAE {clip(vae)} (model.vae): {clip(first_line(err))}{hint}"
            ) from err
    pipe = cls.from_pretrained(pretrained, **kwargs)
    return pipe, family


def load_model(
    model: Any, *, torch_dtype: Any = None, denoisers: bool = True
) -> tuple[Any, str, PipelineAdapter]:
    """A run config's ``model`` section -> (pipeline, family, adapter): :func:`load_pipeline` + :func:`make_adapter`.

    Components the adapter's options leave untrained and unused are not loaded (``Family.unused_components``);
    ``denoisers=False`` builds the denoisers without their weights, for encoding only (:func:`empty_component`).
    """
    family, unused = model.family, None
    try:
        if family == "auto":
            family = detect_family(model.pretrained, model.revision)
        unused = get_family(family).unused_components
    except ValueError:  # an unknown family or an unreadable model: load_pipeline says which, in its words
        family = model.family
    pipe, family = load_pipeline(
        model.pretrained,
        family=family,
        revision=model.revision,
        variant=model.variant,
        vae=model.vae,
        torch_dtype=torch_dtype,
        trust_remote_code=model.trust_remote_code,
        skip=unused(model.adapter_options) if unused else (),
        empty=() if denoisers else _denoisers_of(model),
    )
    return pipe, family, make_adapter(pipe, family, **model.adapter_options)


def _denoisers_of(model: Any) -> list[str]:
    try:
        index = pipeline_index(resolve_pretrained(model.pretrained), model.revision)
    except ValueError as err:  # `mmalign cache` of a model that is neither here nor reachable
        raise _cannot_load(model.pretrained, err) from err
    return [name for name in DENOISERS if isinstance(index.get(name), list) and index[name][1] is not None]


def make_adapter(pipeline: Any, family: str, **options: Any) -> PipelineAdapter:
    """The family's adapter around ``pipeline``; ``options`` are family-specific adapter fields (``model.adapter_options``),
    e.g. ``timestep_sampling="logit_normal"`` for Wan."""
    import dataclasses

    cls = get_family(family).adapter
    if options and dataclasses.is_dataclass(cls):
        fixed = {"pipeline", "family", "denoiser_name", "noise_process"}
        valid = sorted(f.name for f in dataclasses.fields(cls) if f.init and f.name not in fixed)
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ConfigError(
                f"model.adapter_options {unknown} are not options of the {family} adapter; valid: {valid}"
            )
    return cls(pipeline, **options)


def prompt_length(pipe: Any, adapter: Any = None) -> dict[str, int]:
    """``{"max_sequence_length": n}`` for a pipeline call: the prompt length the family's adapter trains with.

    diffusers' video pipelines pad prompts to their own default (CogVideoX 226 tokens, Wan 512). A checkpoint built
    for another length fails there (CogVideoX's positional table covers exactly ``max_text_seq_length`` text
    tokens), and Wan would attend over other padding than in training. Empty for families without the keyword.

    Args:
        pipe: A loaded pipeline of a registered family (other pipelines: empty).
        adapter: Its adapter, if one is at hand (otherwise one is made: cheap, no weights are touched).
    """
    import inspect

    if "max_sequence_length" not in inspect.signature(pipe.__call__).parameters:
        return {}
    if adapter is None:
        family = family_of_class(type(pipe).__name__)
        adapter = make_adapter(pipe, family) if family else None
    n = getattr(adapter, "max_text_len", None)
    return {"max_sequence_length": int(n)} if n else {}


__all__ = [
    "FAMILIES",
    "Family",
    "NoiseProcess",
    "PipelineAdapter",
    "VideoAdapter",
    "detect_family",
    "family_of_class",
    "get_family",
    "load_model",
    "is_video",
    "load_pipeline",
    "load_unused",
    "check_num_frames",
    "make_adapter",
    "per_frame_mse",
    "per_sample_mse",
    "pipeline_class_name",
    "prompt_length",
    "resolve_pretrained",
]
