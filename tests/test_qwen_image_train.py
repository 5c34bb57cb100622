"""The debug Qwen-Image and Qwen-Image-Edit trained by the real trainer (in process, and under torchrun on 2
gloo processes): Flow-GRPO with true CFG, its rollouts re-scored on-policy (importance ratio exactly 1 at every
step and rank), the two ranks' gradients reduced by FSDP2 (tests/test_parallel.py checks them against 1
process); editing reads the shared counting-edit set through the data loader."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_flux_train import EPOCHS, assert_on_policy, assert_restart_matches_straight, kill_in_save_and_restart

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


# --------------------------------------------------------------------------- Qwen-Image-Edit, end to end

EDIT_DEBUG = REPO / "train_configs" / "qwen_image_edit_debug_cpu.toml"
EDIT_SHORT = ["--job.config_file", str(EDIT_DEBUG), "--training.steps", "2", "--checkpoint.enable", "false"]


def test_edit_debug_job_trains_on_policy_with_the_counting_edit_reward(tmp_path):
    """train_configs/qwen_image_edit_debug_cpu.toml at 1 rank, in process: the built-in counting-edit set's
    source images (drawn in 2 loader workers) condition Qwen2.5-VL and the backbone, the reward compares each
    edit with its source (image_similarity, the counting-edit reward's CLIP part; tiny random CLIP), GRPO's
    ratio is exactly 1 on the 5 SDE steps, and the TensorBoard grids show source | edit."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_rewards_models import tiny_clip_dir

    from titan_flow.train import main

    clip = tiny_clip_dir(tmp_path / "clip")
    assert main([*EDIT_SHORT, "--job.output_dir", str(tmp_path), "--job.run_name", "edit",
                 "--reward.fns", "image_similarity=0.2,jpeg_compressibility=0.8",
                 "--reward.model_paths", f"image_similarity={clip}", "--metrics.image_log_freq", "1",
                 "--eval.freq", "0"]) == 0
    epochs = [json.loads(line) for line in (tmp_path / "edit" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in epochs] == [0, 1]
    assert_on_policy(epochs, [0, 1, 2, 3, 4])
    assert all(m["optim/grad_norm"] > 0 for m in epochs)
    for m in epochs:
        assert -1 <= m["reward/image_similarity_mean"] <= 1 and m["reward/image_similarity_std"] > 0
    (events,) = (tmp_path / "edit" / "tb").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"images": 0}).Reload()
    first = acc.Images("rollout/images")[0]  # 4 [source | edit] tiles of 64 x 128 over a 28-pixel caption strip
    assert (first.width, first.height) == (4 * 128, 64 + 28)


@pytest.mark.slow
def test_edit_debug_job_on_two_gloo_ranks_is_on_policy(tmp_path):
    """The same job at 2 ranks (FSDP2, each rank its own source images): the ratio is exactly 1 on both."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "titan_flow.train",
           *EDIT_SHORT, "--eval.freq", "0", "--metrics.enable_tensorboard", "false",
           "--job.output_dir", str(tmp_path), "--job.run_name", "edit2"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    epochs = [json.loads(line) for line in (tmp_path / "edit2" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in epochs] == [0, 1]
    assert_on_policy(epochs, [0, 1, 2, 3, 4])
    assert all(m["optim/grad_norm"] > 0 for m in epochs)


# --------------------------------------------------------------------------- Qwen-Image-Edit: kill and resume


@pytest.mark.slow
def test_edit_resume_after_kill_is_bitwise(tmp_path):
    """Resume of the 20B family's path (meta build, FSDP2, true CFG, Qwen2.5-VL vision tokens, the loader's
    workers), the Qwen-Image-Edit debug job with an EMA killed in a save and restarted: it logs what the
    straight run logged and ends with the same state, bit for bit."""
    base = ["--job.config_file", str(EDIT_DEBUG), "--job.output_dir", str(tmp_path), "--training.steps", str(EPOCHS),
            "--eval.freq", "2", "--eval.max_prompts", "4", "--metrics.enable_tensorboard", "false",
            "--checkpoint.keep_latest_k", "0", "--training.ema", "true", "--training.ema_update_interval", "1"]
    assert_restart_matches_straight(tmp_path, *kill_in_save_and_restart(tmp_path, base))
