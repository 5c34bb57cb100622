"""Rollout and re-scoring through the Policy interface, on a toy policy (no model family needed)."""

import hashlib
import random

import pytest
import torch

from titan_flow.rl.rollout import draw_sde_window, prompt_seed, sample_trajectory, step_noise_levels, trained_steps
from titan_flow.models.common.schedules import static_shift_sigmas
from titan_flow.rl.sde import sde_step


class ToyVelocity(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x, sigma, emb):
        t = sigma.view(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:])
        return self.net(torch.cat([x, t], 1)) + emb.view(-1, 1, 1, 1)


class ToyVideoVelocity(torch.nn.Module):
    """The toy velocity on video latents (B, C, F, H, W)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Conv3d(3, 2, 3, padding=1)

    def forward(self, x, sigma, emb):
        t = sigma.view(-1, 1, 1, 1, 1).expand(-1, 1, *x.shape[2:])
        return self.net(torch.cat([x, t], 1)) + emb.view(-1, 1, 1, 1, 1)


class ToyPolicy:
    """The Policy interface of titan_flow/models/registry.py, with CFG as the families do it."""

    latent_shape = (2, 6, 6)

    def encode(self, prompts, images=None, model=None):
        return {"emb": torch.tensor([float(len(p)) for p in prompts]) / 10, "neg": torch.zeros(len(prompts))}

    def initial_noise(self, n, generator):
        if isinstance(generator, list):
            return torch.stack([torch.randn(*self.latent_shape, generator=g) for g in generator])
        return torch.randn(n, *self.latent_shape, generator=generator)

    def velocity(self, model, x, sigma, cond, guidance_scale):
        if guidance_scale <= 1:
            return model(x, sigma, cond["emb"])
        both = model(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([cond["neg"], cond["emb"]]))
        uncond, c = both.chunk(2)
        return uncond + guidance_scale * (c - uncond)

    def sigmas(self, num_steps):
        return static_shift_sigmas(num_steps, 3.0)


class ToyVideoPolicy(ToyPolicy):
    """Video latents (B, 2, 3 frames, 6, 6): rl/ must not care about the rank."""

    latent_shape = (2, 3, 6, 6)


def rescore_all(policy, model, cond, traj, sde_type, guidance, steps):
    out = []
    n = traj.latents.shape[0]
    for j in steps:
        s = sde_step(policy.velocity(model, traj.latents[:, j], traj.sigmas[j].expand(n), cond, guidance),
                     traj.latents[:, j], traj.sigmas[j].expand(n), traj.sigmas[j + 1].expand(n),
                     traj.noise_levels[j], sde_type, prev_sample=traj.latents[:, j + 1], sigma_fallback=traj.sigmas[1])
        out.append(s.log_prob)
    return torch.stack(out, 1)


@pytest.mark.parametrize(("policy", "model"), [(ToyPolicy, ToyVelocity), (ToyVideoPolicy, ToyVideoVelocity)],
                         ids=["image", "video"])
def test_on_policy_rescore_reproduces_rollout_log_probs_bitwise(policy, model):
    policy, model = policy(), model()
    prompts = ["a cat", "a red dog", "a cat", "tree"]
    cond = policy.encode(prompts)
    for sde_type, guidance in [("sde", 4.5), ("cps", 1.0), ("sde", 1.0), ("wan", 4.5)]:
        x0 = policy.initial_noise(4, torch.Generator().manual_seed(1))
        levels = step_noise_levels(6, 0.7, None)
        traj = sample_trajectory(policy, model, cond, x0, policy.sigmas(6), levels, sde_type, guidance,
                                 generator=torch.Generator().manual_seed(2))
        assert traj.latents.shape == (4, 7, *policy.latent_shape) and traj.log_probs.shape == (4, 6)
        steps = trained_steps(6, 0.99, None)
        assert steps == [0, 1, 2, 3, 4]
        again = rescore_all(policy, model, cond, traj, sde_type, guidance, steps)
        assert torch.equal(again, traj.log_probs[:, steps])  # ratio exactly 1 on-policy
        # once the weights move, the ratio does too
        with torch.no_grad():
            model.net.bias.add_(0.05)
        moved = rescore_all(policy, model, cond, traj, sde_type, guidance, steps)
        assert (moved - traj.log_probs[:, steps]).abs().max() > 1e-4
        with torch.no_grad():
            model.net.bias.sub_(0.05)


def test_fast_window_is_seeded_and_only_window_steps_are_stochastic():
    rng_a, rng_b = random.Random(42), random.Random(42)
    windows = [draw_sde_window(rng_a, 10, 3, (0, 5)) for _ in range(50)]
    assert windows == [draw_sde_window(rng_b, 10, 3, (0, 5)) for _ in range(50)]  # same stream on every rank
    assert set(windows) == {(0, 3), (1, 4), (2, 5)}
    assert draw_sde_window(rng_a, 10, 0, (0, 10)) is None
    levels = step_noise_levels(10, 0.8, (2, 5))
    assert levels == [0, 0, 0.8, 0.8, 0.8, 0, 0, 0, 0, 0]
    assert trained_steps(10, 0.99, (2, 5)) == [2, 3, 4]
    for policy, model in ((ToyPolicy(), ToyVelocity()), (ToyVideoPolicy(), ToyVideoVelocity())):
        cond = policy.encode(["x", "yy"])
        traj = sample_trajectory(policy, model, cond, policy.initial_noise(2, torch.Generator().manual_seed(0)),
                                 policy.sigmas(10), levels, "cps", 1.0, generator=torch.Generator().manual_seed(0))
        assert torch.isnan(traj.log_probs[:, [0, 1, 5, 9]]).all() and torch.isfinite(traj.log_probs[:, 2:5]).all()
        # outside the window the steps are the deterministic Euler steps of the ODE (CPS's coefficients
        # reach 1 and dt up to fp32 rounding)
        v = policy.velocity(model, traj.latents[:, 6], traj.sigmas[6].expand(2), cond, 1.0)
        euler = traj.latents[:, 6] + (traj.sigmas[7] - traj.sigmas[6]) * v
        torch.testing.assert_close(traj.latents[:, 7], euler, rtol=0, atol=1e-5)


def test_same_latent_seed_is_the_reference_formula():
    digest = int.from_bytes(hashlib.sha256(b"a photo of a cat").digest()[:4], "big")
    assert prompt_seed("a photo of a cat", 3, 2) == (3 * 10000 + 2 + digest) % 2**31
    policy = ToyPolicy()
    gens = [torch.Generator().manual_seed(prompt_seed(p, 0, 0)) for p in ["a", "b", "a"]]
    x = policy.initial_noise(3, gens)
    assert torch.equal(x[0], x[2]) and not torch.equal(x[0], x[1])
