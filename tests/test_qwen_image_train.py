"""The debug Qwen-Image trained by the real trainer under torchrun on 2 gloo processes: Flow-GRPO with
true CFG, its rollouts re-scored on-policy (importance ratio exactly 1 at every step and rank), and the
two ranks' gradients reduced by FSDP2 (tests/test_parallel.py checks them against 1 process)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEBUG_QWEN = [
    "--model.name", "qwen_image", "--model.flavor", "debug", "--model.resolution", "64",
    "--model.max_sequence_length", "32", "--sampling.num_steps", "6", "--sampling.guidance_scale", "4.0",
    "--sampling.negative_prompt", " ", "--sampling.noise_level", "1.2", "--sampling.num_image_per_prompt", "4",
    "--sampling.batch_size", "4", "--sampling.num_batches_per_epoch", "1", "--training.gradient_accumulation_steps",
    "1", "--training.steps", "2", "--eval.freq", "0", "--checkpoint.enable", "false",
    "--metrics.enable_tensorboard", "false", "--metrics.image_log_freq", "0",
]


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
