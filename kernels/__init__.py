"""Fused kernels for the RL hot path. Each op has a PyTorch reference that defines its numbers, a Triton
version tested against it, and a dispatching entry point (Triton on CUDA tensors, the reference elsewhere)."""

from kernels.dispatch import BACKENDS, clipped_ratio_loss, get_backend, sde_log_prob, set_backend
from kernels.ratio_loss import ClippedLoss, clipped_ratio_loss_reference
from kernels.sde_logprob import StepLogProb, sde_log_prob_reference, step_mean

__all__ = [
    "BACKENDS",
    "ClippedLoss",
    "StepLogProb",
    "clipped_ratio_loss",
    "clipped_ratio_loss_reference",
    "get_backend",
    "sde_log_prob",
    "sde_log_prob_reference",
    "set_backend",
    "step_mean",
]
