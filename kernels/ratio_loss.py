"""The clipped-ratio policy loss of PPO / Flow-GRPO, with GRPO-Guard's RatioNorm and step reweighting.

Per sample i (all tensors (B,)):
  A_i        = clip(advantage_i, -adv_clip_max, adv_clip_max)
  log r_i    = log_prob_i - old_log_prob_i                      (plain PPO)
  log r_i    = ratio_scale_i * (log_prob_i - old_log_prob_i + ratio_bias_i)   (RatioNorm)
  loss_i     = max(-A_i r_i, -A_i clip(r_i, 1 - clip_lo, 1 + clip_hi))
  loss       = loss_weight * mean_i loss_i                      (loss_weight = 1/|dt| for Guard's reweight)
  clipfrac   = mean_i [r_i > 1 + clip_hi or r_i < 1 - clip_lo]
  approx_kl  = mean_i (log_prob_i - old_log_prob_i)^2 / 2

RatioNorm's bias is per sample (GRPO-Guard paper); the reference code reduces it over the whole batch
by accident (flow_grpo_algorithm.md section 7.1). This is the PyTorch reference that defines the
numbers; a fused Triton version must match it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from kernels.sde_logprob import accumulate


class ClippedLoss(NamedTuple):
    loss: torch.Tensor  # scalar, differentiable in log_prob (and ratio_bias)
    ratio: torch.Tensor  # (B,) detached
    clipfrac: torch.Tensor  # scalar
    clipfrac_gt_one: torch.Tensor  # scalar: ratio above 1 + clip_hi
    clipfrac_lt_one: torch.Tensor  # scalar: ratio below 1 - clip_lo
    approx_kl: torch.Tensor  # scalar


def clipped_ratio_loss_reference(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_lo: float,
    clip_hi: float,
    adv_clip_max: float,
    ratio_scale: torch.Tensor | None = None,
    ratio_bias: torch.Tensor | None = None,
    loss_weight: float = 1.0,
) -> ClippedLoss:
    if (ratio_scale is None) != (ratio_bias is None):
        raise ValueError("RatioNorm needs both ratio_scale and ratio_bias (or neither)")
    adv = accumulate(advantages).clamp(-adv_clip_max, adv_clip_max)
    diff = accumulate(log_prob) - accumulate(old_log_prob)
    log_ratio = diff if ratio_scale is None else ratio_scale * (diff + ratio_bias)
    ratio = log_ratio.exp()
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_lo, 1.0 + clip_hi)
    loss = loss_weight * torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        above = (ratio > 1.0 + clip_hi).float()
        below = (ratio < 1.0 - clip_lo).float()
        return ClippedLoss(
            loss,
            ratio.detach(),
            (above + below).mean(),
            above.mean(),
            below.mean(),
            0.5 * diff.square().mean(),
        )
