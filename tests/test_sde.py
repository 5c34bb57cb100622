"""The SDE / CPS / ODE step: coefficients, sampling and log-probs against independent computations."""

import math

import pytest
import torch

from titan_flow.models.common.schedules import unipc_flow_sigmas
from titan_flow.rl.sde import sde_step, step_coefficients

# SD3.5-M's 10-step schedule at shift 3 (flow_grpo_algorithm.md section 1.2).
SD3_T10 = torch.tensor([1.000, 0.9601, 0.9133, 0.8577, 0.7904, 0.7073, 0.6022, 0.4649, 0.2780, 0.0089, 0.0])


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_sde_noise_scale_matches_the_reference_table():
    # sigma_sde and the per-element std s at a = 0.7 (section 2.1).
    c = step_coefficients(SD3_T10[:-1], SD3_T10[1:], 0.7, "sde", SD3_T10[1])
    want_sigma_sde = [3.51, 3.44, 2.27, 1.72, 1.36, 1.09, 0.861, 0.652, 0.434, 0.066]
    want_std = [0.700, 0.743, 0.536, 0.446, 0.392, 0.353, 0.319, 0.282, 0.225, 0.0063]
    assert torch.allclose(c.kl_std, torch.tensor(want_sigma_sde), rtol=6e-3, atol=2e-3)
    assert torch.allclose(c.std, torch.tensor(want_std), rtol=6e-3, atol=6e-4)
    # CPS noise std at a = 0.8 (section 2.2): sigma_{i+1} sin(a pi / 2), exactly 0 at the last step.
    c = step_coefficients(SD3_T10[:-1], SD3_T10[1:], 0.8, "cps", SD3_T10[1])
    want = [0.913, 0.869, 0.816, 0.752, 0.673, 0.573, 0.442, 0.264, 0.0085, 0.0]
    assert torch.allclose(c.std, torch.tensor(want), atol=1e-3)
    assert c.std[-1] == 0


@pytest.mark.parametrize("i", [0, 4, 9])
def test_sde_noise_free_is_the_euler_step_exactly(i):
    v, x = rand(3, 4, 8, 8, seed=1), rand(3, 4, 8, 8, seed=2)
    s, s_next = SD3_T10[i].expand(3), SD3_T10[i + 1].expand(3)
    out = sde_step(v, x, s, s_next, 0.0, "sde", sigma_fallback=SD3_T10[1])
    assert out.log_prob is None
    assert torch.equal(out.prev_sample, x + (s_next - s).view(-1, 1, 1, 1) * v)
    cps = sde_step(v, x, s, s_next, 0.0, "cps", sigma_fallback=SD3_T10[1])
    assert torch.allclose(cps.prev_sample, out.prev_sample, atol=1e-6, rtol=0)


def test_sde_mean_follows_the_paper_sde():
    # mean = x + dt [v + sigma_sde^2 / (2 sigma) (x + (1 - sigma) v)]  (Euler-Maruyama drift, section 2.1)
    v, x = rand(2, 4, 8, 8, seed=3).double(), rand(2, 4, 8, 8, seed=4).double()
    s, s_next = torch.tensor([0.8577, 0.6022], dtype=torch.float64), torch.tensor([0.7904, 0.4649], dtype=torch.float64)
    c = step_coefficients(s, s_next, 0.7, "sde", 0.9601)
    out = sde_step(v, x, s, s_next, 0.7, "sde", prev_sample=x, return_mean=True)
    sde2 = (c.kl_std**2).view(-1, 1, 1, 1)
    sig, dt = s.view(-1, 1, 1, 1), (s_next - s).view(-1, 1, 1, 1)
    drift = v + sde2 / (2 * sig) * (x + (1 - sig) * v)
    assert torch.allclose(out.mean, x + dt * drift, atol=1e-12)


def test_cps_mean_interpolates_predicted_data_and_noise():
    v, x = rand(2, 4, 8, 8, seed=5), rand(2, 4, 8, 8, seed=6)
    s, s_next, a = torch.tensor([0.9133, 0.4649]), torch.tensor([0.8577, 0.2780]), 0.8
    out = sde_step(v, x, s, s_next, a, "cps", prev_sample=x, return_mean=True)
    x0 = x - s.view(-1, 1, 1, 1) * v
    x1 = x + (1 - s.view(-1, 1, 1, 1)) * v
    sn = s_next.view(-1, 1, 1, 1)
    want = (1 - sn) * x0 + sn * math.cos(a * math.pi / 2) * x1
    assert torch.allclose(out.mean, want, atol=2e-6)


def test_sde_log_prob_is_the_closed_form_gaussian():
    # Section 15.3: sampling then scoring gives -mean(eps^2)/2 - log s - log sqrt(2 pi), per sample.
    v, x = rand(4, 4, 8, 8, seed=7), rand(4, 4, 8, 8, seed=8)
    s, s_next = SD3_T10[2].expand(4), SD3_T10[3].expand(4)
    g = torch.Generator().manual_seed(11)
    out = sde_step(v, x, s, s_next, 0.7, "sde", generator=g, sigma_fallback=SD3_T10[1], return_mean=True)
    eps = torch.randn(out.prev_sample.shape, generator=torch.Generator().manual_seed(11))
    std = step_coefficients(s, s_next, 0.7, "sde", SD3_T10[1]).std
    assert torch.allclose(out.prev_sample, out.mean + std.view(-1, 1, 1, 1) * eps, atol=1e-6)
    want = -0.5 * eps.square().flatten(1).mean(1) - std.log() - 0.5 * math.log(2 * math.pi)
    assert torch.allclose(out.log_prob, want, atol=1e-5)
    # and an independent density: torch.distributions, element by element, then the per-sample mean
    normal = torch.distributions.Normal(out.mean, std.view(-1, 1, 1, 1))
    assert torch.allclose(out.log_prob, normal.log_prob(out.prev_sample).flatten(1).mean(1), atol=1e-5)


def test_cps_log_prob_is_unnormalised_squared_distance():
    v, x = rand(3, 4, 8, 8, seed=9), rand(3, 4, 8, 8, seed=10)
    s, s_next = SD3_T10[1].expand(3), SD3_T10[2].expand(3)
    g = torch.Generator().manual_seed(5)
    out = sde_step(v, x, s, s_next, 0.8, "cps", generator=g)
    eps = torch.randn(out.prev_sample.shape, generator=torch.Generator().manual_seed(5))
    std = step_coefficients(s, s_next, 0.8, "cps", SD3_T10[1]).std
    assert torch.allclose(out.log_prob, -(std**2) * eps.square().flatten(1).mean(1), rtol=1e-5)


def test_rescoring_the_sampled_step_reproduces_its_log_prob_bitwise():
    v, x = rand(2, 4, 8, 8, seed=12), rand(2, 4, 8, 8, seed=13)
    s, s_next = SD3_T10[0].expand(2), SD3_T10[1].expand(2)
    for sde_type in ("sde", "cps"):
        out = sde_step(v, x, s, s_next, 0.7, sde_type, generator=torch.Generator().manual_seed(0), sigma_fallback=SD3_T10[1])
        again = sde_step(v, x, s, s_next, 0.7, sde_type, prev_sample=out.prev_sample, sigma_fallback=SD3_T10[1])
        assert torch.equal(out.log_prob, again.log_prob)


def test_log_prob_gradient_flows_to_the_velocity_only_through_the_mean():
    v = rand(2, 4, 4, 4, seed=14).double().requires_grad_()
    x, x_next = rand(2, 4, 4, 4, seed=15).double(), rand(2, 4, 4, 4, seed=16).double()
    s, s_next = torch.tensor([0.7904, 0.7904], dtype=torch.float64), torch.tensor([0.7073, 0.7073], dtype=torch.float64)
    out = sde_step(v, x, s, s_next, 0.7, "sde", prev_sample=x_next, return_mean=True)
    out.log_prob.sum().backward()
    c = step_coefficients(s, s_next, 0.7, "sde", 0.9601)
    n = x[0].numel()
    want = (x_next - out.mean.detach()) / (c.std**2 * n).view(-1, 1, 1, 1) * c.coef_v.view(-1, 1, 1, 1)
    assert torch.allclose(v.grad, want, atol=1e-12)


def test_kl_and_ratio_bias_terms():
    v, v_ref = rand(2, 4, 8, 8, seed=17), rand(2, 4, 8, 8, seed=18)
    x, x_next = rand(2, 4, 8, 8, seed=19), rand(2, 4, 8, 8, seed=20)
    s, s_next = SD3_T10[3].expand(2), SD3_T10[4].expand(2)
    out = sde_step(v, x, s, s_next, 0.7, "sde", prev_sample=x_next, v_ref=v_ref, return_mean=True, sigma_fallback=SD3_T10[1])
    ref = sde_step(v_ref, x, s, s_next, 0.7, "sde", prev_sample=x_next, return_mean=True, sigma_fallback=SD3_T10[1])
    c = step_coefficients(s, s_next, 0.7, "sde", SD3_T10[1])
    # The reference's KL divides by sigma_sde^2, without |dt| (section 5.3).
    want_kl = (out.mean - ref.mean).square().flatten(1).mean(1) / (2 * c.kl_std**2)
    assert torch.allclose(out.kl, want_kl, rtol=1e-5)
    same = sde_step(v, x, s, s_next, 0.7, "sde", prev_sample=x_next, v_ref=v, sigma_fallback=SD3_T10[1])
    assert torch.equal(same.kl, torch.zeros(2))
    # GRPO-Guard (section 15.10): with x' = mean_old + S eps and the per-sample bias b,
    # S (logp_new - logp_old + b) = mean(eps * (mean_new - mean_old)).
    eps = rand(2, 4, 8, 8, seed=21)
    x_next = ref.mean + c.std.view(-1, 1, 1, 1) * eps
    old = sde_step(v_ref, x, s, s_next, 0.7, "sde", prev_sample=x_next, sigma_fallback=SD3_T10[1])
    new = sde_step(v, x, s, s_next, 0.7, "sde", prev_sample=x_next, mean_old=ref.mean, return_mean=True, sigma_fallback=SD3_T10[1])
    normed = c.std * (new.log_prob - old.log_prob + new.ratio_bias)
    want = (eps * (new.mean - ref.mean)).flatten(1).mean(1)
    assert torch.allclose(normed, want, atol=1e-5)


def test_bad_sde_type_names_the_field():
    with pytest.raises(ValueError, match="sampling.sde_type: 'ddim'"):
        step_coefficients(SD3_T10[:1], SD3_T10[1:2], 0.7, "ddim", 0.96)


# ---------------------------------------------------------------------------- flow_grpo's Wan SDE (section 4.7)

# The Wan table at T=20, shift 3, flow_grpo's grid (diffusers <= 0.36), and the notes' per-step noise.
WAN_T20 = unipc_flow_sigmas(20, 3.0, "flow_grpo")[0]


def test_wan_noise_is_sigma_1_times_sigma_and_matches_the_reference_table():
    c = step_coefficients(WAN_T20[:-1], WAN_T20[1:], 1.0, "wan", WAN_T20[1])
    dt = WAN_T20[1:] - WAN_T20[:-1]
    sigma_sde = WAN_T20[1] * WAN_T20[:-1]  # sigma_min + (sigma_max - sigma_min) sigma, sigma_min = 0
    assert torch.allclose(c.std, sigma_sde * (-dt).sqrt(), rtol=1e-6)
    assert torch.equal(c.kl_std, c.std)  # the exact KL divides by the step's own variance
    want_sigma_sde = [.982, .965, .947]  # first three; the notes list std_i = .982, .965, .947, ..., .245, .134
    assert torch.allclose(sigma_sde[:3], torch.tensor(want_sigma_sde), atol=6e-4)
    assert torch.allclose(sigma_sde[-2:], torch.tensor([.245, .134]), atol=6e-4)
    want_std = [.129, .131, .133, .136, .138, .140, .142, .143, .145, .146, .146, .146, .145, .142, .138, .131, .121,
                .105, .083, .049]
    assert torch.allclose(c.std, torch.tensor(want_std), atol=6e-4)
    # the drift is the image SDE's with sigma_sde = sigma_1 sigma: mean = x + dt [v + sigma_sde^2/(2 sigma)(x + (1-sigma) v)]
    v, x = rand(20, 4, 2, 3, 4, seed=30).double(), rand(20, 4, 2, 3, 4, seed=31).double()
    s, s_next = WAN_T20[:-1].double(), WAN_T20[1:].double()
    out = sde_step(v, x, s, s_next, 1.0, "wan", prev_sample=x, sigma_fallback=WAN_T20[1].double(), return_mean=True)
    shape = (-1, 1, 1, 1, 1)
    sde2, sig = (WAN_T20[1].double() * s).square().view(shape), s.view(shape)
    want = x + (s_next - s).view(shape) * (v + sde2 / (2 * sig) * (x + (1 - sig) * v))
    assert torch.allclose(out.mean, want, atol=1e-12)


def test_wan_log_prob_and_exact_kl_against_torch_distributions():
    v, v_ref = rand(3, 4, 3, 4, 6, seed=32), rand(3, 4, 3, 4, 6, seed=33)
    x = rand(3, 4, 3, 4, 6, seed=34)
    s, s_next = WAN_T20[[0, 9, 18]], WAN_T20[[1, 10, 19]]
    out = sde_step(v, x, s, s_next, 1.0, "wan", generator=torch.Generator().manual_seed(3), sigma_fallback=WAN_T20[1],
                   v_ref=v_ref, return_mean=True)
    ref = sde_step(v_ref, x, s, s_next, 1.0, "wan", prev_sample=out.prev_sample, sigma_fallback=WAN_T20[1],
                   return_mean=True)
    std = (WAN_T20[1] * s * (s - s_next).sqrt()).view(-1, 1, 1, 1, 1)
    eps = torch.randn(out.prev_sample.shape, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(out.prev_sample, out.mean + std * eps, atol=1e-6)
    normal = torch.distributions.Normal(out.mean, std)
    assert torch.allclose(out.log_prob, normal.log_prob(out.prev_sample).flatten(1).mean(1), atol=1e-5)
    # the per-element Gaussian KL(N(mean, s^2) || N(mean_ref, s^2)), averaged over the video's elements
    kl = torch.distributions.kl_divergence(normal, torch.distributions.Normal(ref.mean, std)).flatten(1).mean(1)
    assert torch.allclose(out.kl, kl, rtol=1e-5)
    # "sde" divides by sigma_sde^2 instead, without the step's |dt|: a different (larger) number
    image_kl = sde_step(v, x, s, s_next, 1.0, "sde", prev_sample=out.prev_sample, sigma_fallback=WAN_T20[1], v_ref=v_ref)
    assert not torch.allclose(image_kl.kl, out.kl)


def test_wan_step_noise_free_is_euler_and_rescoring_is_bitwise():
    v, x = rand(2, 4, 3, 4, 6, seed=35), rand(2, 4, 3, 4, 6, seed=36)
    s, s_next = WAN_T20[4].expand(2), WAN_T20[5].expand(2)
    ode = sde_step(v, x, s, s_next, 0.0, "wan", sigma_fallback=WAN_T20[1])
    assert ode.log_prob is None and torch.equal(ode.prev_sample, x + (s_next - s).view(-1, 1, 1, 1, 1) * v)
    out = sde_step(v, x, s, s_next, 1.0, "wan", generator=torch.Generator().manual_seed(0), sigma_fallback=WAN_T20[1])
    again = sde_step(v, x, s, s_next, 1.0, "wan", prev_sample=out.prev_sample, sigma_fallback=WAN_T20[1])
    assert torch.equal(out.log_prob, again.log_prob)
