"""Throughput and peak memory of a training config, per rank.

    python -m titan_flow.bench [--warmup 1] [--epochs 3] [--job.config_file X.toml --section.key value ...]
    torchrun --nproc-per-node 8 -m titan_flow.bench --job.config_file train_configs/sd3_pickscore.toml
    python -m titan_flow.bench --backbone wan      # our backbone vs diffusers': fwd+bwd time, peak memory
    python -m titan_flow.bench --backbone flux

Runs the real trainer for warmup + measured epochs (no checkpoints, no eval, no TensorBoard) and
prints, for every rank, its peak memory (CUDA: allocated and reserved by the caching allocator;
CPU: the process's peak resident set) and, from rank 0, the rollout and end-to-end images/s per
rank over the measured epochs (the trainer's own perf/ timings, in metrics.jsonl). The memory the
parameters and optimizer state need by construction is printed by `python -m titan_flow.bench.memory`.
`--backbone NAME` instead compares our backbone with diffusers' at one small config, side by side:
forward + backward time and peak memory (titan_flow/bench/backbone.py).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from titan_flow import train
from titan_flow.config import build_job_config

GIB = 2**30


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="python -m titan_flow.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--warmup", type=int, default=1, help="epochs run before measuring (allocator, compile warm-up)")
    p.add_argument("--epochs", type=int, default=3, help="measured epochs")
    args, trainer_args = p.parse_known_args(argv)
    if args.warmup < 0 or args.epochs < 1:
        p.error(f"--warmup must be >= 0 and --epochs >= 1, got {args.warmup} and {args.epochs}")
    return args, trainer_args


def peak_memory(device: torch.device) -> str:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # Linux reports KiB
    if device.type == "cuda":
        allocated = torch.cuda.max_memory_allocated(device) / GIB
        reserved = torch.cuda.max_memory_reserved(device) / GIB
        return f"peak CUDA allocated {allocated:.2f} GiB, reserved {reserved:.2f} GiB; peak host RSS {rss:.2f} GiB"
    return f"peak RSS {rss:.2f} GiB (CPU)"


def throughput(run_dir: Path, warmup: int, world_size: int) -> str:
    epochs = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "perf/step_s" in r]
    measured = [r for r in epochs if r["step"] >= warmup]
    rollout = statistics.mean(r["perf/rollout_images_per_s"] for r in measured) / world_size
    total = statistics.mean(r["perf/images_per_s"] for r in measured) / world_size
    step = statistics.mean(r["perf/step_s"] for r in measured)
    return (f"{len(measured)} measured epochs: {total:.3g} images/s per rank end to end "
            f"(rollout alone {rollout:.3g}), {step:.3g} s per epoch, world size {world_size}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a == "--backbone" or a.startswith("--backbone=") for a in argv):
        from titan_flow.bench import backbone

        return backbone.main(argv)
    args, trainer_args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="titan_flow_bench_") as scratch:
        trainer_args = [
            *trainer_args, "--job.output_dir", scratch, "--job.run_name", "bench",
            "--training.steps", str(args.warmup + args.epochs), "--checkpoint.enable", "false",
            "--eval.freq", "0", "--metrics.enable_tensorboard", "false", "--metrics.image_log_freq", "0",
            "--metrics.log_freq", "1",
        ]
        cfg = build_job_config(trainer_args)
        rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        train.main(trainer_args)
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() \
            and cfg.training.device != "cpu" else torch.device("cpu")
        print(f"[bench] rank {rank}: {peak_memory(device)}", flush=True)
        if rank == 0:
            print(f"[bench] {cfg.model.name}/{cfg.model.flavor or cfg.model.pretrained_path}: "
                  f"{throughput(Path(scratch) / 'bench', args.warmup, world_size)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
