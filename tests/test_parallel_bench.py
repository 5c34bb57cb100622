"""titan_flow.bench: per-rank throughput/peak memory under torchrun, and the memory model's counts and formula."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from titan_flow.bench.backbone import ported_families
from titan_flow.bench.memory import FAMILIES, GIB, Counts, count, per_gpu

REPO = Path(__file__).resolve().parents[1]


def test_bench_prints_peak_memory_and_images_per_s_per_rank():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "titan_flow.bench", "--warmup", "1", "--epochs", "1", "--sampling.num_steps", "4",
           "--job.config_file", str(REPO / "train_configs" / "debug_cpu.toml")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    for rank in (0, 1):
        (rss,) = re.findall(rf"\[bench\] rank {rank}: peak RSS ([\d.]+) GiB \(CPU\)", proc.stdout)
        assert 0.1 < float(rss) < 8
    (line,) = re.findall(r"\[bench\] sd3/debug: 1 measured epochs: ([\d.]+) images/s per rank .* world size 2",
                         proc.stdout)
    assert float(line) > 0


# Parameter counts of the published checkpoints (reference/backbones.md, counted from their files).
PUBLISHED = {"SD3.5-Medium": 2_243_171_520, "FLUX.1-dev": 11_901_408_320, "Qwen-Image": 20_430_401_088,
             "Wan2.1-T2V-1.3B": 1_418_996_800, "Wan2.1-T2V-14B": 14_288_491_584}


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_counts_match_the_published_models(family):
    c = count(family)
    if family.name in PUBLISHED:
        assert c.total == PUBLISHED[family.name] and c.full_trainable == c.total
    else:  # Bagel: 14.607 B in ema.safetensors incl. the 2 position tables; the gen expert trains
        assert abs(c.total - 14.58e9) < 0.01e9 and abs(c.full_trainable - 6.526e9) < 0.001e9
    assert 0 < c.lora_trainable < 0.05 * c.full_trainable
    assert c.largest_block < c.total / 20 and 0 < c.root < c.total


def test_encoder_counts():
    by_name = {f.name: count(f) for f in FAMILIES}
    clip_l, clip_g, t5, vae = 123_650_304, 694_659_840, 4_762_310_656, 83_819_683
    assert by_name["SD3.5-Medium"].encoders == clip_l + clip_g + t5 and by_name["SD3.5-Medium"].vae == vae
    assert by_name["FLUX.1-dev"].encoders == clip_l - 768 * 768 + t5  # CLIPTextModel: no text projection
    assert by_name["Qwen-Image"].encoders == 8_292_166_656  # Qwen2.5-VL-7B-Instruct
    assert by_name["Bagel-7B-MoT"].encoders == 0  # its own LLM encodes the prompt
    for wan in ("Wan2.1-T2V-1.3B", "Wan2.1-T2V-14B"):  # UMT5-XXL's encoder and the Wan VAE (notes 4.4, 4.5)
        assert by_name[wan].encoders == 5_680_910_336 and by_name[wan].vae == 126_892_531


def test_per_gpu_formula():
    c = Counts(total=1000, full_trainable=600, lora_trainable=10, largest_block=50, root=20, encoders=100, vae=5)
    full = per_gpu(c, lora=False, gpus=4, master="float32", compute="bfloat16", encoder="bfloat16", vae="float32")
    assert full["trained state"] * GIB == pytest.approx(600 * (4 + 4 + 8 + 4) / 4)
    assert full["frozen weights"] * GIB == pytest.approx(400 * 4 / 4)
    assert full["gathered"] * GIB == pytest.approx((2 * 50 + 20) * 2)
    assert full["encoders + VAE"] * GIB == pytest.approx(100 * 2 + 5 * 4)
    lora = per_gpu(c, lora=True, gpus=4, master="bfloat16", ema=False)
    assert lora["trained state"] * GIB == pytest.approx(10 * (2 + 2 + 8) / 4)
    assert lora["frozen weights"] * GIB == pytest.approx(1000 * 2 / 4)


@pytest.mark.slow
@pytest.mark.parametrize("family", ported_families())
def test_backbone_bench_prints_ours_and_diffusers_side_by_side(family):
    """`python -m titan_flow.bench --backbone FAMILY`: both implementations measured in one run at the small
    config; the times and peak memory are printed, not asserted (speed is measured, never a pass/fail criterion)."""
    cmd = [sys.executable, "-m", "titan_flow.bench", "--backbone", family, "--configs", "small", "--iters", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    print(proc.stdout)
    rows = {name: (float(ms), float(saved)) for name, ms, saved in re.findall(
        r"\[bench\]   (ours|diffusers) +([\d.]+) ms .* peak +-?[\d.]+ MiB +saved for backward +([\d.]+) MiB",
        proc.stdout)}
    assert set(rows) == {"ours", "diffusers"} and all(ms > 0 for ms, _ in rows.values())
    # the activations kept for backward are a property of the graph, not of the machine: ours keeps no more
    assert 0 < rows["ours"][1] <= rows["diffusers"][1]
    assert re.search(r"ours / diffusers: time [\d.]+x, peak memory [\d.]+x, saved for backward [\d.]+x", proc.stdout)
