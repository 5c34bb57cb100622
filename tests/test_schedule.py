import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift as diffusers_flux_shift

from titan_flow.models.common.schedules import dynamic_shift_sigmas, flux_mu, shifted_linear_sigmas, static_shift_sigmas

# Tables from reference/flow_grpo_algorithm.md section 1.2 (512x512 images, 4 decimals).
SD3_T10 = [1.000, 0.9601, 0.9133, 0.8577, 0.7904, 0.7073, 0.6022, 0.4649, 0.2780, 0.0089, 0.0]
FLUX_T6 = [1.000, 0.9037, 0.7897, 0.6525, 0.4842, 0.2730, 0.0]
QWEN_T10 = [1.000, 0.9290, 0.8515, 0.7666, 0.6733, 0.5701, 0.4555, 0.3274, 0.1833, 0.0200, 0.0]
BAGEL_T15 = [1, 0.975, 0.947, 0.917, 0.882, 0.844, 0.800, 0.750, 0.692, 0.625, 0.545, 0.450, 0.333, 0.1875, 0]

QWEN_SCHEDULER = dict(base_shift=0.5, max_shift=0.9, base_image_seq_len=256, max_image_seq_len=8192)
TOKENS_512 = (512 // 16) ** 2  # packed 2x2 latent tokens of a 512x512 image


def assert_table(sigmas: torch.Tensor, table: list[float], atol: float) -> None:
    assert sigmas.dtype == torch.float32
    assert sigmas.shape == (len(table),)
    assert sigmas[-1].item() == 0.0
    torch.testing.assert_close(sigmas, torch.tensor(table, dtype=torch.float32), rtol=0, atol=atol)


def test_sd3_tables():
    assert_table(static_shift_sigmas(10, shift=3.0), SD3_T10, atol=1e-4)
    sigmas = static_shift_sigmas(40, shift=3.0)
    assert sigmas.shape == (41,)
    ends = torch.tensor([1.0, 0.9913, 0.0810, 0.0089, 0.0])
    torch.testing.assert_close(sigmas[[0, 1, -3, -2, -1]], ends, rtol=0, atol=1e-4)
    assert bool((sigmas[1:] < sigmas[:-1]).all())


@pytest.mark.parametrize("num_steps", [1, 2, 6, 10, 28, 40, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_static_shift_is_bitwise_diffusers(num_steps, shift):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(num_steps)
    ours = static_shift_sigmas(num_steps, shift=shift)
    assert torch.equal(ours, scheduler.sigmas)
    # The SD3 backbone sees 1000*sigma: the stored timesteps must be reproduced exactly too.
    assert torch.equal(ours[:-1] * 1000, scheduler.timesteps)


def test_static_shift_terminal_matches_diffusers():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, shift_terminal=0.05)
    scheduler.set_timesteps(10)
    ours = static_shift_sigmas(10, shift=3.0, shift_terminal=0.05)
    torch.testing.assert_close(ours, scheduler.sigmas, rtol=0, atol=1e-7)
    assert abs(ours[-2].item() - 0.05) < 1e-7


def test_flux_mu_matches_diffusers_and_reference():
    assert abs(flux_mu(TOKENS_512) - 0.63) < 1e-3
    assert abs(flux_mu(TOKENS_512, max_seq=8192, max_shift=0.9) - 0.5387) < 1e-4
    for seq_len in [256, 1024, 4096, 6400]:
        assert flux_mu(seq_len) == pytest.approx(diffusers_flux_shift(seq_len), rel=1e-12)
        assert flux_mu(seq_len, 256, 8192, 0.5, 0.9) == pytest.approx(
            diffusers_flux_shift(seq_len, 256, 8192, 0.5, 0.9), rel=1e-12
        )


def test_flux_and_qwen_tables():
    assert_table(dynamic_shift_sigmas(6, flux_mu(TOKENS_512)), FLUX_T6, atol=1e-4)
    mu = flux_mu(TOKENS_512, max_seq=8192, max_shift=0.9)
    assert_table(dynamic_shift_sigmas(10, mu, shift_terminal=0.02), QWEN_T10, atol=1e-4)


def _diffusers_dynamic(num_steps: int, mu: float, **config) -> torch.Tensor:
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential", **config)
    # What the FLUX and Qwen-Image pipelines pass to set_timesteps.
    scheduler.set_timesteps(num_steps, sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    return scheduler.sigmas


@pytest.mark.parametrize("num_steps", [2, 6, 10, 28, 50])
@pytest.mark.parametrize("resolution", [256, 512, 1024])
def test_dynamic_shift_matches_diffusers(num_steps, resolution):
    tokens = (resolution // 16) ** 2
    flux_mu_value = flux_mu(tokens)
    ours = dynamic_shift_sigmas(num_steps, flux_mu_value)
    torch.testing.assert_close(ours, _diffusers_dynamic(num_steps, flux_mu_value), rtol=0, atol=2e-7)

    qwen_mu = flux_mu(tokens, max_seq=8192, max_shift=0.9)
    ours = dynamic_shift_sigmas(num_steps, qwen_mu, shift_terminal=0.02)
    reference = _diffusers_dynamic(num_steps, qwen_mu, shift_terminal=0.02, **QWEN_SCHEDULER)
    torch.testing.assert_close(ours, reference, rtol=0, atol=2e-7)
    assert ours[-1].item() == 0.0 and abs(ours[-2].item() - 0.02) < 1e-7


def test_bagel_table():
    sigmas = shifted_linear_sigmas(14, shift=3.0)  # Bagel's 15 timesteps = 14 steps
    assert sigmas.dtype == torch.float32 and sigmas.shape == (15,)
    assert sigmas[0].item() == 1.0 and sigmas[-1].item() == 0.0
    torch.testing.assert_close(sigmas, torch.tensor(BAGEL_T15, dtype=torch.float32), rtol=0, atol=5e-4)
    # Shift 1 is the plain linear grid.
    torch.testing.assert_close(shifted_linear_sigmas(4, 1.0), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_steps must be >= 1, got 0"):
        static_shift_sigmas(0, 3.0)
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        dynamic_shift_sigmas(-1, 0.5)
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        shifted_linear_sigmas(0, 3.0)
    with pytest.raises(ValueError, match=r"shift_terminal must lie in \(0, 1\), got 1.5"):
        dynamic_shift_sigmas(10, 0.5, shift_terminal=1.5)
