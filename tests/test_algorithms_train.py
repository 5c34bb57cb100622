"""Flow-GRPO-Fast learns: the debug job (train_configs/debug_cpu.toml, 2 gloo processes) with a 2-step
SDE window, the rest ODE, only the window trained. The GRPO counterpart is tests/test_train_debug.py.

The window sits in the low-noise half, steps [4, 8) of 8: on this tiny random model the JPEG size is
set by the last steps, and windows drawn from [0, 6) made the reward fall (rise -4.2 x noise over
100 epochs) while [4, 8) rises 9.2 x noise (seed 42) and 115 x noise (seed 7); the real SD3 recipes
keep the reference's high-noise windows.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from test_train_debug import reward_rise

REPO = Path(__file__).resolve().parents[1]


def test_fast_window_training_raises_the_debug_reward(tmp_path):
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "titan_flow.train",
           "--job.config_file", str(REPO / "train_configs" / "debug_cpu.toml"), "--job.output_dir", str(tmp_path),
           "--job.run_name", "fast", "--sampling.sde_window_size", "2", "--sampling.sde_window_range", "4,8",
           "--eval.freq", "0", "--checkpoint.enable", "false", "--metrics.image_log_freq", "0"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    epochs = [json.loads(line) for line in (tmp_path / "fast" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in epochs] == list(range(100))
    for m in epochs:
        start = m["sampling/window_start"]
        assert start in (4, 5, 6)
        trained = sorted(int(k.split("/")[1].split("_")[0]) for k in m if k.startswith("ratio_per_step/")
                         and k.endswith("_mean"))
        assert trained == [start, start + 1]  # only the window's steps are trained
        assert m["ratio/min"] == 1.0 and m["ratio/max"] == 1.0  # one round, one update: on-policy
    assert len({m["sampling/window_start"] for m in epochs}) == 3
    rise, noise, summary = reward_rise([m["reward/avg_mean"] for m in epochs])
    print(f"Fast: {summary}; {time.perf_counter() - t0:.0f} s")
    assert rise > 4 * noise
    # the same scalars reach TensorBoard: the window position and the per-step ratio/clipfrac diagnostics
    (events,) = (tmp_path / "fast" / "tb").glob("events.out.tfevents.*")
    tags = set(EventAccumulator(str(events), size_guidance={"scalars": 0}).Reload().Tags()["scalars"])
    assert {"sampling/window_start", "reward/jpeg_compressibility_mean", "ratio_per_step/4_mean",
            "ratio_per_step/4_std", "clipfrac_per_step/6", "loss/clipfrac"} <= tags
