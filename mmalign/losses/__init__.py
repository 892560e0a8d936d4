"""Pure tensor losses, one file per method (no models, configs or I/O)."""

from mmalign.losses.dense_dpo import dense_dpo_loss, video_dpo_loss
from mmalign.losses.diffusion_dpo import diffusion_dpo_loss, f_divergence_reward, preference_metrics
from mmalign.losses.inversion_dpo import implied_noise, trajectory_dpo_loss, trajectory_weights
from mmalign.losses.self_npo import pseudo_huber, renoise, self_npo_loss

__all__ = [
    "diffusion_dpo_loss",
    "f_divergence_reward",
    "preference_metrics",
    "pseudo_huber",
    "renoise",
    "self_npo_loss",
]
__all__ += ["dense_dpo_loss", "video_dpo_loss"]
__all__ += ["implied_noise", "trajectory_dpo_loss", "trajectory_weights"]
