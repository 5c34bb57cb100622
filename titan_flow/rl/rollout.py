"""Rollout: sample trajectories with the policy and record what training needs to re-score them.

rl/ sees a model family only through the Policy interface (DESIGN.md): `velocity`, `sigmas`,
`initial_noise`, `encode`, `decode`. Training later calls the same `velocity` on the same batch
layout, so an on-policy re-score reproduces the stored log-probs bit for bit.

Flow-GRPO-Fast (flow_grpo_algorithm.md section 6): the SDE runs only inside a window of steps,
the ODE elsewhere, and only the window is trained. The window is drawn once per sampling round from
the run's seeded stream, the same on every rank, so all members of a group (one round's prompt,
spread over ranks) share it; rounds of one epoch get different windows. The legacy variant
(`sample_branched_trajectory`) also shares the ODE prefix of a group and branches at the window.
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
    means: torch.Tensor | None = None  # (B, T, *latent_shape) step means at SDE steps (GRPO-Guard), else None
    window: tuple[int, int] | None = None  # the Fast SDE window [lo, hi), None = SDE on every step

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


def _denoise(policy, model, cond, x, sigmas, noise_levels, steps, sde_type, guidance_scale, generator, progress,
             latents, log_probs, means):
    """Take `steps` from x, appending to `latents` and filling log_probs[:, i] / means[:, i] at SDE steps."""
    batch = x.shape[0]
    for i in steps:
        level = noise_levels[i]
        sigma, sigma_next = sigmas[i].expand(batch), sigmas[i + 1].expand(batch)
        v = policy.velocity(model, x, sigma, cond, guidance_scale)
        out = sde_step(
            v, x, sigma, sigma_next, level, sde_type, generator=generator, sigma_fallback=sigmas[1],
            return_mean=means is not None and level > 0,
        )
        x = out.prev_sample
        latents.append(x)
        if out.log_prob is not None:
            log_probs[:, i] = out.log_prob
            if means is not None:
                means[:, i] = out.mean
        if progress is not None:
            progress.update(1)
    return x


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
    return_means: bool = False,
    window: tuple[int, int] | None = None,
) -> Trajectory:
    """Sample every step from `initial_latents`; `return_means` also stores each SDE step's mean."""
    x = initial_latents.float()
    num_steps = len(noise_levels)
    log_probs = torch.full((x.shape[0], num_steps), float("nan"), device=x.device)
    means = x.new_zeros(x.shape[0], num_steps, *x.shape[1:]) if return_means else None
    latents = [x]
    _denoise(policy, model, cond, x, sigmas, noise_levels, range(num_steps), sde_type, guidance_scale, generator,
             progress, latents, log_probs, means)
    return Trajectory(torch.stack(latents, dim=1), log_probs, sigmas, list(noise_levels), means, window)


@torch.no_grad()
def sample_branched_trajectory(
    policy,
    model: torch.nn.Module,
    cond: dict[str, torch.Tensor],
    prefix_cond: dict[str, torch.Tensor],
    prefix_latents: torch.Tensor,
    member_of: torch.Tensor,
    sigmas: torch.Tensor,
    noise_levels: list[float],
    window: tuple[int, int],
    sde_type: str,
    guidance_scale: float,
    generator: torch.Generator | None = None,
    progress=None,
    return_means: bool = False,
) -> Trajectory:
    """Legacy Flow-GRPO-Fast: one ODE prefix per distinct prompt, expanded to the group at the window start.

    `prefix_cond` / `prefix_latents` hold the U distinct prompts of the batch and their initial noise;
    `member_of` (B,) maps each sample to its prompt's row. Steps before the window run on the U rows
    only; from the window on, the B samples take independent SDE steps, then the ODE to the end, on
    the full batch (the layout training re-scores, so the ratio stays exactly 1 on-policy).
    """
    branch = window[0]
    if any(level > 0 for level in noise_levels[:branch]):
        raise ValueError(f"the steps before the branch step {branch} must be deterministic, got {noise_levels}")
    num_steps = len(noise_levels)
    x = prefix_latents.float()
    prefix = [x]
    nan = torch.full((x.shape[0], num_steps), float("nan"), device=x.device)
    x = _denoise(policy, model, prefix_cond, x, sigmas, noise_levels, range(branch), sde_type, guidance_scale,
                 generator, progress, prefix, nan, None)
    batch = member_of.numel()
    log_probs = torch.full((batch, num_steps), float("nan"), device=x.device)
    means = x.new_zeros(batch, num_steps, *x.shape[1:]) if return_means else None
    latents = [p[member_of] for p in prefix]
    _denoise(policy, model, cond, latents[-1], sigmas, noise_levels, range(branch, num_steps), sde_type,
             guidance_scale, generator, progress, latents, log_probs, means)
    return Trajectory(torch.stack(latents, dim=1), log_probs, sigmas, list(noise_levels), means, window)


@torch.no_grad()
def generate_images(
    policy,
    model: torch.nn.Module,
    prompts: list[str],
    initial_noise_generator,
    sigmas: torch.Tensor,
    noise_levels: list[float],
    sde_type: str,
    guidance_scale: float,
    noise_generator: torch.Generator | None = None,
    images: list | None = None,
) -> torch.Tensor:
    """Prompts (and, for edits, their source images) -> float [0, 1] images (B, 3, H, W) or videos
    (B, F, 3, H, W): encode, sample from fresh initial noise, decode.

    `initial_noise_generator` is a generator or one per prompt (Policy.initial_noise);
    `noise_generator` draws the SDE steps' noise.
    """
    cond = policy.encode(prompts, images=images, model=model)
    x0 = policy.initial_noise(len(prompts), initial_noise_generator, cond=cond)
    traj = sample_trajectory(policy, model, cond, x0, sigmas, noise_levels, sde_type, guidance_scale, noise_generator)
    return policy.decode(traj.latents[:, -1])

