"""DenseDPO loss (Wu et al. 2025, arXiv 2506.03517) and whole-clip video DPO, as pure tensor maths."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmalign.losses.diffusion_dpo import preference_metrics


def _oriented(
    label: torch.Tensor, err_0: torch.Tensor, err_1: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(preferred, dispreferred) errors: label +1 -> video 0 preferred, -1 -> video 1."""
    first = label > 0
    return torch.where(first, err_0, err_1), torch.where(first, err_1, err_0)


def dense_dpo_loss(
    model_err_0: torch.Tensor,
    model_err_1: torch.Tensor,
    ref_err_0: torch.Tensor,
    ref_err_1: torch.Tensor,
    labels: torch.Tensor,
    *,
    beta: float = 500.0,
    sft_weight: float | torch.Tensor = 0.0,
    sft_ties: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DenseDPO: a DPO logit per latent frame, tie frames masked.

    Conventions (DESIGN §2/§3; the paper's App. E pseudo-code)::

        dtheta_v,f = model_err_v,f - ref_err_v,f          # per latent frame, errors averaged over C,H,W
        z_f        = -(beta / 2) * l_f * (dtheta_0,f - dtheta_1,f)
        loss       = mean over frames with l_f != 0 of -log sigmoid(z_f)   (over the whole batch)
        loss      += sft_weight * mean over every frame of model_err of the preferred video at f
                     (both videos' mean at a tie; sft_ties=False: over the non-tie frames only)

    ``l_f`` is +1 where video 0 is preferred, -1 where video 1 is, 0 for a tie (masked). ``beta`` is the
    paper's beta (500, constant); the 0.5 factor is the same as Diffusion-DPO's, so beta here has the
    meaning of mmalign's Diffusion-DPO beta (z = -(beta/2)(dtheta_w - dtheta_l)). Eq. 7 of the paper sums
    the frames inside one sigmoid; the pseudo-code (implemented here) averages per-frame log-sigmoids over
    the non-tie frames. No public official code exists; the community Wan port
    (seruva19/takenoko ``densedpo_training_core.py``) averages inside segments and keeps ties, so it differs.

    Args:
        model_err_0, model_err_1: [B,T] policy errors of video 0 / video 1 per latent frame (with grad).
        ref_err_0, ref_err_1: [B,T] reference errors (no grad).
        labels: [B,T] in {+1, 0, -1}.
        beta: KL strength (paper: 500).
        sft_weight: lambda of the added preferred-frame error term (0, the paper, disables), the per-frame
            form of Diffusion-DPO's ``sft_weight``: it pulls the policy toward the preferred segments
            themselves, not only away from the dispreferred ones. A [B] tensor gives each clip its own lambda.
        sft_ties: the SFT term covers every frame, a tie frame with the mean error of both clips (equally
            good there), as the mean over all frames of the batch (the default: on the toy bench it kept more
            colour and more of DenseDPO's lead over whole-clip DPO); False: only the non-tie frames.

    Returns:
        per-clip loss [B], each clip's share of the batch's frame mean (``loss.mean()`` is the mean above; 0,
        still attached to the graph, when every frame is a tie), and metrics: those of
        :func:`~mmalign.losses.diffusion_dpo.preference_metrics` over the non-tie frames with "w"/"l" the
        preferred/dispreferred video of each frame, plus ``non_tie_frac``.
    """
    if labels.shape != model_err_0.shape:
        raise ValueError(
            f"labels {tuple(labels.shape)} must match the per-frame errors {tuple(model_err_0.shape)} ([B,T])"
        )
    labels = labels.to(model_err_0.dtype)
    z = -(beta / 2.0) * labels * ((model_err_0 - ref_err_0) - (model_err_1 - ref_err_1))
    keep = labels != 0
    n = keep.sum()
    # each clip's share of the batch's frame mean: loss.mean() = sum over non-tie frames / their count
    share = labels.shape[0] / n.clamp(min=1)
    loss = (-F.logsigmoid(z) * keep).sum(dim=1) * share
    if torch.is_tensor(sft_weight) or sft_weight != 0:
        preferred_err, _ = _oriented(labels, model_err_0, model_err_1)
        lam = sft_weight[:, None] if torch.is_tensor(sft_weight) else sft_weight
        if sft_ties:  # every frame: the preferred clip's error, or both clips' mean at a tie
            loss = loss + (lam * torch.where(keep, preferred_err, (model_err_0 + model_err_1) / 2)).mean(
                dim=1
            )
        else:
            loss = loss + (lam * preferred_err * keep).sum(dim=1) * share
    with torch.no_grad():
        lab = labels[keep]
        m_w, m_l = _oriented(lab, model_err_0[keep], model_err_1[keep])
        r_w, r_l = _oriented(lab, ref_err_0[keep], ref_err_1[keep])
        metrics = (
            preference_metrics(z[keep], m_w, m_l, r_w, r_l)
            if n > 0
            else {k: torch.zeros((), device=z.device) for k in preference_metrics(z[:0], *([z[:0]] * 4))}
        )
        metrics["non_tie_frac"] = keep.float().mean()
    return loss, metrics


def video_dpo_loss(
    model_err_0: torch.Tensor,
    model_err_1: torch.Tensor,
    ref_err_0: torch.Tensor,
    ref_err_1: torch.Tensor,
    labels: torch.Tensor,
    *,
    beta: float = 500.0,
    sft_weight: float | torch.Tensor = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Vanilla (whole-clip) video DPO, the comparison of the DenseDPO paper; tie clips masked.

    Errors may be per frame [B,T] (averaged here over T: with equal C,H,W per frame this is the mean over
    all of C,T,H,W) or per clip [B]. With l in {+1, 0, -1} per clip (+1: video 0 preferred)::

        z = -(beta / 2) * l * (dtheta_0 - dtheta_1),   loss = mean over non-tie clips of -log sigmoid(z)

    The same beta convention as :func:`dense_dpo_loss` and Diffusion-DPO (VideoDPO / Flow-DPO form).

    Args:
        model_err_0, model_err_1, ref_err_0, ref_err_1: [B,T] or [B] errors.
        labels: [B] in {+1, 0, -1}.
        beta: KL strength.
        sft_weight: lambda of the added preferred-clip error term (0 disables); a [B] tensor: one per clip.
    """
    errs = [e.mean(dim=1) if e.ndim == 2 else e for e in (model_err_0, model_err_1, ref_err_0, ref_err_1)]
    return dense_dpo_loss(
        *(e[:, None] for e in errs), labels.reshape(-1, 1), beta=beta, sft_weight=sft_weight
    )
