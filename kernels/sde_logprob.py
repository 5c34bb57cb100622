"""Log-probability of one stochastic denoising step, and the per-sample terms computed in the same pass.

A step of every sampler in rl/sde.py is affine in the velocity: mean = coef_x * x + coef_v * v, with
per-sample coefficients (B,). Given the next latent x_next, one pass over (v, x, x_next) yields the
per-sample mean squared distance to the mean; the log-prob, the KL to a reference policy's mean and
GRPO-Guard's ratio bias are cheap per-sample functions of such distances. This file is the PyTorch
reference that defines the numbers; a fused Triton version must match it.

Log-prob kinds:
  "gaussian": mean over elements of log N(x_next; mean, std^2), i.e. -msd / (2 std^2) - log std - log sqrt(2 pi)
              (the Flow-GRPO "sde" step; the per-element mean, not the sum, as the reference does)
  "squared":  -msd, with constants and the variance dropped (the CPS step, as the reference does)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
LOG_PROB_KINDS = ("gaussian", "squared")


class StepLogProb(NamedTuple):
    log_prob: torch.Tensor  # (B,) fp32
    mean: torch.Tensor | None  # (B, ...) fp32, when return_mean
    kl: torch.Tensor | None  # (B,) mean((mean - ref_mean)^2) / (2 kl_std^2), when v_ref is given
    ratio_bias: torch.Tensor | None  # (B,) mean((mean - mean_old)^2) / (2 std^2), when mean_old is given


def per_sample(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) so it broadcasts over one sample's elements."""
    return coef.view(-1, *([1] * (like.dim() - 1)))


def accumulate(t: torch.Tensor) -> torch.Tensor:
    """Half types are read as fp32 (bf16 overflows in the step mean, as the reference notes); fp64 stays."""
    return t if t.dtype == torch.float64 else t.float()


def step_mean(v: torch.Tensor, x: torch.Tensor, coef_x: torch.Tensor, coef_v: torch.Tensor) -> torch.Tensor:
    return accumulate(x) * per_sample(coef_x, x) + accumulate(v) * per_sample(coef_v, v)


def _mean_sq(a: torch.Tensor) -> torch.Tensor:
    return a.square().flatten(1).mean(dim=1)


def sde_log_prob_reference(
    v: torch.Tensor,
    x: torch.Tensor,
    x_next: torch.Tensor,
    coef_x: torch.Tensor,
    coef_v: torch.Tensor,
    std: torch.Tensor,
    kind: str,
    v_ref: torch.Tensor | None = None,
    kl_std: torch.Tensor | None = None,
    mean_old: torch.Tensor | None = None,
    return_mean: bool = False,
) -> StepLogProb:
    """Per-sample log-prob of x_next under N(coef_x x + coef_v v, std^2), differentiable in v (and x).

    v, x, x_next (and v_ref, mean_old) are (B, ...) in any float dtype and are read as fp32 (fp64 stays
    fp64); coef_x, coef_v, std and kl_std are (B,). x_next and mean_old are treated as constants.
    """
    if kind not in LOG_PROB_KINDS:
        raise ValueError(f"log-prob kind {kind!r} is not one of {LOG_PROB_KINDS}")
    mean = step_mean(v, x, coef_x, coef_v)
    msd = _mean_sq(accumulate(x_next.detach()) - mean)
    if kind == "gaussian":
        log_prob = -msd / (2 * std.square()) - std.log() - HALF_LOG_2PI
    else:
        log_prob = -msd
    kl = None
    if v_ref is not None:
        if kl_std is None:
            raise ValueError("kl_std is required with v_ref")
        kl = _mean_sq(mean - step_mean(v_ref.detach(), x, coef_x, coef_v)) / (2 * kl_std.square())
    ratio_bias = None
    if mean_old is not None:
        ratio_bias = _mean_sq(mean - accumulate(mean_old.detach())) / (2 * std.square())
    return StepLogProb(log_prob, mean if return_mean else None, kl, ratio_bias)
