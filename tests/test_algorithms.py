"""The algorithm family: GRPO-Guard math, tracker modes, DPO pairing, legacy branched Fast, and every
algorithm run end to end on the tiny debug SD3 and debug FLUX (in-process, one rank, a few seconds each)."""

import json
import math
import random
from pathlib import Path
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

import kernels
from titan_flow.config import ConfigError, build_job_config
from titan_flow.rl.advantage import compute_advantages
from titan_flow.rl.algorithms.dpo import FlowDPO, preference_pairs
from titan_flow.rl.algorithms import needs_frozen_copy
from titan_flow.rl.algorithms.grpo import GRPO
from titan_flow.rl.rollout import draw_sde_window, sample_branched_trajectory, step_noise_levels, trained_steps
from titan_flow.models.common.schedules import static_shift_sigmas
from titan_flow.rl.sde import sde_step
from titan_flow.train import main

SD3_T10 = static_shift_sigmas(10, 3.0)


# ---------------------------------------------------------------------------------------------
# GRPO-Guard against the reference's formulas (train_sd3_GRPO_Guard.py, flow_grpo_algorithm.md 7.1)


def reference_guard_loss(log_prob, old_log_prob, mean, mean_old, sigma_sde, sqrt_dt, adv, clip, adv_clip,
                         batch_bias):
    """The reference script's lines, re-typed: S = mean(sigma_sde) * mean(sqrt|dt|) over the batch; the bias
    is reduced over `dim=tuple(range(1, log_prob.ndim))`, i.e. dim=() for a (B,) log-prob, which torch
    reads as *all* dims (batch included); the per-sample variant reduces over each sample only."""
    s = sqrt_dt.mean() * sigma_sde.mean()
    sq = (mean - mean_old).pow(2)
    bias = sq.mean(dim=tuple(range(1, log_prob.ndim))) if batch_bias else sq.flatten(1).mean(1)
    bias = bias / (2 * s**2)
    ratio = torch.exp((log_prob - old_log_prob + bias) * s)
    adv = adv.clamp(-adv_clip, adv_clip)
    loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)).mean()
    return loss / sqrt_dt.mean() ** 2, ratio


def guard_case(seed, j=7, batch=4, scale=0.3):
    """One SDE step j of the SD3 T=10 schedule: rollout with v_old, re-score with v = v_old + delta."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 2, 6, 6, generator=g)
    v_old = torch.randn(batch, 2, 6, 6, generator=g)
    s, s_next = SD3_T10[j].expand(batch), SD3_T10[j + 1].expand(batch)
    roll = sde_step(v_old, x, s, s_next, 0.7, "sde", generator=g, sigma_fallback=SD3_T10[1], return_mean=True)
    v = (v_old + scale * torch.randn(batch, 2, 6, 6, generator=g)).requires_grad_()
    out = sde_step(v, x, s, s_next, 0.7, "sde", prev_sample=roll.prev_sample, sigma_fallback=SD3_T10[1],
                   mean_old=roll.mean, return_mean=True)
    adv = torch.randn(batch, generator=g) * 2
    sigma_sde = out.std / (-(s_next - s)).sqrt()
    return x, v, roll, out, adv, sigma_sde, (-(s_next - s)).sqrt()


def guard_algo(batch_bias: bool, clip: float = 2e-6):
    algo = GRPO.__new__(GRPO)
    args = ["--rl.ratio_norm", "--rl.grad_reweight", "--rl.clip_range", str(clip)]
    algo.cfg = build_job_config(args + (["--rl.ratio_norm_batch_bias"] if batch_bias else []))
    return algo


@pytest.mark.parametrize("batch_bias", [False, True])
def test_guard_loss_and_gradient_match_the_reference_formulas(batch_bias):
    j = 7
    x, v, roll, out, adv, sigma_sde, sqrt_dt = guard_case(seed=1, j=j)
    batch = SimpleNamespace(trajectory=SimpleNamespace(sigmas=SD3_T10, log_probs=roll.log_prob.expand(10, -1).T),
                            advantages=adv)
    ours = guard_algo(batch_bias, clip=1.0).policy_loss(batch, j, out)  # wide clip: gradient flows
    (g_ours,) = torch.autograd.grad(ours.loss, v)
    v2 = v.detach().clone().requires_grad_()
    out2 = sde_step(v2, x, SD3_T10[j].expand(4), SD3_T10[j + 1].expand(4), 0.7, "sde",
                    prev_sample=roll.prev_sample, sigma_fallback=SD3_T10[1], return_mean=True)
    want, ratio = reference_guard_loss(out2.log_prob, roll.log_prob, out2.mean, roll.mean, sigma_sde, sqrt_dt,
                                       adv, 1.0, 5.0, batch_bias)
    (g_want,) = torch.autograd.grad(want, v2)
    print(f"batch_bias={batch_bias}: loss {ours.loss.item():.6g} vs {want.item():.6g}, "
          f"grad max abs diff {(g_ours - g_want).abs().max().item():.2e} (grad scale {g_want.abs().max().item():.2e})")
    torch.testing.assert_close(ours.loss, want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours.ratio, ratio.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g_ours, g_want, rtol=1e-4, atol=1e-6 * g_want.abs().max().item())
    # the reweight divides by |dt_j| exactly
    plain = GRPO.__new__(GRPO)
    plain.cfg = build_job_config(["--rl.ratio_norm", "--rl.clip_range", "1.0"]
                                 + (["--rl.ratio_norm_batch_bias"] if batch_bias else []))
    unweighted = plain.policy_loss(batch, j, out).loss
    torch.testing.assert_close(ours.loss * (SD3_T10[j] - SD3_T10[j + 1]), unweighted, rtol=1e-6, atol=0)


def test_per_sample_and_batch_bias_differ_as_documented():
    """Reference quirk: log ratio_i(batch) = log ratio_i(per sample) - S (b_i - mean b)."""
    j = 5
    _, _, roll, out, adv, sigma_sde, sqrt_dt = guard_case(seed=2, j=j, scale=1.0)
    batch = SimpleNamespace(trajectory=SimpleNamespace(sigmas=SD3_T10, log_probs=roll.log_prob.expand(10, -1).T),
                            advantages=adv)
    per_sample = guard_algo(False).policy_loss(batch, j, out).ratio.double().log()
    batch_wide = guard_algo(True).policy_loss(batch, j, out).ratio.double().log()
    b = out.ratio_bias.detach().double()
    torch.testing.assert_close(batch_wide, per_sample - out.std.double() * (b - b.mean()), rtol=0, atol=1e-6)
    assert (per_sample - batch_wide).abs().max() > 1e-5  # the quirk is visible on this data


def test_ratio_norm_removes_the_left_shift_of_a_biased_ratio():
    """x' = mu_old + S eps, mu_theta = mu_old + d: the raw ratio has mean exp(-E|d|^2 / 2S^2) < 1, the
    normalised ratio exp(mean(eps * d)) has mean 1 (up to its own sampling error)."""
    j, n = 8, 4096  # a low-noise step, where the shift is worst
    g = torch.Generator().manual_seed(3)
    s, s_next = SD3_T10[j].expand(n), SD3_T10[j + 1].expand(n)
    x, v_old = torch.randn(n, 4, 4, 4, generator=g), torch.randn(n, 4, 4, 4, generator=g)
    roll = sde_step(v_old, x, s, s_next, 0.7, "sde", generator=g, sigma_fallback=SD3_T10[1], return_mean=True)
    v = v_old + 0.5 * torch.randn(n, 4, 4, 4, generator=g)
    out = sde_step(v, x, s, s_next, 0.7, "sde", prev_sample=roll.prev_sample, sigma_fallback=SD3_T10[1],
                   mean_old=roll.mean, return_mean=True)
    raw = (out.log_prob - roll.log_prob).exp()
    normed = kernels.clipped_ratio_loss(out.log_prob, roll.log_prob, torch.zeros(n), 1.0, 1.0, 5.0,
                                        ratio_scale=out.std, ratio_bias=out.ratio_bias).ratio
    sem = normed.std().item() / math.sqrt(n)
    print(f"step {j}: raw ratio mean {raw.mean().item():.4f}, normalised mean {normed.mean().item():.8f} "
          f"(+- {sem:.1e})")
    assert raw.mean() < 0.9
    assert abs(normed.mean().item() - 1) < 4 * sem + 1e-7
    # on-policy the normalised ratio is exactly 1
    same = sde_step(v_old, x, s, s_next, 0.7, "sde", prev_sample=roll.prev_sample, sigma_fallback=SD3_T10[1],
                    mean_old=roll.mean)
    one = kernels.clipped_ratio_loss(same.log_prob, roll.log_prob, torch.ones(n), 1e-6, 1e-6, 5.0,
                                     ratio_scale=same.std, ratio_bias=same.ratio_bias).ratio
    assert torch.equal(one, torch.ones(n))


# ---------------------------------------------------------------------------------------------
# Tracker modes and DPO pairs


def test_tracker_modes_sft_and_dpo():
    rewards, keys = torch.tensor([1.0, 2, 3, 4, 5, 6]), list("abacba")
    sft, _ = compute_advantages(rewards, keys, global_std=False, mode="sft")
    assert sft.tolist() == [0, 0, 0, 1, 1, 1]
    dpo, _ = compute_advantages(rewards, keys, global_std=False, mode="dpo")
    assert dpo.tolist() == [-1, -1, 0, 0, 1, 1]  # a: best 6 (index 5) / worst 1 (index 0); c alone: no pair
    ties, _ = compute_advantages(torch.tensor([2.0, 2, 1, 3, 3]), list("aabbb"), global_std=False, mode="dpo")
    assert ties.tolist() == [0, 0, -1, 1, 0]  # all-equal group: no pair; tie at the top: first occurrence
    sft_ties, _ = compute_advantages(torch.tensor([2.0, 2, 1]), list("aab"), global_std=False, mode="sft")
    assert sft_ties.tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="advantage mode 'ppo'"):
        compute_advantages(rewards, keys, global_std=False, mode="ppo")
    assert preference_pairs(dpo, keys) == [(5, 0), (4, 1)]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_dpo_pairs_are_padded_and_split_evenly_over_ranks(world):
    keys = [f"p{i // 4}" for i in range(20)]  # 5 groups of 4
    rewards = torch.arange(20.0).flip(0)
    adv, _ = compute_advantages(rewards, keys, global_std=False, mode="dpo")
    pairs = preference_pairs(adv, keys)
    assert pairs == [(4 * g, 4 * g + 3) for g in range(5)]
    shares = []
    for rank in range(world):
        algo = FlowDPO.__new__(FlowDPO)
        algo.cfg = build_job_config(["--rl.algorithm", "dpo", "--sampling.num_batches_per_epoch", "2"])
        algo.dims = SimpleNamespace(world_size=world, rank=rank)
        algo.epoch_view = SimpleNamespace(advantages=adv, prompts=keys, keys=keys)
        mine, total = algo.my_pairs(epoch=3)
        assert total == 5
        shares.append(mine)
    sizes = {len(s) for s in shares}
    assert len(sizes) == 1 and sizes.pop() % 2 == 0  # equal shares, divisible by n_b
    union = [p for s in shares for p in s]
    assert set(union) == set(pairs) and len(union) == math.ceil(5 / (2 * world)) * 2 * world


# ---------------------------------------------------------------------------------------------
# Legacy Flow-GRPO-Fast: shared ODE prefix per prompt, branching at the window


class ToyVelocity(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Conv2d(3, 2, 3, padding=1)
        self.batch_sizes = []

    def forward(self, x, sigma, emb):
        self.batch_sizes.append(x.shape[0])
        t = sigma.view(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:])
        return self.net(torch.cat([x, t], 1)) + emb.view(-1, 1, 1, 1)


class ToyPolicy:
    def encode(self, prompts, images=None, model=None):
        return {"emb": torch.tensor([float(len(p)) for p in prompts]) / 10}

    def velocity(self, model, x, sigma, cond, guidance_scale):
        return model(x, sigma, cond["emb"])


def test_branched_fast_shares_the_prefix_and_rescored_window_is_on_policy():
    policy, model = ToyPolicy(), ToyVelocity()
    prompts = ["a", "bb", "a", "a", "bb"]
    distinct = ["a", "bb"]
    member_of = torch.tensor([0, 1, 0, 0, 1])
    sigmas = static_shift_sigmas(8, 3.0)
    window = (3, 5)
    levels = step_noise_levels(8, 0.8, window)
    x0 = torch.randn(2, 2, 6, 6, generator=torch.Generator().manual_seed(0))
    traj = sample_branched_trajectory(policy, model, policy.encode(prompts), policy.encode(distinct), x0, member_of,
                                      sigmas, levels, window, "cps", 1.0, generator=torch.Generator().manual_seed(1),
                                      return_means=True)
    assert model.batch_sizes == [2, 2, 2] + [5] * 5  # prefix on the 2 distinct prompts, then the whole group
    assert traj.latents.shape == (5, 9, 2, 6, 6) and traj.window == window
    lat = traj.latents
    for i, j in [(0, 2), (0, 3), (1, 4)]:
        assert torch.equal(lat[i, :4], lat[j, :4])  # identical up to the branch step x_3
        assert not torch.equal(lat[i, 4], lat[j, 4])  # independent SDE steps from there
    assert torch.isnan(traj.log_probs[:, [0, 1, 2, 5, 6, 7]]).all() and torch.isfinite(traj.log_probs[:, 3:5]).all()
    assert traj.means[:, [0, 1, 2, 5, 6, 7]].abs().sum() == 0 and traj.means[:, 3:5].abs().sum() > 0
    cond = policy.encode(prompts)
    for j in trained_steps(8, 0.99, window):  # re-score the window on the same batch layout: bitwise equal
        v = policy.velocity(model, lat[:, j], sigmas[j].expand(5), cond, 1.0)
        out = sde_step(v, lat[:, j], sigmas[j].expand(5), sigmas[j + 1].expand(5), levels[j], "cps",
                       prev_sample=lat[:, j + 1], sigma_fallback=sigmas[1], return_mean=True)
        assert torch.equal(out.log_prob, traj.log_probs[:, j])
        assert torch.equal(out.mean, traj.means[:, j])
    with pytest.raises(ValueError, match="before the branch step 3 must be deterministic"):
        sample_branched_trajectory(policy, model, cond, policy.encode(distinct), x0, member_of, sigmas,
                                   step_noise_levels(8, 0.8, None), window, "cps", 1.0)


# ---------------------------------------------------------------------------------------------
# Every algorithm end to end on the tiny debug SD3, FLUX and Qwen-Image (FLUX's guidance scale is its distilled
# guidance embedding: no CFG batch, and DPO/SFT keep it at the sampling value; Qwen-Image samples with true CFG
# and runs in the slow suite: the default suite trains the debug Qwen-Image in tests/test_qwen_image_recipes.py)

MODELS = ["sd3", "flux", pytest.param("qwen_image", marks=pytest.mark.slow)]


DEBUG_TOML = str(Path(__file__).resolve().parents[1] / "train_configs" / "debug_cpu.toml")
TINY = [
    "--job.config_file", DEBUG_TOML,
    "--model.name", "sd3", "--model.flavor", "debug", "--model.pretrained_path", "",
    "--model.resolution", "64", "--model.max_sequence_length", "16",
    "--sampling.num_steps", "6", "--sampling.num_image_per_prompt", "4", "--sampling.batch_size", "4",
    "--sampling.num_batches_per_epoch", "1", "--sampling.noise_level", "0.7", "--sampling.same_latent", "false",
    "--sampling.guidance_scale", "4.5", "--sampling.sde_window_size", "0",
    "--training.gradient_accumulation_steps", "1", "--training.ema", "true",
    "--optimizer.lr", "1e-3", "--rl.beta", "0", "--rl.clip_range", "1e-4",
    "--eval.freq", "0", "--checkpoint.enable", "false", "--metrics.image_log_freq", "0",
    "--metrics.enable_tensorboard", "false", "--reward.fns", "jpeg_compressibility=1.0",
]


def train_run(tmp_path, name, *extra, steps=2, model="sd3"):
    assert main([*TINY, "--model.name", model, "--job.output_dir", str(tmp_path), "--job.run_name", name,
                 "--training.steps", str(steps), *extra]) == 0
    lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    epochs = [json.loads(line) for line in lines]
    assert [m["step"] for m in epochs] == list(range(steps))
    for m in epochs:
        bad = {k: v for k, v in m.items() if k.startswith(("loss/", "dpo/")) and not math.isfinite(v)}
        assert not bad, bad
    return epochs


FAST_NOCFG = ["--sampling.sde_window_size", "2", "--sampling.sde_window_range", "0,4", "--sampling.sde_type", "cps",
              "--sampling.noise_level", "0.8", "--sampling.guidance_scale", "1", "--eval.guidance_scale", "1",
              "--rl.train_cfg", "false", "--rl.clip_range", "1e-5"]
GRPO_VARIANTS = {
    "grpo_kl": ["--rl.beta", "0.04"],
    "guard": ["--rl.ratio_norm", "--rl.grad_reweight", "--rl.clip_range", "2e-6", "--rl.beta", "0.04"],
    "fast_nocfg_cps": FAST_NOCFG,
    "fast_branch": ["--sampling.sde_window_size", "2", "--sampling.sde_window_range", "1,4",
                    "--sampling.branch_prefix"],
    "lora_kl": ["--lora.enable", "--lora.rank", "4", "--lora.alpha", "8", "--rl.beta", "0.04"],
}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("variant", sorted(GRPO_VARIANTS))
def test_grpo_variants_run_on_policy_with_their_metrics(tmp_path, variant, model):
    epochs = train_run(tmp_path, variant, *GRPO_VARIANTS[variant], model=model)
    for m in epochs:
        # n_b = 1, GA = 1: training re-scores the current policy's own data, the ratio is exactly 1
        assert m["ratio/min"] == 1.0 and m["ratio/max"] == 1.0, (variant, m["step"])
        assert m["loss/approx_kl"] == 0.0 and m["loss/clipfrac"] == 0.0
        assert math.isfinite(m["reward/jpeg_compressibility_mean"]) and math.isfinite(m["optim/grad_norm"])
        steps = sorted(int(k.split("/")[1].split("_")[0]) for k in m if k.startswith("ratio_per_step/")
                       and k.endswith("_mean"))
        assert all(m[f"clipfrac_per_step/{j}"] == 0.0 for j in steps)
        if "sde_window_size" in " ".join(GRPO_VARIANTS[variant]):
            start = m["sampling/window_start"]
            assert steps == [start, start + 1]  # only the window is trained
        else:
            assert steps == [0, 1, 2, 3, 4]  # floor(6 * 0.99) steps
    first, last = epochs[0], epochs[-1]
    if "--rl.beta" in GRPO_VARIANTS[variant]:
        assert first["loss/kl"] == 0.0 and last["loss/kl"] > 0  # the policy moved away from its reference
        assert "kl_per_step/0" in last
    if variant == "guard":
        assert all(f"raw_ratio_per_step/{j}_mean" in last for j in range(5))
        assert last["raw_ratio/min"] == 1.0 and last["raw_ratio/max"] == 1.0


def test_fast_trains_only_window_steps(tmp_path, monkeypatch):
    """Count the backward passes that reach each denoising step's log-prob: exactly the windows
    drawn from the run's stream (one per sampling round, shared by all ranks) and nothing else."""
    counts = Counter()
    original = GRPO.rescore

    def counting_rescore(self, batch, j, guidance):
        out = original(self, batch, j, guidance)
        out.log_prob.register_hook(lambda grad, j=j: counts.update([j]))
        return out

    monkeypatch.setattr(GRPO, "rescore", counting_rescore)
    epochs, rounds = 3, 2
    train_run(tmp_path, "fast_count", *FAST_NOCFG, "--sampling.num_batches_per_epoch", str(rounds),
              "--sampling.sde_window_range", "0,5", "--training.gradient_accumulation_steps", "2", steps=epochs)
    rng = random.Random(42)
    windows = [draw_sde_window(rng, 6, 2, (0, 5)) for _ in range(epochs * rounds)]
    expected = Counter(j for w in windows for j in range(*w))
    print(f"windows {windows}; backward passes per step {dict(sorted(counts.items()))}")
    assert counts == expected
    assert len(set(windows)) > 1  # rounds draw different windows


@pytest.mark.parametrize("model", MODELS)
def test_dpo_offline_and_online_with_lora(tmp_path, model):
    common = ["--lora.enable", "--lora.rank", "4", "--lora.alpha", "8", "--rl.dpo_beta", "100"]
    offline = train_run(tmp_path, "dpo", "--rl.algorithm", "dpo", *common, model=model)
    online = train_run(tmp_path, "online_dpo", "--rl.algorithm", "online_dpo", *common, model=model)
    log2 = math.log(2)
    for run in (offline, online):
        # epoch 0: policy == reference (fresh adapter), so every pair's logit is 0 and the loss is log 2
        assert abs(run[0]["loss/total"] - log2) < 1e-6 and run[0]["dpo/implicit_acc"] == 0.0
        assert run[0]["dpo/num_pairs"] == 1.0  # one group of 4 images per epoch
    # offline: the reference stays the initial model, the trained policy now differs from it
    assert abs(offline[1]["loss/total"] - log2) > 1e-4
    # online (interval 1): the reference took the policy's weights before epoch 1's rollouts
    assert abs(online[1]["loss/total"] - log2) < 1e-6 and online[1]["reference/steps_since_sync"] == 1
    # both sample epoch 0 with the initial model; at epoch 1 online samples with the updated policy
    assert offline[0]["reward/avg_mean"] == online[0]["reward/avg_mean"]
    assert offline[1]["reward/avg_mean"] != online[1]["reward/avg_mean"]


def test_online_dpo_full_finetune_syncs_the_frozen_copy(tmp_path):
    # rollouts with the CPS sampler: every algorithm takes sampling.sde_type
    run = train_run(tmp_path, "online_dpo_full", "--rl.algorithm", "online_dpo", "--rl.ref_update_interval", "2",
                    "--sampling.sde_type", "cps", "--sampling.noise_level", "0.8", steps=3)
    log2 = math.log(2)
    assert abs(run[0]["loss/total"] - log2) < 1e-6
    assert abs(run[1]["loss/total"] - log2) > 1e-4  # one step since the last sync (interval 2): no sync yet
    assert abs(run[2]["loss/total"] - log2) < 1e-6  # synced before epoch 2
    assert [m["reference/steps_since_sync"] for m in run] == [1, 2, 1]


@pytest.mark.parametrize("model", MODELS)
def test_sft_full_finetune_and_online_sft_lora(tmp_path, model, monkeypatch):
    from titan_flow.models.flux.pipeline import FluxPipeline
    from titan_flow.models.qwen_image.pipeline import QwenImagePipeline
    from titan_flow.models.sd3.pipeline import SD3Pipeline

    pipeline_cls = {"sd3": SD3Pipeline, "flux": FluxPipeline, "qwen_image": QwenImagePipeline}[model]
    scales, velocity = [], pipeline_cls.velocity
    monkeypatch.setattr(pipeline_cls, "velocity", lambda self, m, x, sigma, cond, g: (
        scales.append(g), velocity(self, m, x, sigma, cond, g))[1])
    sft = train_run(tmp_path, "sft", "--rl.algorithm", "sft", "--rl.beta", "100", model=model)
    # Rollouts sample with the guidance (4.5); the flow-matching loss runs without CFG, which for SD3 and Qwen-Image (true CFG) is scale 1
    # and for FLUX (a distilled guidance embedding, no CFG to drop) the same 4.5 input the rollouts had.
    assert set(scales) == ({4.5} if model == "flux" else {4.5, 1.0})
    online = train_run(tmp_path, "online_sft", "--rl.algorithm", "online_sft", "--rl.beta", "100",
                       "--lora.enable", "--lora.rank", "4", "--lora.alpha", "8", model=model)
    for run in (sft, online):
        assert run[0]["loss/kl"] == 0.0 and run[1]["loss/kl"] > 0  # KL to the initial model
        # one best image per group of 4 (continuous rewards): a quarter of the samples are fitted
        assert run[0]["sft/selected_fraction"] == 0.25
        assert run[0]["loss/fm_weighted"] <= run[0]["loss/fm"]
    assert "reference/steps_since_sync" in online[1] and "reference/steps_since_sync" not in sft[1]


def test_bad_algorithm_configs_name_the_field():
    cases = {
        ("--rl.ratio_norm", "--sampling.sde_type", "cps"): "rl.ratio_norm: .*sampling.sde_type = 'sde'",
        ("--rl.ratio_norm", "--rl.algorithm", "dpo"): "rl.ratio_norm / rl.grad_reweight .* need rl.algorithm",
        ("--rl.ratio_norm_batch_bias",): "rl.ratio_norm_batch_bias only applies",
        ("--sampling.branch_prefix", "--sampling.sde_window_size", "0"):
            r"sampling.branch_prefix \(legacy Fast\) .* sampling.sde_window_size > 0",
        ("--rl.train_cfg", "false", "--sampling.guidance_scale", "4.5"):
            "rl.train_cfg = false .*sampling.guidance_scale = 4.5",
        ("--rl.algorithm", "online_sft", "--rl.beta", "1"): "online_sft.*lora.enable = true",
        ("--rl.algorithm", "dpo", "--sampling.num_image_per_prompt", "1", "--sampling.batch_size", "1"):
            "num_image_per_prompt must be >= 2",
        ("--rl.ref_update_interval", "0"): "rl.ref_update_interval must be >= 1",
        ("--rl.algorithm", "awm", "--sampling.num_image_per_prompt", "1", "--sampling.batch_size", "1"):
            "'awm' compares the images of a group; sampling.num_image_per_prompt must be >= 2",
        ("--rl.algorithm", "awm", "--rl.fm_sigma_min", "1.0"): r"rl.fm_sigma_min must be in \[0, 1\), got 1.0",
        ("--rl.fm_sigma_min", "0.5"): "rl.fm_sigma_min = 0.5 shapes the flow-matching loss .* rl.algorithm = 'grpo'",
        ("--lora.enable", "--lora.target_modules", "[]"): "lora.target_modules must be a non-empty list",
        ("--rl.algorithm", "ppo"): "rl.algorithm: 'ppo' is not allowed",
    }
    for args, msg in cases.items():
        with pytest.raises(ConfigError, match=msg):
            build_job_config(list(args))


# ---------------------------------------------------------------------------------------------
# Advantage Weighted Matching: GRPO's advantages on the flow-matching loss of the policy's own rollouts


def test_awm_weights_the_flow_matching_loss_of_its_own_rollouts_by_the_clipped_group_advantages(tmp_path, monkeypatch):
    from titan_flow.rl.algorithms.awm import AdvantageWeightedMatching
    from titan_flow.rl.algorithms.sft import FlowSFT

    seen, original = [], FlowSFT.flow_matching_loss

    def recording(self, x0, cond, weights):
        loss, record = original(self, x0, cond, weights)
        seen.append((weights.clone(), self.epoch_advantages.clone(), loss.detach(), record["loss/fm_weighted"].detach()))
        return loss, record

    def keep_advantages(self, batches, epoch):
        self.epoch_advantages = torch.cat([b.advantages for b in batches])
        return train(self, batches, epoch)

    train = AdvantageWeightedMatching.train
    monkeypatch.setattr(FlowSFT, "flow_matching_loss", recording)
    monkeypatch.setattr(AdvantageWeightedMatching, "train", keep_advantages)
    run = train_run(tmp_path, "awm", "--rl.algorithm", "awm", "--rl.adv_clip_max", "0.5", "--sampling.guidance_scale", "1",
                    "--eval.guidance_scale", "1", steps=3)
    assert len(seen) == 3  # one training batch per epoch
    for weights, advantages, loss, weighted in seen:
        assert abs(advantages.sum().item()) < 1e-5  # one group of 4 per epoch: GRPO's advantages sum to 0 over it
        assert torch.equal(weights, advantages.clamp(-0.5, 0.5))  # clipped to adv_clip_max = 0.5
        assert loss == weighted  # no KL term at beta = 0: the loss is the weighted flow-matching error
    assert any((advantages.abs() > 0.5).any() for _, advantages, _, _ in seen)  # the clip did apply
    for m in run:
        assert math.isfinite(m["loss/fm"]) and "reference/steps_since_sync" not in m  # no reference copy
    cfg = build_job_config([*TINY, "--rl.algorithm", "awm"])
    assert not needs_frozen_copy(cfg)
    assert needs_frozen_copy(build_job_config([*TINY, "--rl.algorithm", "awm", "--rl.beta", "0.1"]))


def test_fm_sigma_min_draws_only_the_high_noise_levels():
    from titan_flow.rl.algorithms.awm import AdvantageWeightedMatching

    def draws(*args):
        algo = AdvantageWeightedMatching.__new__(AdvantageWeightedMatching)
        algo.cfg = build_job_config(["--rl.algorithm", "awm", *args])
        algo.policy = SimpleNamespace(sigmas=lambda n: static_shift_sigmas(n, 3.0))
        algo._sigma_grid, algo.noise_generator = None, torch.Generator().manual_seed(0)
        sigma, eps = algo.draw_noise(torch.zeros(4000, 3, 2, 2))
        assert eps.shape == (4000, 3, 2, 2)
        return sigma

    grid = static_shift_sigmas(1000, 3.0)[:-1]
    full, high = draws(), draws("--rl.fm_sigma_min", "0.6")
    assert (full < 0.6).float().mean() > 0.2  # logit-normal over the whole schedule
    assert high.min() >= 0.6 and high.max() == grid.max()
    # uniform over the levels >= 0.6: each quarter of them gets a quarter of the draws (5 binomial sigmas)
    levels = grid[grid >= 0.6]
    quarter = levels[len(levels) // 4]
    share = (high > quarter).float().mean().item()
    assert abs(share - 0.25) < 5 * math.sqrt(0.25 * 0.75 / 4000), share
