"""The embedded debug job end to end under torchrun (2 gloo processes), and the sample CLI.

One run of train_configs/debug_cpu.toml (= the defaults, ~2-3 min on 2 cores) feeds several tests:
the reward rises, the on-policy ratio is exactly 1, eval, checkpoints and TensorBoard are written,
and its checkpoint samples images.
"""

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from titan_flow.config import build_job_config, to_dict

REPO = Path(__file__).resolve().parents[1]
DEBUG_TOML = REPO / "train_configs" / "debug_cpu.toml"


def torchrun(nproc: int, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "titan_flow.train", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def reward_rise(rewards: list[float], window: int = 10) -> tuple[float, float, str]:
    """Mean of the last `window` epochs minus the first `window`, the standard error of that difference
    (the noise), and a line saying both."""
    first, last = rewards[:window], rewards[-window:]
    rise = statistics.mean(last) - statistics.mean(first)
    noise = math.sqrt(statistics.pvariance(first) / window + statistics.pvariance(last) / window)
    return rise, noise, (f"mean reward first {window} epochs {statistics.mean(first):.5f}, last {window} "
                         f"{statistics.mean(last):.5f}, rise {rise:.5f} = {rise / noise:.1f} x noise")


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def debug_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("outputs")
    proc = torchrun(2, "--job.config_file", str(DEBUG_TOML), "--job.output_dir", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out / "debug_cpu"


def test_defaults_are_the_debug_job():
    defaults = to_dict(build_job_config([]))
    spelled_out = to_dict(build_job_config(["--job.config_file", str(DEBUG_TOML)]))
    spelled_out["job"]["config_file"] = ""
    assert defaults == spelled_out


def test_debug_job_reward_rises(debug_run):
    epochs = [m for m in read_metrics(debug_run) if "reward/avg_mean" in m]
    assert [m["step"] for m in epochs] == list(range(100))
    rise, noise, summary = reward_rise([m["reward/avg_mean"] for m in epochs])
    print(summary)
    assert rise > 4 * noise


def test_on_policy_ratio_is_exactly_one(debug_run):
    # one sampling round and one update per epoch: training re-scores the current policy's own data
    for m in read_metrics(debug_run):
        if "ratio/min" in m:
            assert m["ratio/min"] == 1.0 and m["ratio/max"] == 1.0, m["step"]
            assert m["loss/approx_kl"] == 0.0 and m["loss/clipfrac"] == 0.0


def test_debug_job_writes_eval_checkpoints_and_tensorboard(debug_run):
    evals = [m for m in read_metrics(debug_run) if "eval/reward_avg" in m]
    assert [m["step"] for m in evals] == [0, 25, 50, 75]
    assert all(m["eval/num_prompts"] == 16 for m in evals)
    ckpt = debug_run / "checkpoint"
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-00000050", "step-00000075", "step-00000100"]
    assert (ckpt / "step-00000100" / "COMPLETE").is_file()
    assert list((debug_run / "tb").glob("events.out.tfevents.*"))
    config = json.loads((debug_run / "config.json").read_text())
    assert config["sampling"]["same_latent"] is True


def run_sample(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "titan_flow.sample", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def test_sample_from_the_runs_checkpoint(debug_run, tmp_path):
    common = ["--run", str(debug_run), "--prompt", "a red cube", "--prompt", "a blue car", "--steps", "4",
              "--device", "cpu"]
    ema = run_sample(*common, "--out", str(tmp_path / "ema"))
    assert ema.returncode == 0, ema.stderr[-3000:]
    raw = run_sample(*common, "--raw", "--out", str(tmp_path / "raw"))
    assert raw.returncode == 0, raw.stderr[-3000:]
    ema_png, raw_png = sorted((tmp_path / "ema").glob("*.png")), sorted((tmp_path / "raw").glob("*.png"))
    assert [p.name for p in ema_png] == ["0000_a_red_cube.png", "0001_a_blue_car.png"]
    first = np.asarray(Image.open(ema_png[0]))
    assert first.shape == (64, 64, 3)
    assert not np.array_equal(first, np.asarray(Image.open(raw_png[0])))  # EMA and raw weights differ


def test_sample_from_a_pretrained_pipeline_directory(tmp_path):
    from titan_flow.models.sd3.pipeline import build_tiny_sd3_pipeline_dir

    pipe = build_tiny_sd3_pipeline_dir(tmp_path / "pipe", seed=3)
    args = ["--pretrained_path", str(pipe), "--prompt", "a lighthouse", "--steps", "3", "--resolution", "64",
            "--device", "cpu", "--seed", "7"]
    a = run_sample(*args, "--out", str(tmp_path / "a"))
    assert a.returncode == 0, a.stderr[-3000:]
    b = run_sample(*args, "--out", str(tmp_path / "b"))
    c = run_sample(*args, "--noise_level", "0.7", "--out", str(tmp_path / "c"))
    assert b.returncode == 0 and c.returncode == 0, (b.stderr + c.stderr)[-3000:]
    img = [np.asarray(Image.open(next((tmp_path / d).glob("*.png")))) for d in "abc"]
    assert np.array_equal(img[0], img[1])  # same seed, same image
    assert not np.array_equal(img[0], img[2])  # SDE noise changes it


def test_sample_errors(tmp_path):
    out = run_sample("--prompt", "x", "--run", str(tmp_path / "nowhere"))
    assert out.returncode != 0 and "config.json does not exist" in out.stderr
    out = run_sample("--pretrained_path", str(tmp_path))
    assert out.returncode != 0 and "no prompts" in out.stderr


def test_bad_config_fails_fast_naming_the_field(tmp_path):
    proc = torchrun(1, "--sampling.sde_type", "ddim", "--job.output_dir", str(tmp_path), timeout=120)
    assert proc.returncode != 0
    assert "sampling.sde_type: 'ddim' is not allowed; choose one of 'sde', 'cps'" in proc.stderr
