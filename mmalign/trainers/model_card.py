"""The model card of a run's export (``final/README.md``) and its upload to the Hugging Face Hub.

Every export carries a Hugging Face model card: YAML metadata (``library_name: diffusers``, ``base_model`` when
the base is a hub id, tags) and what a reader of ``final/`` needs: what was trained, from which base, on which
data and with which hyper-parameters, the last validation grid, and the lines that load it. Those lines depend on
what was exported: a LoRA (``load_lora_weights``; a Wan 2.2 low-noise expert with ``load_into_transformer_2``),
a full fine-tune's denoiser folder, a user adapter (personal_dpo), or a *negative* model (Self-NPO,
Diffusion-NPO) that is meant for NPO guidance, not to be loaded as an improvement. The resolved run config is
saved beside it (``mmalign_config.yaml``), so an uploaded folder says how to reproduce it.

``train.push_to_hub`` uploads ``final/`` with :func:`huggingface_hub.upload_folder` when the run has finished,
as diffusers' training scripts do; whether it can (a token, not offline) is checked before training, and an
upload that fails still leaves the export, and says how to upload it later.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from mmalign.config import ConfigError, RunConfig, to_dict
from mmalign.utils import first_line

CARD_FILE = "README.md"
CONFIG_FILE = "mmalign_config.yaml"
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def is_negative_model(cfg: RunConfig) -> bool:
    """Whether the run trains a negative model, used through NPO guidance (Self-NPO; Diffusion-NPO's swapped
    pairs) rather than loaded as a better model."""
    return cfg.method.name == "self_npo" or bool(getattr(cfg.method, "swap_pairs", False))


def base_model_id(pretrained: str) -> str | None:
    """The hub id of the base model, or None for a local directory (the Hub's ``base_model`` takes only ids)."""
    return pretrained if _REPO_ID.match(pretrained) and not Path(pretrained).exists() else None


def usage(cfg: RunConfig, out_dir: Path, pipeline_class: str, where: str, video: bool = False) -> str:
    """Python and CLI lines that use what ``out_dir`` holds, found at ``where`` (a hub id or a path)."""
    base = cfg.model.pretrained
    load = f'pipe = {pipeline_class}.from_pretrained("{base}")\n'
    if (out_dir / "user_adapter.safetensors").is_file():
        return (
            "A user adapter (IP-Adapter format: a user vector in, decoupled cross-attention): generate for a user "
            "from their few choices or a known user's vector with\n\n```bash\n"
            f"mmalign generate --model {base} --user-adapter {where} --user-shots my_choices.jsonl "
            '--prompt "a fox in the snow" --out samples\n```\n'
        )
    if is_negative_model(cfg):
        return (
            "**A negative model**: it is trained to be *worse* than the base, and improves sampling through NPO "
            "guidance (the negative branch of classifier-free guidance). Loaded on its own, it makes samples worse.\n\n"
            "```python\nfrom diffusers import DiffusionPipeline\n"
            "from mmalign.pipelines.npo import enable_npo_guidance\n\n"
            f'pipe = DiffusionPipeline.from_pretrained("{base}")\n'
            f'enable_npo_guidance(pipe, "{where}", alpha=1.0, beta=1.0)\n'
            'image = pipe("a fox in the snow", guidance_scale=7.5).images[0]\n```\n\n'
            f'```bash\nmmalign generate --model {base} --negative-lora {where} --prompt "a fox in the snow" --out samples\n```\n'
        )
    folders = {  # a full fine-tune: diffusers-format denoiser folder(s) -> their model classes
        p.name: json.loads((p / "config.json").read_text())["_class_name"]
        for p in sorted(out_dir.iterdir())
        if (p / "config.json").is_file()
    }
    if folders:
        lines = "".join(
            f'{name} = {cls}.from_pretrained("{where}", subfolder="{name}")\n'
            for name, cls in folders.items()
        )
        given = ", ".join(f"{name}={name}" for name in folders)
        code = (
            f"from diffusers import {', '.join([pipeline_class, *sorted(set(folders.values()))])}\n\n{lines}"
            f'pipe = {pipeline_class}.from_pretrained("{base}", {given})\n'
        )
    else:
        into = ", load_into_transformer_2=True" if (out_dir / "lora_target.json").is_file() else ""
        code = f'from diffusers import {pipeline_class}\n\n{load}pipe.load_lora_weights("{where}"{into})\n'
    reward = "flicker" if video else "pickscore"
    return (  # mmalign's generate/eval load either kind from the folder
        f'```python\n{code}```\n\nWith mmalign: `mmalign generate --model {base} --lora {where} --prompt "a fox" '
        f"--out samples`; against the base: `mmalign eval --model-a {base} --lora-a {where} --prompts prompts.txt "
        f"--reward {reward} --out eval`.\n"
    )


def _is_video(family: str) -> bool:
    from mmalign.pipelines import FAMILIES

    return family in FAMILIES and FAMILIES[family].video


def _table(rows: dict[str, Any]) -> str:
    return "| key | value |\n|---|---|\n" + "".join(
        f"| `{k}` | {str(v).replace('|', '/')} |\n" for k, v in rows.items()
    )


def write_model_card(
    cfg: RunConfig,
    out_dir: Path,
    *,
    pipeline_class: str,
    summary: str,
    result: dict[str, Any],
    validation: Path | None = None,
    where: str | None = None,
) -> Path:
    """Write ``out_dir/README.md`` (and the run config beside it; the last validation grid as ``validation.png``).

    Args:
        cfg: the run config.
        out_dir: the export (``final/``), already written.
        pipeline_class: the diffusers pipeline class of the base (the loading lines use it).
        summary: one line on the method (its registry summary).
        result: the run's figures: steps, final metrics, data counts.
        validation: the last validation grid, if the run sampled one.
        where: where readers find the folder (its hub repo id); default, a placeholder path.
    """
    from huggingface_hub import ModelCard, ModelCardData

    import mmalign

    negative, video = is_negative_model(cfg), _is_video(result.get("family", ""))
    tags = [
        "diffusers",
        "mmalign",
        "text-to-video" if video else "text-to-image",
        cfg.method.name.replace("_", "-"),
        "lora" if cfg.lora.enabled else "full-fine-tune",
        *(["negative-model", "npo"] if negative else []),
    ]
    data = ModelCardData(library_name="diffusers", base_model=base_model_id(cfg.model.pretrained), tags=tags)
    method = {f"method.{k}": v for k, v in to_dict(cfg)["method"].items()}
    trained = {
        "model.pretrained": cfg.model.pretrained,
        "model.resolution": cfg.model.resolution,
        "data.source": cfg.data.source,
        "lora.rank": cfg.lora.rank if cfg.lora.enabled else "(full fine-tune)",
        "train.max_steps": cfg.train.max_steps,
        "train.batch_size x accumulation x processes": (
            f"{cfg.train.batch_size} x {cfg.train.gradient_accumulation_steps} x {result.get('num_processes', 1)}"
        ),
        "train.learning_rate": cfg.train.learning_rate,
        "train.scale_lr": cfg.train.scale_lr,
        "train.mixed_precision": cfg.train.mixed_precision,
        **method,
    }
    figures = {
        "steps": result.get("steps"),
        **{f"data: {k}": v for k, v in (result.get("data") or {}).items()},
    }
    figures.update({k: f"{v:.4g}" for k, v in (result.get("final_metrics") or {}).items()})
    grid = ""
    if validation is not None and validation.is_file():
        shutil.copyfile(validation, out_dir / "validation.png")
        prompts = "; ".join(cfg.train.validation_prompts)
        grid = f"\n## Validation\n\n![validation grid](validation.png)\n\nPrompts: {prompts} (seed {cfg.train.validation_seed}).\n"
    kind = "negative model" if negative else "LoRA" if cfg.lora.enabled else "fine-tune"
    body = (
        f"# {cfg.method.name} {kind} of {cfg.model.pretrained}\n\n"
        f"Trained with mmalign {mmalign.__version__}: {summary}\n\n"
        f"## Use\n\n{usage(cfg, out_dir, pipeline_class, where or 'path/to/this/folder', video)}{grid}\n"
        f"## Training\n\n{_table(trained)}\n"
        f"The whole run config is in `{CONFIG_FILE}` (`mmalign train {CONFIG_FILE} train.output_dir=NEW` reruns it from the folder it was trained in: its paths are as they were given).\n\n"
        f"## Result at the last step\n\n{_table(figures)}"
    )
    rerun = to_dict(cfg)  # how this invocation continued or replaced a run is not part of the recipe
    rerun["train"].update(resume=None, overwrite=False)
    (out_dir / CONFIG_FILE).write_text(yaml.safe_dump(rerun, sort_keys=False))
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
    card.save(out_dir / CARD_FILE)
    return out_dir / CARD_FILE


def hub_repo_id(cfg: RunConfig) -> str:
    """``train.hub_model_id``, or the output folder's name (under the token's account, as diffusers' scripts)."""
    return cfg.train.hub_model_id or Path(cfg.train.output_dir).resolve().name


def check_push(cfg: RunConfig) -> None:
    """Before training: refuse ``train.push_to_hub`` that cannot upload (a malformed repo id, offline, no token),
    instead of failing after the run it would cost."""
    if not cfg.train.push_to_hub:
        return
    from huggingface_hub import constants, get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(hub_repo_id(cfg))
    except HFValidationError as err:
        source = (
            "train.hub_model_id"
            if cfg.train.hub_model_id
            else "the output folder's name (train.hub_model_id)"
        )
        raise ConfigError(
            f"train.push_to_hub: {source} is not a hub repo id: {first_line(err, 200)}"
        ) from None

    if constants.HF_HUB_OFFLINE:
        raise ConfigError(
            "train.push_to_hub=true, but HF_HUB_OFFLINE is set: nothing can be uploaded offline"
        )
    if get_token() is None:
        raise ConfigError(
            "train.push_to_hub=true needs a Hugging Face token: `huggingface-cli login`, or set HF_TOKEN"
        )


def push_export(cfg: RunConfig, out_dir: Path, write_card: Callable[[str], Any]) -> dict[str, str]:
    """Upload ``out_dir`` to ``hub_repo_id(cfg)``, its card first rewritten by ``write_card(repo_id)`` to load
    from the repo. Returns ``{"repo_id", "url"}``, or ``{"repo_id", "error"}`` saying how to upload it later
    (the export stays where it is either way)."""
    from huggingface_hub import create_repo, upload_folder

    repo_id = hub_repo_id(cfg)
    try:
        repo_id = create_repo(repo_id, private=cfg.train.hub_private, exist_ok=True).repo_id
        write_card(repo_id)
        commit = upload_folder(
            repo_id=repo_id, folder_path=out_dir, commit_message=f"mmalign {cfg.method.name} export"
        )
    except Exception as err:  # hub errors come in many types (network, auth, rate limit)
        return {
            "repo_id": repo_id,
            "error": f"{type(err).__name__}: {first_line(err)} (upload it later: huggingface-cli upload {repo_id} {out_dir})",
        }
    return {
        "repo_id": repo_id,
        "url": str(getattr(commit, "repo_url", None) or f"https://huggingface.co/{repo_id}"),
    }
