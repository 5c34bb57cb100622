"""Sigma schedules: the (T+1,) float32 noise levels a sampler walks from 1 down to 0.

Every function returns T denoising steps as T+1 sigmas ending in an exact 0. The SD3 schedule is
computed the way diffusers' `FlowMatchEulerDiscreteScheduler.set_timesteps` computes it, so the
sigmas (and the timesteps 1000*sigma the SD3 backbone sees) are bitwise those of the published
pipelines; so are the dynamic (FLUX / Qwen-Image) schedules, which the scheduler shifts in float32.
"""

from __future__ import annotations

import math

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000


def _check_num_steps(num_steps: int) -> None:
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")


def _with_terminal_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas.to(torch.float32), torch.zeros(1, dtype=torch.float32)])


def _shift_static(sigma, shift: float):
    """SD3's static time shift s*t / (1 + (s-1)*t): more steps at high noise for s > 1."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def _shift_exponential(sigma, mu: float):
    """FLUX's resolution-dependent shift e^mu / (e^mu + 1/t - 1); equals the static shift with s = e^mu."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigma - 1))


def _stretch_to_terminal(sigmas: torch.Tensor, shift_terminal: float) -> torch.Tensor:
    """Rescale 1 - sigma so that the last non-zero sigma becomes `shift_terminal` (Qwen-Image uses 0.02)."""
    if not 0.0 < shift_terminal < 1.0:
        raise ValueError(f"shift_terminal must lie in (0, 1), got {shift_terminal}")
    one_minus = 1 - sigmas
    scale = one_minus[-1] / (1 - shift_terminal)
    return 1 - one_minus / scale


def static_shift_sigmas(num_steps: int, shift: float, shift_terminal: float | None = None) -> torch.Tensor:
    """SD3 / SD3.5: `FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(num_steps)`, bit for bit.

    The grid runs from 1 to the scheduler's training sigma_min, which is the *already shifted* value
    at t = 1/1000 and is then shifted a second time (a diffusers quirk the published models sample
    with). sigma_min is computed in float32 like the scheduler's training table, the grid and the
    shift in float64 like `set_timesteps`, and the result is rounded once to float32.
    """
    _check_num_steps(num_steps)
    first_train_t = torch.tensor([1.0], dtype=torch.float32) / NUM_TRAIN_TIMESTEPS
    sigma_min = _shift_static(first_train_t, shift).item()
    sigma_max = 1.0  # the static shift maps t = 1 to exactly 1
    grid = np.linspace(sigma_max * NUM_TRAIN_TIMESTEPS, sigma_min * NUM_TRAIN_TIMESTEPS, num_steps)
    sigmas = torch.from_numpy(_shift_static(grid / NUM_TRAIN_TIMESTEPS, shift))
    if shift_terminal is not None:
        sigmas = _stretch_to_terminal(sigmas, shift_terminal)
    return _with_terminal_zero(sigmas)


def flux_mu(
    image_seq_len: int,
    base_seq: int = 256,
    max_seq: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """Resolution-dependent shift exponent: linear in the number of packed latent tokens.

    FLUX defaults; Qwen-Image passes max_seq=8192, max_shift=0.9 (its scheduler config).
    """
    slope = (max_shift - base_shift) / (max_seq - base_seq)
    return base_shift + slope * (image_seq_len - base_seq)


def dynamic_shift_sigmas(num_steps: int, mu: float, shift_terminal: float | None = None) -> torch.Tensor:
    """FLUX / Qwen-Image: linspace(1, 1/T, T) then the exponential time shift with exponent mu.

    Bitwise what their pipelines get from a `use_dynamic_shifting` scheduler given these sigmas and
    mu: the grid is rounded to float32 and shifted (and for Qwen-Image stretched to `shift_terminal`)
    in float32, in the scheduler's order of operations.
    """
    _check_num_steps(num_steps)
    grid = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
    sigmas = _shift_exponential(grid, mu)
    if shift_terminal is not None:
        sigmas = _stretch_to_terminal(sigmas, shift_terminal)
    return _with_terminal_zero(torch.from_numpy(sigmas))


def shifted_linear_sigmas(num_steps: int, shift: float) -> torch.Tensor:
    """Bagel: t = linspace(1, 0, T) shifted by s*t / (1 + (s-1)*t), in float32 like its sampler.

    Bagel counts "timesteps" as the T points of this grid, so its T timesteps are T-1 steps:
    pass num_steps = T - 1 to get its table.
    """
    _check_num_steps(num_steps)
    grid = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float32)
    return _shift_static(grid, shift)


UNIPC_GRIDS = ("flow_grpo", "diffusers")


def unipc_flow_sigmas(num_steps: int, shift: float, grid: str = "flow_grpo") -> tuple[torch.Tensor, torch.Tensor]:
    """Wan: the flow-sigma table of `UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=shift)`.

    Returns (sigmas (T+1,) fp32 ending in 0, timesteps (T,) int64). The timesteps are the scheduler's
    integer values int64(1000 sigma), truncated from the float64 sigmas (not from the fp32 ones, which
    can land just below an integer), and are what the Wan backbone is fed. Two grids, because
    diffusers changed the table in 0.37:
      "flow_grpo": diffusers <= 0.36, which flow_grpo pins (0.33.1) and trained with:
                   a = linspace(1, 1/1000, T+1), sigma = flip(shift(1 - a))[:-1] (sigma_0 = 0.99967 at s=3);
      "diffusers": diffusers >= 0.37 (the installed one): u = linspace(1, 1/1000, T+1)[:-1],
                   sigma = shift(u), and sigma_0 -= 1e-6 when it is 1.
    """
    _check_num_steps(num_steps)
    if grid not in UNIPC_GRIDS:
        raise ValueError(f"unipc_flow_sigmas: grid {grid!r} is not one of {UNIPC_GRIDS}")
    grid_points = np.linspace(1, 1 / NUM_TRAIN_TIMESTEPS, num_steps + 1)
    if grid == "flow_grpo":
        sigmas = np.flip(_shift_static(1.0 - grid_points, shift))[:-1].copy()
    else:
        sigmas = _shift_static(grid_points[:-1], shift)
        if abs(sigmas[0] - 1) < 1e-6:
            sigmas[0] -= 1e-6
    timesteps = torch.from_numpy((sigmas * NUM_TRAIN_TIMESTEPS).astype(np.int64))
    return _with_terminal_zero(torch.from_numpy(sigmas)), timesteps
