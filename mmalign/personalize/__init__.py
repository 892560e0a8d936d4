"""Personalisation (DESIGN §3): a user's few choices -> a user vector -> a user-conditioned denoiser / reward.

- :mod:`~mmalign.personalize.encoders`: the :class:`UserEncoder` protocol, the ``ENCODERS`` registry
  (``vlm``, ``pal``, ``mean_diff``) and the per-user embedding cache;
- :mod:`~mmalign.personalize.features`: frozen image/text features of a CLIP-family reward backbone;
- :mod:`~mmalign.personalize.pal`: PAL-B (prototype mixture) head, its training, few-shot fitting and reward;
- :mod:`~mmalign.personalize.vlm`: PPD's VLM profile encoder (transformers LLaVA-family);
- :mod:`~mmalign.personalize.attention`: the user path into the denoiser, on diffusers' IP-Adapter machinery.
"""

from mmalign.personalize.encoders import ENCODERS, Shot, UserEmbedding, UserEncoder, embed_users, get_encoder

__all__ = ["ENCODERS", "Shot", "UserEmbedding", "UserEncoder", "embed_users", "get_encoder"]
