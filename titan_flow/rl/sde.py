"""One denoising step as a policy: the ODE (Euler), the Flow-GRPO SDE, CPS, and flow_grpo's Wan SDE.

Every step is affine in the velocity, mean = coef_x * x + coef_v * v, plus Gaussian noise of
per-element std `std`. This file derives the per-sample coefficients from the sigmas and the noise
level (flow_grpo_algorithm.md section 2; edit_and_video.md section 4.7 for "wan") and samples; the
log-prob and the KL / RatioNorm terms come from the fused op in kernels/, whose PyTorch reference
defines the numbers.

The three stochastic steps, with dt = sigma_{i+1} - sigma_i < 0 and a = the noise level:
  "sde"  sigma_sde = a sqrt(sigma / (1 - sigma)); Euler-Maruyama of the reverse SDE; Gaussian log-prob;
         the KL divides by sigma_sde^2 (no |dt|), as the reference's image scripts do.
  "cps"  coefficients-preserving sampling; log-prob = -mean squared distance (the reference's).
  "wan"  sigma_sde = a sigma_1 sigma (sigma_1 = the schedule's second sigma; flow_grpo's Wan script has
         no noise level, i.e. a = 1 is it exactly); the same drift as "sde"; Gaussian log-prob; the KL
         divides by the step's per-element variance (sigma_sde^2 |dt|), the exact Gaussian KL.

Rollout and training both call `sde_step`; training passes the stored next latent as `prev_sample`,
so on-policy the same velocity gives the same log-prob bit for bit.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

import kernels
from kernels.sde_logprob import accumulate, per_sample

SDE_TYPES = ("sde", "cps", "wan")
LOG_PROB_KINDS = {"sde": "gaussian", "cps": "squared", "wan": "gaussian"}


class StepCoefficients(NamedTuple):
    coef_x: torch.Tensor  # (B,)
    coef_v: torch.Tensor  # (B,)
    std: torch.Tensor  # (B,) per-element noise std of the step
    kl_std: torch.Tensor  # (B,) the std the reference's KL term divides by (sigma_sde for "sde", std otherwise)


class StepOutput(NamedTuple):
    prev_sample: torch.Tensor  # x_{i+1}, fp32
    log_prob: torch.Tensor | None  # (B,) None for deterministic steps
    mean: torch.Tensor | None  # (B, ...) the step mean, when asked for
    std: torch.Tensor  # (B,)
    kl: torch.Tensor | None  # (B,) KL term to the reference velocity, when given
    ratio_bias: torch.Tensor | None  # (B,) GRPO-Guard's RatioNorm bias, when mean_old is given


def step_coefficients(
    sigma: torch.Tensor, sigma_next: torch.Tensor, noise_level: float, sde_type: str, sigma_max: torch.Tensor | float
) -> StepCoefficients:
    """Per-sample coefficients of the step from sigma_i to sigma_{i+1} (both (B,); computed in fp32 or fp64).

    `sigma_max` is the schedule's second sigma: the "sde" noise coefficient divides by 1 - sigma,
    which is 0 at sigma = 1, so there the reference uses 1 - sigma_max instead; the "wan" noise is
    proportional to it.
    """
    if sde_type not in SDE_TYPES:
        raise ValueError(f"sampling.sde_type: {sde_type!r} is not one of {SDE_TYPES}")
    sigma, sigma_next = accumulate(sigma), accumulate(sigma_next)
    sigma_max = torch.as_tensor(sigma_max, dtype=sigma.dtype, device=sigma.device)
    dt = sigma_next - sigma  # negative
    if sde_type in ("sde", "wan"):
        if sde_type == "sde":
            sigma_sde = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level
        else:
            sigma_sde = sigma_max * sigma * noise_level
        coef_x = 1 + sigma_sde**2 / (2 * sigma) * dt
        coef_v = (1 + sigma_sde**2 * (1 - sigma) / (2 * sigma)) * dt
        std = sigma_sde * torch.sqrt(-dt)
        return StepCoefficients(coef_x, coef_v, std, sigma_sde if sde_type == "sde" else std)
    std = sigma_next * math.sin(noise_level * math.pi / 2)
    direction = torch.sqrt(sigma_next**2 - std**2)  # weight of the predicted noise x_1
    coef_x = (1 - sigma_next) + direction
    coef_v = -(1 - sigma_next) * sigma + direction * (1 - sigma)
    return StepCoefficients(coef_x, coef_v, std, std)


def sde_step(
    v: torch.Tensor,
    x: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    noise_level: float,
    sde_type: str,
    generator: torch.Generator | None = None,
    prev_sample: torch.Tensor | None = None,
    sigma_fallback: torch.Tensor | float = 0.0,
    v_ref: torch.Tensor | None = None,
    mean_old: torch.Tensor | None = None,
    return_mean: bool = False,
) -> StepOutput:
    """Take (rollout: sample `prev_sample`) or re-score (training: `prev_sample` given) one step.

    With noise_level 0 the step is the deterministic Euler step x + dt * v and has no log-prob
    (the reference computes NaN/inf there and discards it).
    """
    c = step_coefficients(sigma, sigma_next, noise_level, sde_type, sigma_fallback)
    if noise_level == 0:
        if v_ref is not None or mean_old is not None:
            raise ValueError("a deterministic step (noise level 0) has no log-prob, KL or ratio bias")
        mean = kernels.step_mean(v, x, c.coef_x, c.coef_v)
        return StepOutput(mean if prev_sample is None else prev_sample.float(), None, mean, c.std, None, None)
    if prev_sample is None:
        with torch.no_grad():
            mean = kernels.step_mean(v, x, c.coef_x, c.coef_v)
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
            prev_sample = mean + per_sample(c.std, mean) * noise
    out = kernels.sde_log_prob(
        v, x, prev_sample, c.coef_x, c.coef_v, c.std, LOG_PROB_KINDS[sde_type],
        v_ref=v_ref, kl_std=c.kl_std if v_ref is not None else None, mean_old=mean_old, return_mean=return_mean,
    )
    return StepOutput(prev_sample.float(), out.log_prob, out.mean, c.std, out.kl, out.ratio_bias)
