"""Rollout: sample trajectories with the policy and record what training needs to re-score them.

rl/ sees a model family only through the Policy interface (DESIGN.md): `velocity`, `sigmas`,
`initial_noise`, `encode`, `decode`. Training later calls the same `velocity` on the same batch
layout, so an on-policy re-score reproduces the stored log-probs bit for bit.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass

import torch

from titan_flow.rl.sde import sde_step


@dataclass
class Trajectory:
    """One sampling batch. Latents are fp32 and include both ends: x_0 (noise) ... x_T (image latent)."""

    latents: torch.Tensor  # (B, T+1, *latent_shape)
    log_probs: torch.Tensor  # (B, T); NaN at deterministic (ODE) steps
    sigmas: torch.Tensor  # (T+1,) the schedule used
    noise_levels: list[float]  # (T,) noise level of each step (0 = ODE)

    @property
    def num_steps(self) -> int:
        return len(self.noise_levels)


def step_noise_levels(num_steps: int, noise_level: float, window: tuple[int, int] | None) -> list[float]:
    """Noise level per step: `noise_level` inside the SDE window (all steps when None), 0 outside."""
    lo, hi = window if window is not None else (0, num_steps)
    return [noise_level if lo <= i < hi else 0.0 for i in range(num_steps)]


def draw_sde_window(
    rng: random.Random, num_steps: int, window_size: int, window_range: tuple[int, int]
) -> tuple[int, int] | None:
    """Flow-GRPO-Fast window [s, s+w) with s uniform in [lo, hi-w]; None = SDE on every step."""
    if window_size == 0:
        return None
    lo, hi = window_range
    start = rng.randint(lo, hi - window_size)
    return start, start + window_size


def trained_steps(num_steps: int, timestep_fraction: float, window: tuple[int, int] | None) -> list[int]:
    """The window's steps (Fast), else the first floor(T * fraction) steps, in order."""
    if window is not None:
        return list(range(*window))
    return list(range(max(1, math.floor(num_steps * timestep_fraction))))


def prompt_seed(prompt: str, epoch: int, round_index: int) -> int:
    """The reference's `same_latent` seed: one initial latent per (epoch, round, prompt), on every rank."""
    digest = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "big")
    return (epoch * 10000 + round_index + digest) % (2**31)


@torch.no_grad()
def sample_trajectory(
    policy,
    model: torch.nn.Module,
    cond: dict[str, torch.Tensor],
    initial_latents: torch.Tensor,
    sigmas: torch.Tensor,
    noise_levels: list[float],
    sde_type: str,
    guidance_scale: float,
    generator: torch.Generator | None = None,
    progress=None,
) -> Trajectory:
    x = initial_latents.float()
    batch = x.shape[0]
    latents = [x]
    log_probs = torch.full((batch, len(noise_levels)), float("nan"), device=x.device)
    sigma_fallback = sigmas[1]
    for i, level in enumerate(noise_levels):
        sigma = sigmas[i].expand(batch)
        sigma_next = sigmas[i + 1].expand(batch)
        v = policy.velocity(model, x, sigma, cond, guidance_scale)
        out = sde_step(
            v, x, sigma, sigma_next, level, sde_type, generator=generator, sigma_fallback=sigma_fallback
        )
        x = out.prev_sample
        latents.append(x)
        if out.log_prob is not None:
            log_probs[:, i] = out.log_prob
        if progress is not None:
            progress.update(1)
    return Trajectory(torch.stack(latents, dim=1), log_probs, sigmas, list(noise_levels))
