"""CLIP-family reward models: CLIP score, PickScore, HPSv2/2.1 and the LAION aesthetic predictor.

Every factory loads from a hub id or a local path (the same code path), imports its heavy dependency
inside, freezes the model (``requires_grad_(False)``, no ``no_grad``: gradients reach the input pixels)
and preprocesses on tensors (:mod:`mmalign.rewards.preprocess`). Videos [B,T,3,H,W] are scored frame by
frame and averaged over T.

Formulas (reference/rewards_peers.md §1):

- CLIP score: ``scale * max(cos(img, txt), 0)``; scale 100 as torchmetrics (Hessel et al. use 2.5).
- PickScore: ``exp(logit_scale) * cos(img, txt)`` (yuvalkirstain/PickScore README), about 18-23.
- HPSv2/2.1: raw ``cos(img, txt)`` of the fine-tuned open_clip ViT-H-14 (tgxs002/HPSv2 img_score.py),
  letterbox preprocessing (longest side + zero pad).
- Aesthetic: MLP(L2-normalised CLIP ViT-L/14 image embedding) (improved-aesthetic-predictor
  simple_inference.py), about 4.5-7 on 1-10 ratings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mmalign.rewards.preprocess import (
    ImageTransform,
    as_tensor,
    transform_from_hf_processor,
    transform_from_open_clip,
    video_to_frames,
)

HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


def _default_device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _require(module: str, extra: str = "") -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        hint = f"pip install 'mmalign[{extra}]'" if extra else f"pip install {module}"
        raise ImportError(f"this reward needs the `{module}` package: {hint}")


@dataclass
class ClipSimilarityReward:
    """``scale * cos(image, text)`` for any dual encoder; the object behind clip_score, pickscore and hpsv2.

    Attributes:
        encode_image: Normalised pixels [N,3,S,S] -> embeddings [N,D].
        encode_text: Prompts (list of N str) -> embeddings [N,D].
        transform: Tensor preprocessing for this model.
        scale: Multiplier of the cosine (PickScore: exp(logit_scale)).
        clamp_negative: Clamp cosines below 0 to 0 (CLIPScore convention; zero gradient there).
        device: Where the model lives; media are moved there.
        dtype: Compute dtype of the model.
    """

    encode_image: Callable[[torch.Tensor], torch.Tensor]
    encode_text: Callable[[list[str]], torch.Tensor]
    transform: ImageTransform
    scale: float = 1.0
    clamp_negative: bool = False
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32

    def __call__(self, media: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Score media against prompts.

        Args:
            media: [B,3,H,W] images or [B,T,3,H,W] videos, float in [0, 1].
            prompts: B prompts.

        Returns:
            [B] float32 scores (mean over frames for videos).
        """
        frames, t = video_to_frames(media)
        b = frames.shape[0] // t
        if len(prompts) != b:
            raise ValueError(f"got {b} media but {len(prompts)} prompts")
        x = self.transform(frames.to(self.device, self.dtype))
        img = F.normalize(self.encode_image(x).float(), dim=-1)
        unique = list(dict.fromkeys(prompts))  # encode each distinct prompt once
        txt = F.normalize(self.encode_text(unique).float(), dim=-1)
        index = torch.tensor([unique.index(p) for p in prompts], device=txt.device)
        txt = txt[index].repeat_interleave(t, dim=0)
        cos = (img * txt).sum(-1)
        if self.clamp_negative:
            cos = cos.clamp_min(0.0)
        return (self.scale * cos).view(b, t).mean(1)


def _load_hf_clip(
    model_id: str, processor_id: str | None, device: torch.device, dtype: torch.dtype, **load_kwargs
):
    _require("transformers")
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(model_id, **load_kwargs).to(device, dtype).eval().requires_grad_(False)
    processor = AutoProcessor.from_pretrained(processor_id or model_id, **load_kwargs)
    tokenizer = processor.tokenizer
    max_len = int(getattr(model.config.text_config, "max_position_embeddings", 77))

    def encode_text(prompts: list[str]) -> torch.Tensor:
        tok = tokenizer(list(prompts), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        return as_tensor(model.get_text_features(**{k: v.to(device) for k, v in tok.items()}))

    def encode_image(pixels: torch.Tensor) -> torch.Tensor:
        return as_tensor(model.get_image_features(pixel_values=pixels))

    return model, processor, encode_image, encode_text


def _load_open_clip(model_name: str, pretrained: str | None, device: torch.device, dtype: torch.dtype):
    _require("open_clip", "")
    import open_clip

    model = open_clip.create_model(model_name, pretrained=pretrained, device=device)
    model = model.to(dtype).eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(model_name)
    return model, tokenizer


def _open_clip_encoders(model, tokenizer, device: torch.device):
    def encode_text(prompts: list[str]) -> torch.Tensor:
        return model.encode_text(tokenizer(list(prompts)).to(device))

    return model.encode_image, encode_text


def clip_score(
    model: str = "openai/clip-vit-large-patch14",
    *,
    backend: str = "transformers",
    pretrained: str | None = None,
    processor: str | None = None,
    scale: float = 100.0,
    clamp_negative: bool = True,
    prefix: str = "",
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Callable[[torch.Tensor, Sequence[str]], torch.Tensor]:
    """CLIP score ``scale * max(cos, 0)`` (torchmetrics convention: scale 100; Hessel: 2.5, prefix "A photo depicts").

    Args:
        model: transformers hub id / directory, or an open_clip model name (``ViT-L-14``,
            ``hf-hub:org/repo``, ``local-dir:/path``).
        backend: ``transformers`` or ``open_clip``.
        pretrained: open_clip pretrained tag or checkpoint file (ignored by transformers).
        processor: transformers processor id if it differs from ``model``.
        scale: Cosine multiplier.
        clamp_negative: Clamp negative cosines to 0.
        prefix: Text prepended to every prompt (Hessel: "A photo depicts ").
        device: Device for the model (default cuda if available).
        dtype: Model dtype.

    Returns:
        A reward ``(media [B,3,H,W] | [B,T,3,H,W], prompts) -> [B]``.
    """
    dev = _default_device(device)
    if backend == "transformers":
        _, proc, enc_img, enc_txt = _load_hf_clip(model, processor, dev, dtype)
        tf = transform_from_hf_processor(proc.image_processor)
    elif backend == "open_clip":
        oc_model, tokenizer = _load_open_clip(model, pretrained, dev, dtype)
        enc_img, enc_txt = _open_clip_encoders(oc_model, tokenizer, dev)
        tf = transform_from_open_clip(oc_model)
    else:
        raise ValueError(f"backend={backend!r}: use transformers or open_clip")
    if prefix:
        base_txt = enc_txt

        def enc_txt(prompts: list[str]) -> torch.Tensor:
            return base_txt([prefix + p for p in prompts])

    return ClipSimilarityReward(enc_img, enc_txt, tf, scale, clamp_negative, dev, dtype)


def pickscore(
    model: str = "yuvalkirstain/PickScore_v1",
    *,
    processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> ClipSimilarityReward:
    """PickScore: ``exp(logit_scale) * cos(img, txt)``; CLIP processor (shortest side 224 + centre crop).

    Args:
        model: Hub id or directory of the PickScore CLIPModel.
        processor: Hub id or directory of its processor (the laion ViT-H-14 one by default). Pass the same
            directory as ``model`` for a local copy holding both.
        device: Device (default cuda if available).
        dtype: Model dtype.
    """
    dev = _default_device(device)
    hf_model, proc, enc_img, enc_txt = _load_hf_clip(model, processor, dev, dtype)
    temperature = float(hf_model.logit_scale.detach().float().exp())
    return ClipSimilarityReward(
        enc_img, enc_txt, transform_from_hf_processor(proc.image_processor), temperature, False, dev, dtype
    )


def _resolve_file(source: str, filename: str) -> Path:
    """A local file, a file inside a local directory, or ``filename`` downloaded from hub repo ``source``."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if not (path / filename).is_file():
            raise FileNotFoundError(f"{path} has no {filename}")
        return path / filename
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(source, filename))


def hpsv2(
    checkpoint: str = "xswu/HPSv2",
    *,
    version: str = "v2.1",
    model: str = "ViT-H-14",
    pretrained: str | None = None,
    scale: float = 1.0,
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> ClipSimilarityReward:
    """HPSv2 / HPSv2.1: cosine of a fine-tuned open_clip ViT-H-14, letterbox preprocessing.

    The HPS checkpoint (``{"state_dict": ...}``) is loaded strictly over ``model``, so extra or missing keys
    fail loudly. v2.0 and v2.1 scores are not comparable (≈0.24-0.29 vs ≈0.14-0.33).

    Args:
        checkpoint: Hub repo id (``xswu/HPSv2``), a directory holding the HPS file, or the ``.pt`` file.
        version: ``v2.0`` or ``v2.1``: picks the file inside a repo or directory.
        model: open_clip architecture (``ViT-H-14``, or ``local-dir:``/``hf-hub:`` for a config).
        pretrained: Base weights to load before the HPS state dict (not needed: HPS is a full fine-tune).
        scale: Multiplier of the cosine (benchmarks report x100).
        device: Device (default cuda if available).
        dtype: Model dtype.
    """
    if version not in HPS_FILES:
        raise ValueError(f"version={version!r}: use one of {sorted(HPS_FILES)}")
    dev = _default_device(device)
    oc_model, tokenizer = _load_open_clip(model, pretrained, torch.device("cpu"), torch.float32)
    state = torch.load(_resolve_file(checkpoint, HPS_FILES[version]), map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    oc_model.load_state_dict(state, strict=True)
    oc_model = oc_model.to(dev, dtype).eval().requires_grad_(False)
    enc_img, enc_txt = _open_clip_encoders(oc_model, tokenizer, dev)
    return ClipSimilarityReward(
        enc_img, enc_txt, transform_from_open_clip(oc_model, resize_mode="longest"), scale, False, dev, dtype
    )


def hpsv21(checkpoint: str = "xswu/HPSv2", **kwargs) -> ClipSimilarityReward:
    """HPSv2.1 (:func:`hpsv2` with ``version="v2.1"``)."""
    return hpsv2(checkpoint, version="v2.1", **kwargs)


def aesthetic_mlp(input_size: int = 768) -> nn.Sequential:
    """The improved-aesthetic-predictor head: linear layers 768-1024-128-64-16-1 with dropout, no nonlinearity.

    State-dict keys ``layers.0/2/4/6/7`` match ``sac+logos+ava1-l14-linearMSE.pth`` once prefixed by
    ``layers.`` (see :func:`aesthetic`).
    """
    return nn.Sequential(
        nn.Linear(input_size, 1024),
        nn.Dropout(0.2),
        nn.Linear(1024, 128),
        nn.Dropout(0.2),
        nn.Linear(128, 64),
        nn.Dropout(0.1),
        nn.Linear(64, 16),
        nn.Linear(16, 1),
    )


@dataclass
class AestheticReward:
    """LAION aesthetic v2: ``head(img_emb / ||img_emb||)``.

    Attributes:
        encode_image: Normalised pixels [N,3,S,S] -> CLIP image embeddings [N,D].
        head: The MLP, [N,D] -> [N,1].
        transform: Tensor preprocessing.
        device: Model device.
        dtype: Model dtype.
    """

    encode_image: Callable[[torch.Tensor], torch.Tensor]
    head: nn.Module
    transform: ImageTransform
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32

    def __call__(self, media: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        """Score media (prompts are ignored: the predictor is image-only).

        Args:
            media: [B,3,H,W] or [B,T,3,H,W] in [0, 1].
            prompts: Unused.

        Returns:
            [B] predicted rating (mean over frames for videos).
        """
        frames, t = video_to_frames(media)
        emb = self.encode_image(self.transform(frames.to(self.device, self.dtype))).float()
        emb = emb / emb.norm(dim=-1, keepdim=True)
        return self.head(emb).squeeze(-1).view(-1, t).mean(1)


def aesthetic(
    clip_model: str = "openai/clip-vit-large-patch14",
    *,
    head: str = "trl-lib/ddpo-aesthetic-predictor",
    head_filename: str = "aesthetic-model.pth",
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> AestheticReward:
    """LAION aesthetic predictor v2 on a transformers CLIP image tower.

    Args:
        clip_model: Hub id or directory of the CLIP model (ViT-L/14 for the released head).
        head: Hub repo, directory or ``.pth`` file of the MLP state dict (keys ``layers.N.*`` or ``N.*``).
        head_filename: File name inside a repo or directory.
        device: Device (default cuda if available).
        dtype: Model dtype.
    """
    _require("transformers")
    from transformers import AutoImageProcessor, AutoModel

    dev = _default_device(device)
    model = AutoModel.from_pretrained(clip_model).to(dev, dtype).eval().requires_grad_(False)
    tf = transform_from_hf_processor(AutoImageProcessor.from_pretrained(clip_model))
    state = torch.load(_resolve_file(head, head_filename), map_location="cpu", weights_only=True)
    state = {k.removeprefix("layers."): v for k, v in state.items()}
    mlp = aesthetic_mlp(state["0.weight"].shape[1])
    mlp.load_state_dict(state, strict=True)
    mlp = mlp.to(dev).eval().requires_grad_(False)

    def encode_image(pixels: torch.Tensor) -> torch.Tensor:
        return as_tensor(model.get_image_features(pixel_values=pixels))

    return AestheticReward(encode_image, mlp, tf, dev, dtype)
