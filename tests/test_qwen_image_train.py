"""The debug Qwen-Image trained by the real trainer under torchrun on 2 gloo processes: Flow-GRPO with
true CFG, its rollouts re-scored on-policy (importance ratio exactly 1 at every step and rank), and the
two ranks' gradients reduced by FSDP2 (tests/test_parallel.py checks them against 1 process)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEBUG_QWEN = [
    "--model.name", "qwen_image", "--model.flavor", "debug", "--model.resolution", "64",
    "--model.max_sequence_length", "32", "--sampling.num_steps", "6", "--sampling.guidance_scale", "4.0",
    "--sampling.negative_prompt", " ", "--sampling.noise_level", "1.2", "--sampling.num_image_per_prompt", "4",
    "--sampling.batch_size", "4", "--sampling.num_batches_per_epoch", "1", "--training.gradient_accumulation_steps",
    "1", "--training.steps", "2", "--eval.freq", "0", "--checkpoint.enable", "false",
    "--metrics.enable_tensorboard", "false", "--metrics.image_log_freq", "0",
]


@pytest.mark.slow
def test_grpo_on_two_gloo_ranks_is_on_policy(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "titan_flow.train",
           *DEBUG_QWEN, "--job.output_dir", str(tmp_path), "--job.run_name", "qwen2"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    epochs = [json.loads(line) for line in (tmp_path / "qwen2" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in epochs] == [0, 1]
    for m in epochs:
        # one round and one update per epoch: training re-scores the current policy's own data on both ranks
        assert m["ratio/min"] == 1.0 and m["ratio/max"] == 1.0, m
        assert m["loss/approx_kl"] == 0.0 and m["loss/clipfrac"] == 0.0
        assert sorted(int(k.split("/")[1].split("_")[0]) for k in m if k.startswith("ratio_per_step/")
                      and k.endswith("_mean")) == [0, 1, 2, 3, 4]  # floor(6 * 0.99) SDE steps trained
    assert epochs[1]["optim/grad_norm"] > 0


# Qwen-Image-Edit on 2 ranks through the trainer's own builders (FSDP2-sharded backbone, the tiny edit-capable
# pipeline): each rank edits its own source images, samples an SDE rollout and re-scores it with grad.
EDIT_SCRIPT = r"""
import sys
import torch
from titan_flow.config import build_job_config
from titan_flow.distributed.utils import destroy_distributed, init_distributed
from titan_flow.rl.rollout import sample_trajectory, step_noise_levels
from titan_flow.rl.sde import sde_step
from titan_flow.train import build_model, build_policy

cfg = build_job_config(sys.argv[1:])
dims = init_distributed(cfg)
policy = build_policy(cfg, dims.device)
model = build_model(cfg, dims, trainable=True)
g = torch.Generator().manual_seed(100 + dims.rank)
images = [torch.rand(3, 48, 80, generator=g) for _ in range(2)]
cond = policy.encode([f"make the {w} red" for w in ("cat", "car")], images=images)
T, level, guidance = cfg.sampling.num_steps, cfg.sampling.noise_level, cfg.sampling.guidance_scale
sigmas, levels = policy.sigmas(T), step_noise_levels(T, level, None)
model.eval()
traj = sample_trajectory(policy, model, cond, policy.initial_noise(2, g), sigmas, levels, "sde", guidance, generator=g)
model.train()
ratios = []
for j in range(T - 1):
    x = traj.latents[:, j]
    v = policy.velocity(model, x, sigmas[j].expand(2), cond, guidance)
    out = sde_step(v, x, sigmas[j].expand(2), sigmas[j + 1].expand(2), levels[j], "sde",
                   prev_sample=traj.latents[:, j + 1], sigma_fallback=sigmas[1])
    ratios.append(torch.exp(out.log_prob - traj.log_probs[:, j]))
    out.log_prob.mean().backward()
ratios = torch.stack(ratios)
print(f"RANK {dims.rank} ratios equal to 1: {bool(torch.equal(ratios, torch.ones_like(ratios)))}; "
      f"condition tokens {cond['image_latents'].shape}; grad {sum(p.grad.abs().sum().item() for p in model.parameters() if p.grad is not None) > 0}",
      flush=True)
destroy_distributed()
"""


def test_edit_rollout_rescored_on_two_gloo_ranks_is_on_policy(tmp_path):
    """Until the editing data loader reaches the trainer, the edit policy's rollout/re-score runs here with the
    trainer's builders: on both ranks the importance ratio of every SDE step is exactly 1."""
    script = tmp_path / "edit_ratio.py"
    script.write_text(EDIT_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script),
           *DEBUG_QWEN[:-4], "--sampling.noise_level", "1.0"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    # the ranks' lines may interleave on the shared stdout
    found = sorted(re.findall(r"RANK (\d) ratios equal to 1: (\w+); condition tokens (torch.Size\(\[[\d, ]*\]\)); "
                              r"grad (\w+)", proc.stdout))
    print(found)
    assert found == [(str(r), "True", "torch.Size([2, 4, 8, 12])", "True") for r in (0, 1)]
