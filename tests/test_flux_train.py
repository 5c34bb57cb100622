"""The debug FLUX and the debug FLUX.1-Kontext under the real trainer and torchrun (gloo, CPU): on-policy
GRPO's importance ratio is exactly 1 at 1 and 2 ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--model.name", "flux", "--model.resolution", "64", "--model.max_sequence_length", "16",
    "--sampling.num_steps", "4", "--sampling.num_image_per_prompt", "4", "--sampling.batch_size", "4",
    "--sampling.num_batches_per_epoch", "1", "--sampling.guidance_scale", "3.5", "--sampling.noise_level", "0.9",
    "--training.gradient_accumulation_steps", "1", "--training.ema_update_interval", "1",
    "--metrics.enable_tensorboard", "false", "--metrics.image_log_freq", "0", "--checkpoint.enable", "false",
    "--eval.freq", "0", "--reward.fns", "jpeg_compressibility=1.0",
]


def torchrun(nproc: int, args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "titan_flow.train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("nproc", [1, 2])
def test_grpo_on_the_debug_flux_is_on_policy(tmp_path, nproc):
    proc = torchrun(nproc, [*TINY, "--training.steps", "2", "--job.output_dir", str(tmp_path), "--job.run_name", "t2i"])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    epochs = read_metrics(tmp_path / "t2i")
    assert [m["step"] for m in epochs] == [0, 1]
    for m in epochs:  # one sampling round, one update per epoch: training re-scores its own rollouts
        assert m["ratio/min"] == 1.0 and m["ratio/max"] == 1.0 and m["loss/approx_kl"] == 0.0
        assert sorted(int(k.split("/")[1].split("_")[0]) for k in m if k.startswith("ratio_per_step/")
                      and k.endswith("_mean")) == [0, 1, 2]  # floor(4 x 0.99) trained steps
    assert epochs[0]["optim/grad_norm"] > 0
