"""Fused kernels for the RL hot path. Each op has a PyTorch reference that defines its numbers."""

from kernels.ratio_loss import ClippedLoss, clipped_ratio_loss_reference
from kernels.sde_logprob import StepLogProb, sde_log_prob_reference, step_mean

sde_log_prob = sde_log_prob_reference
clipped_ratio_loss = clipped_ratio_loss_reference

__all__ = [
    "ClippedLoss",
    "StepLogProb",
    "clipped_ratio_loss",
    "sde_log_prob",
    "step_mean",
]
