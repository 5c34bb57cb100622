"""Side by side on the CPU, in one run: our backbones vs the diffusers classes, our GRPO epoch vs the
same work written the way the reference writes it, and where our epoch's time goes.

    OMP_NUM_THREADS=1 python -m titan_flow.bench.versus         # everything
    python -m titan_flow.bench.versus --only backbones --families sd3 --repeats 9
    python -m titan_flow.bench.versus --only epoch --epochs 5

Backbones: every ported family that diffusers also implements, at its two CPU configs, through the one
backbone harness (titan_flow/bench/backbone.py: same weights and inputs, alternated steps, median
time, peak memory per implementation in its own process, activations saved for backward).

Epoch: the debug SD3 GRPO job (train_configs/debug_cpu.toml: 8 images of 64 px, 8 steps, CFG 4.5,
7 trained steps, one process). Ours is the trainer itself; the reference way is a loop over diffusers'
SD3Transformer2DModel with the same weights: CFG by batch concat at each step, the SDE log-prob in
eager PyTorch, one forward per trained timestep, AdamW. The two alternate epoch by epoch (ours, the
reference way, ours, ...) after one warm-up epoch each, so machine load hits both alike; the median
epoch gives images/s for rollout (encode, denoise, decode, rewards) and training. The split of our
epochs (rollout forward, SDE/log-prob math, decode, rewards on their background thread, the time the
main thread still waits for them, re-score forward, backward, optimizer, collectives) comes from timers
wrapped around those calls.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from titan_flow.bench import backbone

REPO = Path(__file__).resolve().parents[2]
DEBUG_JOB = str(REPO / "train_configs" / "debug_cpu.toml")


# ------------------------------------------------------------------------------------------ backbones
def bench_backbones(families: list[str], repeats: int) -> list[dict]:
    rows = []
    for case in backbone.cases(families):
        results = backbone.compare(case, "cpu", "float32", repeats)
        print(backbone.report(results, repeats), flush=True)
        rows += [asdict(r) for r in results]
    return rows


# -------------------------------------------------------------------------------------------- epochs
EPOCH_ARGS = ["--job.config_file", DEBUG_JOB, "--metrics.enable_tensorboard", "false", "--metrics.image_log_freq", "0",
              "--eval.freq", "0", "--checkpoint.enable", "false", "--training.kernel_backend", "torch"]


class PhaseTimer:
    """Wall time per phase of the trainer's epoch, from wrappers around the calls that make each phase.

    `sync` (e.g. torch.cuda.synchronize) runs before and after each timed call, so asynchronous device
    work is charged to the call that queued it. While `paused`, nothing is counted.
    """

    def __init__(self, sync: Callable[[], None] | None = None):
        self.seconds: dict[str, float] = defaultdict(float)
        self.sync = sync or (lambda: None)
        self.paused = False
        self._patches: list[tuple[object, str, object]] = []

    def wrap(self, owner, name: str, phase: Callable[[], str | None] | str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            label = phase() if callable(phase) else phase
            if self.paused or label is None:
                return original(*args, **kwargs)
            self.sync()
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.sync()
                self.seconds[label] += time.perf_counter() - start

        self._patches.append((owner, name, original))
        setattr(owner, name, timed)

    def restore(self) -> None:
        for owner, name, original in reversed(self._patches):
            setattr(owner, name, original)
        self._patches.clear()


@contextmanager
def timed_phases(timer: PhaseTimer, after_epoch: Callable[[int], None] | None = None):
    """Phase timers around the trainer's calls; the first epoch (first-call costs) is not counted, and
    `after_epoch(epoch)` runs after each of our epochs with the timer paused."""
    import torch.distributed as dist

    import titan_flow.rl.algorithms.base as base
    import titan_flow.rl.algorithms.grpo as grpo
    import titan_flow.rl.rollout as rollout
    from titan_flow.models.sd3.pipeline import SD3Pipeline
    from titan_flow.rewards.multi import MultiReward

    def forward_phase() -> str:
        return "re-score forward" if torch.is_grad_enabled() else "rollout forward"

    def main_thread(label: str) -> Callable[[], str | None]:
        return lambda: label if threading.current_thread() is threading.main_thread() else None

    timer.wrap(SD3Pipeline, "velocity", forward_phase)
    timer.wrap(SD3Pipeline, "decode", "decode")
    timer.wrap(SD3Pipeline, "encode", "encode prompts")
    timer.wrap(rollout, "sde_step", "rollout SDE step + log-prob")
    timer.wrap(grpo, "sde_step", "re-score log-prob")
    timer.wrap(MultiReward, "__call__", "rewards (background thread)")
    timer.wrap(Future, "result", main_thread("waiting for rewards (not overlapped)"))
    timer.wrap(torch.Tensor, "backward", "backward")
    timer.wrap(base, "clip_grad_norm", "grad-norm clip")
    timer.wrap(torch.optim.AdamW, "step", "AdamW step")
    for collective in ("all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor",
                       "reduce_scatter_tensor", "broadcast"):
        timer.wrap(dist, collective, "collectives (outside FSDP's own)")
    real_run_epoch = base.OnlineAlgorithm.run_epoch
    epochs_run = []

    def run_epoch(algo, epoch):
        if len(epochs_run) == 1:  # the warm-up epoch (first-call costs, allocator growth) is not counted
            timer.seconds.clear()
        epochs_run.append(epoch)
        result = real_run_epoch(algo, epoch)
        if after_epoch is not None:
            timer.paused = True
            try:
                after_epoch(epoch)
            finally:
                timer.paused = False
        return result

    timer._patches.append((base.OnlineAlgorithm, "run_epoch", real_run_epoch))
    base.OnlineAlgorithm.run_epoch = run_epoch
    try:
        yield timer
    finally:
        timer.restore()


def reference_sde_step(v, x, sigmas, j: int, noise_level: float, generator=None, prev=None):
    """The reference's sde_step_with_logprob: everything upcast to fp32, sigma_max in place of 1 - sigma at
    sigma = 1, the log-prob's mean over all non-batch dims. Returns (x_{j+1}, log_prob (B,))."""
    v, x = v.float(), x.float()
    sigma, sigma_next = sigmas[j].float(), sigmas[j + 1].float()
    dt = sigma_next - sigma
    std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigmas[1].float(), sigma))) * noise_level
    mean = x * (1 + std_dev_t**2 / (2 * sigma) * dt) + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    if prev is None:
        noise = torch.randn(x.shape, generator=generator, device=generator.device if generator else x.device)
        prev = mean + std_dev_t * torch.sqrt(-dt) * noise.to(x.device)
    std = std_dev_t * torch.sqrt(-dt)
    log_prob = -((prev.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
    return prev, log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def reference_velocity(transformer, x, sigma, cond: dict, guidance_scale: float):
    """The reference's transformer call: CFG by batch concat of [negative; positive], guided in fp32."""
    latent_in = torch.cat([x, x]).to(transformer.dtype)
    timestep = (sigma.float() * 1000).expand(latent_in.shape[0])
    noise_pred = transformer(
        hidden_states=latent_in, timestep=timestep,
        encoder_hidden_states=torch.cat([cond["negative_prompt_embeds"], cond["prompt_embeds"]]).to(transformer.dtype),
        pooled_projections=torch.cat([cond["negative_pooled_prompt_embeds"],
                                      cond["pooled_prompt_embeds"]]).to(transformer.dtype),
        return_dict=False)[0].float()
    uncond, text = noise_pred.chunk(2)
    return uncond + guidance_scale * (text - uncond)


@torch.no_grad()
def reference_rollout(transformer, cond: dict, x, sigmas, noise_level: float, guidance_scale: float, generator):
    """The reference's pipeline_with_logprob loop: (latents x_0..x_T, log-probs per step)."""
    latents, log_probs = [x.float()], []
    for j in range(len(sigmas) - 1):
        x, lp = reference_sde_step(reference_velocity(transformer, latents[-1], sigmas[j], cond, guidance_scale),
                                   latents[-1], sigmas, j, noise_level, generator)
        latents.append(x)
        log_probs.append(lp)
    return latents, log_probs


class ReferenceWay:
    """The debug job's GRPO epoch written as the reference writes it, on diffusers' SD3 transformer holding
    the trainer's initial weights (the same random init: same seed, same flavor)."""

    def __init__(self):
        from diffusers import SD3Transformer2DModel

        from titan_flow.config import build_job_config
        from titan_flow.models import get_model_spec
        from titan_flow.models.sd3.pipeline import SD3Pipeline
        from titan_flow.rewards import MultiReward

        self.cfg = cfg = build_job_config(EPOCH_ARGS)
        spec = get_model_spec("sd3")
        torch.manual_seed(cfg.job.seed)
        ours = spec.build(cfg.model.flavor)
        self.transformer = SD3Transformer2DModel(**asdict(spec.args(cfg.model.flavor)))
        self.transformer.load_state_dict(spec.to_diffusers(ours.state_dict()))
        self.pipe = SD3Pipeline.load("", device="cpu", resolution=cfg.model.resolution,
                                     max_sequence_length=cfg.model.max_sequence_length, seed=cfg.job.seed)
        o = cfg.optimizer
        self.optimizer = torch.optim.AdamW(self.transformer.parameters(), lr=o.lr, betas=(o.beta1, o.beta2),
                                           weight_decay=o.weight_decay, eps=o.eps)
        self.reward = MultiReward(cfg.reward.fns, {}, "cpu")
        self.sigmas = self.pipe.sigmas(cfg.sampling.num_steps).double()
        self.generator = torch.Generator().manual_seed(0)

    def epoch(self, epoch: int) -> dict[str, float]:
        from titan_flow.data.prompts import DEBUG_PROMPTS

        s, rl = self.cfg.sampling, self.cfg.rl
        start = time.perf_counter()
        prompts = [DEBUG_PROMPTS[(epoch + i // s.num_image_per_prompt) % len(DEBUG_PROMPTS)] for i in range(s.batch_size)]
        self.transformer.eval()
        with torch.no_grad():
            cond = self.pipe.encode(prompts)
            x0 = self.pipe.initial_noise(len(prompts), self.generator)
            latents, log_probs = reference_rollout(self.transformer, cond, x0, self.sigmas, s.noise_level,
                                                   s.guidance_scale, self.generator)
            images = self.pipe.decode(latents[-1])
        scores = self.reward(images, prompts, [{}] * len(prompts))["avg"]
        advantages = (scores - scores.mean()) / (scores.std() + 1e-4)
        rollout_s = time.perf_counter() - start
        start = time.perf_counter()
        self.transformer.train()
        trained = range(max(1, math.floor(s.num_steps * rl.timestep_fraction)))
        for j in trained:
            v = reference_velocity(self.transformer, latents[j], self.sigmas[j], cond, s.guidance_scale)
            _, lp = reference_sde_step(v, latents[j], self.sigmas, j, s.noise_level, prev=latents[j + 1])
            ratio = torch.exp(lp - log_probs[j])
            unclipped = -advantages * ratio
            clipped = -advantages * torch.clamp(ratio, 1 - rl.clip_range, 1 + rl.clip_range)
            (torch.maximum(unclipped, clipped).mean() / len(trained)).backward()
        torch.nn.utils.clip_grad_norm_(self.transformer.parameters(), self.cfg.optimizer.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"perf/rollout_s": rollout_s, "perf/train_s": time.perf_counter() - start}

    def close(self) -> None:
        self.reward.close()


def alternated_epochs(epochs: int, out_dir: Path, extra_args: list[str] = ()) -> tuple[list[dict], list[dict], dict]:
    """1 + `epochs` epochs of the trainer, each followed by one reference-way epoch (the phase timers paused).
    Returns (our per-epoch metrics, the reference way's, our phase split), warm-up epochs dropped."""
    from titan_flow import train

    reference = ReferenceWay()
    theirs: list[dict] = []
    timer = PhaseTimer()
    args = [*EPOCH_ARGS, *extra_args, "--job.output_dir", str(out_dir), "--job.run_name", "ours",
            "--training.steps", str(1 + epochs)]
    try:
        with timed_phases(timer, after_epoch=lambda epoch: theirs.append(reference.epoch(epoch))):
            train.main(args)
    finally:
        reference.close()
    rows = [json.loads(line) for line in (out_dir / "ours" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "perf/step_s" in r][1:], theirs[1:], dict(timer.seconds)


def bench_epoch(epochs: int) -> dict:
    from titan_flow.config import build_job_config

    batch = build_job_config(EPOCH_ARGS).sampling.batch_size
    with tempfile.TemporaryDirectory(prefix="titan_flow_versus_") as scratch:
        ours, reference, split = alternated_epochs(epochs, Path(scratch))
    result = {"epochs": epochs, "images_per_epoch": batch}
    for phase in ("rollout", "train"):
        mine = [r[f"perf/{phase}_s"] for r in ours]
        theirs = [r[f"perf/{phase}_s"] for r in reference]
        ours_ips, ref_ips = batch / statistics.median(mine), batch / statistics.median(theirs)
        result[phase] = {"ours_images_per_s": ours_ips, "reference_images_per_s": ref_ips,
                         "ours_seconds": mine, "reference_seconds": theirs}
        print(f"GRPO epoch {phase}: ours {ours_ips:.1f} images/s vs the reference way {ref_ips:.1f} images/s = "
              f"{ours_ips / ref_ips:.2f}x as fast (median of {epochs} alternated epochs; per epoch ours "
              f"{min(mine):.2f}-{max(mine):.2f} s, reference way {min(theirs):.2f}-{max(theirs):.2f} s)", flush=True)
    print(f"where our epochs' time goes ({epochs} epochs after the warm-up; rewards are scored on a background "
          "thread, overlapping the next rollout; the main thread's wait for them is its own line):")
    for phase, seconds in sorted(split.items(), key=lambda kv: -kv[1]):
        print(f"  {phase:40s} {seconds:8.3f} s")
    result["split_seconds"] = split
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m titan_flow.bench.versus", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=["backbones", "epoch"], help="run one part (default: both)")
    p.add_argument("--families", default=",".join(backbone.ported_families()),
                   help=f"backbone families (of {', '.join(backbone.ported_families())})")
    p.add_argument("--repeats", type=int, default=7, help="timed fwd+bwd per implementation (median)")
    p.add_argument("--epochs", type=int, default=5, help="measured GRPO epochs per side (after one warm-up)")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    families = [f for f in args.families.split(",") if f]
    unknown = sorted(set(families) - set(backbone.ported_families()))
    if unknown:
        p.error(f"--families: {unknown} have no ported diffusers counterpart here; choose from "
                f"{', '.join(backbone.ported_families())}")
    figures = {"threads": torch.get_num_threads()}
    if args.only in (None, "backbones"):
        figures["backbones"] = bench_backbones(families, args.repeats)
    if args.only in (None, "epoch"):
        figures["epoch"] = bench_epoch(args.epochs)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
