"""PPD's user encoder (Dang et al. 2025, arXiv 2501.06655; ``llava_embeddings/pick_a_pick_user_emb.py``).

A local vision-language model (LLaVA / LLaVA-OneVision families through ``AutoModelForImageTextToText`` +
``AutoProcessor``) reads the user's N shots: a preface, then per pair its index, caption and two images tagged
"preferred" / "dispreferred", then chain-of-thought instructions (describe each image, state the differences,
summarise a user profile). It decodes greedily (PPD: up to 1024 tokens); the user vector is the hidden state
of the **last generated token** at ``layer`` (default -1, the final layer, as the released code uses), read by
one forward pass over prompt + answer. The generated profile text is kept for people to read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmalign.personalize.encoders import Shot, UserEmbedding, check_shots

PREFACE = (
    "You will see pairs of images a user chose between. For each pair you get the caption the images "
    "were made for, the image the user preferred and the image the user did not prefer."
)
INSTRUCTIONS = (
    "First describe each image: its style, quality and aesthetics. Then state the differences between "
    "the preferred and the dispreferred image of each pair. Finally summarise the user's preferences as "
    "a User Profile."
)


def profile_messages(shots: Sequence[Shot]) -> list[dict[str, Any]]:
    """The chat messages of PPD's prompt; images appear in the order preferred, dispreferred per pair."""
    content: list[dict[str, str]] = [{"type": "text", "text": PREFACE}]
    for i, shot in enumerate(shots, start=1):
        content += [
            {"type": "text", "text": f" Pair {i}. Caption: {shot.prompt}. Preferred:"},
            {"type": "image"},
            {"type": "text", "text": " Dispreferred:"},
            {"type": "image"},
        ]
    content.append({"type": "text", "text": " " + INSTRUCTIONS})
    return [{"role": "user", "content": content}]


def _to_pil(image: torch.Tensor):
    from PIL import Image

    arr = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr, "RGB")


@dataclass
class VLMEncoder:
    """User encoder ``vlm``: greedy profile generation, last generated token's hidden state at ``layer``."""

    model: Any
    processor: Any
    model_id: str
    layer: int = -1
    max_new_tokens: int = 1024
    device: torch.device = torch.device("cpu")
    name: str = "vlm"

    def fingerprint(self) -> dict[str, Any]:
        path = Path(self.model_id)
        stamp = (
            max((p.stat().st_mtime_ns for p in path.glob("*.safetensors")), default=None)
            if path.is_dir()
            else None
        )
        return {
            "encoder": self.name,
            "model": str(path.resolve()) if path.is_dir() else self.model_id,
            "weights_mtime": stamp,
            "layer": self.layer,
            "max_new_tokens": self.max_new_tokens,
            "prompt": [PREFACE, INSTRUCTIONS],
        }

    @torch.no_grad()
    def encode(self, shots: Sequence[Shot]) -> UserEmbedding:
        check_shots(shots)
        prompt = self.processor.apply_chat_template(
            profile_messages(shots), add_generation_prompt=True, tokenize=False
        )
        images = [_to_pil(im) for s in shots for im in (s.preferred, s.dispreferred)]
        inputs = self.processor(images=images, text=prompt, return_tensors="pt").to(self.device)
        out = self.model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=self.max_new_tokens)
        new_tokens = out[:, inputs["input_ids"].shape[1] :]
        full = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        hidden = self.model(
            input_ids=out, attention_mask=torch.ones_like(out), output_hidden_states=True, **full
        ).hidden_states
        if not -len(hidden) <= self.layer < len(hidden):
            raise ValueError(
                f"layer={self.layer}: the model has {len(hidden)} hidden-state layers (0 = embeddings)"
            )
        vector = hidden[self.layer][0, -1].float().cpu()
        profile = self.processor.batch_decode(new_tokens, skip_special_tokens=True)[0].strip()
        return UserEmbedding(vector, profile)


def vlm_encoder(
    model: str, layer: int = -1, max_new_tokens: int = 1024, device: str | None = None, dtype: str = "float32"
) -> VLMEncoder:
    """The ``vlm`` encoder on a local or hub LLaVA-family model (e.g. ``llava-hf/llava-onevision-qwen2-7b-ov-chat-hf``)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    vlm = AutoModelForImageTextToText.from_pretrained(model, dtype=getattr(torch, dtype)).to(dev).eval()
    return VLMEncoder(vlm, AutoProcessor.from_pretrained(model), model, layer, max_new_tokens, dev)
