"""Tiny random-initialised reward models of the real architecture families, saved like hub checkpoints.

Tests and ``bench/bench_rewards.py`` build these in code and load them back through the factories in
:mod:`mmalign.rewards.clip` / :mod:`mmalign.rewards.judge`, the code path a user's checkpoint takes.
Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_WORDS = [
    "a",
    "an",
    "photo",
    "of",
    "red",
    "green",
    "blue",
    "yellow",
    "circle",
    "square",
    "triangle",
    "cat",
    "dog",
    "yes",
    "no",
    "first",
    "second",
    "is",
    "the",
    "image",
    "does",
    "this",
    "show",
    "which",
]


def build_tiny_hf_clip(
    out_dir: str | Path,
    *,
    seed: int = 0,
    image_size: int = 32,
    hidden: int = 32,
    layers: int = 2,
    projection_dim: int = 16,
    patch_size: int = 8,
    logit_scale: float | None = None,
) -> Path:
    """Save a transformers ``CLIPModel`` + ``CLIPProcessor`` (word-level tokenizer) to ``out_dir``.

    Args:
        out_dir: Target directory (``from_pretrained``-loadable, like ``yuvalkirstain/PickScore_v1``).
        seed: Init seed.
        image_size: Vision input side; the processor resizes the shortest side to it and centre-crops.
        hidden: Width of both towers.
        layers: Layers of both towers.
        projection_dim: Joint embedding size.
        patch_size: ViT patch size.
        logit_scale: Override the initial logit scale (log temperature).

    Returns:
        ``out_dir`` as a Path.
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from mmalign.toy.tokenizer import build_word_tokenizer

    out_dir = Path(out_dir)
    tokenizer = build_word_tokenizer(TINY_WORDS, out_dir / "_tokenizer", model_max_length=16)
    n = len(tokenizer)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=n,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=n - 2,
            eos_token_id=n - 1,
            pad_token_id=n - 1,
        ),
        vision_config=dict(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=patch_size,
        ),
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    if logit_scale is not None:
        with torch.no_grad():
            model.logit_scale.fill_(logit_scale)
    model.save_pretrained(out_dir)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out_dir)
    return out_dir


def tiny_open_clip_config(
    image_size: int = 32, width: int = 32, embed_dim: int = 16, layers: int = 1
) -> dict:
    """An open_clip model config of the ViT-H-14 family (ViT image tower, transformer text tower), tiny."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {
            "image_size": image_size,
            "layers": layers,
            "width": width,
            "head_width": 16,
            "patch_size": 8,
        },
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": width, "heads": 2, "layers": layers},
    }


def build_tiny_open_clip(out_dir: str | Path, *, seed: int = 0, **config_kwargs) -> Path:
    """Save an open_clip model as ``open_clip_config.json`` + ``open_clip_pytorch_model.bin`` (hub layout).

    Load it with ``open_clip.create_model("local-dir:" + str(out_dir))`` (``hf-hub:org/repo`` reads the same
    two files).

    Returns:
        ``out_dir`` as a Path.
    """
    import open_clip

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = tiny_open_clip_config(**config_kwargs)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg)
    (out_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    torch.save(model.state_dict(), out_dir / "open_clip_pytorch_model.bin")
    return out_dir


def build_tiny_hps_checkpoint(path: str | Path, model_dir: str | Path, *, seed: int = 1) -> Path:
    """Write an HPS-style checkpoint ``{"state_dict": ...}`` for the open_clip model saved in ``model_dir``.

    The weights are a fresh init with ``seed``, so a test can tell them from the base weights.
    """
    import open_clip

    cfg = json.loads((Path(model_dir) / "open_clip_config.json").read_text())["model_cfg"]
    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict()}, path)
    return path


def build_tiny_aesthetic_head(path: str | Path, input_size: int, *, seed: int = 0) -> Path:
    """Write an aesthetic MLP state dict with ddpo-pytorch's key layout (``layers.N.weight``)."""
    from mmalign.rewards.clip import aesthetic_mlp

    torch.manual_seed(seed)
    head = aesthetic_mlp(input_size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({f"layers.{k}": v for k, v in head.state_dict().items()}, path)
    return path


TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() }}: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image> {% else %}{{ item['text'] }}"
    "{% endif %}{% endfor %}\n{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_tiny_vlm(out_dir: str | Path, *, seed: int = 0, image_size: int = 32, hidden: int = 32) -> Path:
    """Save a tiny LLaVA (CLIP vision tower + Llama decoder) with a word-level tokenizer and chat template.

    ``AutoModelForImageTextToText`` and ``AutoProcessor`` load it like ``llava-hf/llava-1.5-7b-hf``.

    Returns:
        ``out_dir`` as a Path.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    out_dir = Path(out_dir)
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    words = sorted(
        {w for w in TINY_WORDS}
        | {
            "Yes",
            "No",
            "First",
            "Second",
            "USER",
            "ASSISTANT",
            ":",
            "?",
            '"',
            ".",
            ",",
            "or",
            "please",
            "answer",
            "Please",
            "Answer",
            "Does",
        }
    )
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    patch = 8
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=patch,
        ),
        text_config=LlamaConfig(
            vocab_size=len(vocab),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=512,
            pad_token_id=vocab["<pad>"],
            bos_token_id=vocab["<s>"],
            eos_token_id=vocab["</s>"],
        ),
        image_token_index=vocab["<image>"],
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(out_dir)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        chat_template=TINY_CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(out_dir)
    return out_dir
