"""Side by side on the CPU, in one run: our backbones vs the diffusers classes, our GRPO epoch vs the
same work written the way the reference writes it, and where our epoch's time goes.

    python -m titan_flow.bench.versus                         # everything
    python -m titan_flow.bench.versus --only backbones --families sd3 --repeats 9
    python -m titan_flow.bench.versus --only epoch --epochs 3

Backbones: every family with a diffusers class, at two small configs; ours and diffusers' get the same
random weights and inputs. Time: median of `--repeats` fwd+bwd (loss = mean square of the output)
taken in interleaved order (ours, diffusers, ours, ...), so machine load hits both alike. Peak memory:
the growth of the resident set (VmHWM, reset before the step) over one fwd+bwd, each implementation
alone in a fresh subprocess (in one process the allocator would reuse the other's freed memory).

Epoch: the debug SD3 GRPO job (8 prompts x 8 steps, CFG 4.5, 64 px, one process). Ours is the trainer
itself; the reference way is a loop over diffusers' SD3Transformer2DModel with the same weights: CFG by
batch concat at each step, the SDE log-prob in eager PyTorch, one forward per trained timestep, AdamW.
Both are timed per epoch (median over `--epochs` after a warm-up epoch) and reported in images/s for
rollout and training. The split of our epoch (rollout forward, SDE/log-prob math, decode, rewards in
their background thread, re-score forward, backward, optimizer, collectives) comes from timers wrapped
around those calls during our epochs.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

MIB = 2**20


# ------------------------------------------------------------------------------------------ backbones
@dataclass(frozen=True)
class BackboneCase:
    """One family at one config: `build()` -> (ours, diffusers' (returning the output tensor), inputs)."""

    family: str
    config: str
    build: Callable[[], tuple[nn.Module, nn.Module, dict]]

    @property
    def label(self) -> str:
        return f"{self.family} {self.config}"


class ReturnsTensor(nn.Module):
    """A diffusers model behind our backbones' call signature (keyword inputs in, the output tensor out)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, **inputs):
        return self.model(**inputs, return_dict=False)[0]


def _sd3_case(name: str, config: dict, batch: int, side: int, text: int) -> BackboneCase:
    def build():
        from diffusers import SD3Transformer2DModel

        from titan_flow.models import get_model_spec
        from titan_flow.models.sd3 import SD3Args

        torch.manual_seed(0)
        reference = SD3Transformer2DModel(**config)
        spec = get_model_spec("sd3")
        ours = spec.model_cls(SD3Args(**config))
        ours.load_state_dict(spec.from_diffusers(reference.state_dict()))
        g = torch.Generator().manual_seed(1)
        inputs = dict(
            hidden_states=torch.randn(batch, config["in_channels"], side, side, generator=g),
            encoder_hidden_states=torch.randn(batch, text, config["joint_attention_dim"], generator=g),
            pooled_projections=torch.randn(batch, config["pooled_projection_dim"], generator=g),
            timestep=torch.rand(batch, generator=g) * 1000,
        )
        return ours, ReturnsTensor(reference), inputs

    tokens = (side // config["patch_size"]) ** 2
    width = config["num_attention_heads"] * config["attention_head_dim"]
    return BackboneCase("sd3", f"{name} (width {width}, {config['num_layers']} blocks, {tokens}+{text} tokens, "
                               f"batch {batch})", build)


def sd3_cases() -> list[BackboneCase]:
    common = dict(sample_size=32, patch_size=2, in_channels=16, out_channels=16, pos_embed_max_size=32,
                  pooled_projection_dim=64, joint_attention_dim=128)
    small = dict(common, num_layers=4, attention_head_dim=32, num_attention_heads=4, caption_projection_dim=128,
                 dual_attention_layers=(0, 1), qk_norm="rms_norm")
    wide = dict(common, num_layers=4, attention_head_dim=64, num_attention_heads=6, caption_projection_dim=384,
                dual_attention_layers=(), qk_norm=None)
    return [_sd3_case("sd3.5-shaped", small, batch=2, side=32, text=32),
            _sd3_case("sd3-shaped", wide, batch=2, side=32, text=64)]


# family -> its cases; a family that diffusers implements registers its two configs here.
BACKBONES: dict[str, Callable[[], list[BackboneCase]]] = {"sd3": sd3_cases}


def fwd_bwd(model: nn.Module, inputs: dict) -> None:
    model.zero_grad(set_to_none=True)
    model(**inputs).float().square().mean().backward()


def time_interleaved(models: dict[str, nn.Module], inputs: dict, repeats: int) -> dict[str, float]:
    """Median seconds of one fwd+bwd per model, the models taking turns so load drifts hit all alike."""
    for model in models.values():
        fwd_bwd(model, inputs)  # warm-up
    times = defaultdict(list)
    for _ in range(repeats):
        for name, model in models.items():
            start = time.perf_counter()
            fwd_bwd(model, inputs)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _vm_hwm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM line")


def peak_growth_here(family: str, index: int, which: str) -> int:
    """In this (fresh) process: bytes the resident set grows by over one fwd+bwd of one implementation."""
    ours, reference, inputs = BACKBONES[family]()[index].build()
    model = ours if which == "ours" else reference
    del ours, reference
    fwd_bwd(model, inputs)  # lazily created state (grads, caches) belongs to the baseline
    model.zero_grad(set_to_none=False)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand the warm-up's freed activations back to the OS
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    before = _vm_hwm_bytes()
    fwd_bwd(model, inputs)
    return _vm_hwm_bytes() - before


def peak_growth(family: str, index: int, which: str) -> int:
    cmd = [sys.executable, "-m", "titan_flow.bench.versus", "--_peak", f"{family}:{index}:{which}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return int(out.strip().splitlines()[-1])


def bench_backbones(families: list[str], repeats: int) -> list[dict]:
    rows = []
    for family in families:
        for index, case in enumerate(BACKBONES[family]()):
            ours, reference, inputs = case.build()
            with torch.no_grad():
                diff = (ours(**inputs) - reference(**inputs)).abs().max().item()
            seconds = time_interleaved({"ours": ours, "diffusers": reference}, inputs, repeats)
            memory = {which: peak_growth(family, index, which) for which in ("ours", "diffusers")}
            rows.append({"case": case.label, "max_abs_diff": diff, "seconds": seconds, "peak_bytes": memory})
            print(f"{case.label}: fwd+bwd ours {seconds['ours'] * 1e3:.1f} ms vs diffusers "
                  f"{seconds['diffusers'] * 1e3:.1f} ms = {seconds['ours'] / seconds['diffusers']:.2f}x; peak growth "
                  f"ours {memory['ours'] / MIB:.0f} MiB vs {memory['diffusers'] / MIB:.0f} MiB = "
                  f"{memory['ours'] / max(memory['diffusers'], 1):.2f}x (outputs agree to {diff:.1e})", flush=True)
    return rows


# -------------------------------------------------------------------------------------------- epochs
EPOCH_ARGS = ["--metrics.enable_tensorboard", "false", "--metrics.image_log_freq", "0", "--eval.freq", "0",
              "--checkpoint.enable", "false", "--training.kernel_backend", "torch"]


class PhaseTimer:
    """Wall time per phase of the trainer's epoch, from wrappers around the calls that make each phase."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self._patches: list[tuple[object, str, object]] = []

    def wrap(self, owner, name: str, phase: Callable[[], str] | str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[phase() if callable(phase) else phase] += time.perf_counter() - start

        self._patches.append((owner, name, original))
        setattr(owner, name, timed)

    def restore(self) -> None:
        for owner, name, original in reversed(self._patches):
            setattr(owner, name, original)
        self._patches.clear()


@contextmanager
def timed_phases(timer: PhaseTimer):
    import torch.distributed as dist

    import titan_flow.rl.algorithms.base as base
    import titan_flow.rl.algorithms.grpo as grpo
    import titan_flow.rl.rollout as rollout
    from titan_flow.models.sd3.pipeline import SD3Pipeline
    from titan_flow.rewards.multi import MultiReward

    def forward_phase() -> str:
        return "re-score forward" if torch.is_grad_enabled() else "rollout forward"

    timer.wrap(SD3Pipeline, "velocity", forward_phase)
    timer.wrap(SD3Pipeline, "decode", "decode")
    timer.wrap(SD3Pipeline, "encode", "encode prompts")
    timer.wrap(rollout, "sde_step", "rollout SDE step + log-prob")
    timer.wrap(grpo, "sde_step", "re-score log-prob")
    timer.wrap(MultiReward, "__call__", "rewards (background thread)")
    timer.wrap(torch.Tensor, "backward", "backward")
    timer.wrap(base, "clip_grad_norm", "grad-norm clip")
    timer.wrap(torch.optim.AdamW, "step", "AdamW step")
    epochs_started = []
    real_run_epoch = base.OnlineAlgorithm.run_epoch

    def run_epoch(algo, epoch):
        if len(epochs_started) == 1:  # the warm-up epoch (first-call costs: DTensor dispatch caches) is not counted
            timer.seconds.clear()
        epochs_started.append(epoch)
        return real_run_epoch(algo, epoch)

    timer._patches.append((base.OnlineAlgorithm, "run_epoch", real_run_epoch))
    base.OnlineAlgorithm.run_epoch = run_epoch
    for collective in ("all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor",
                       "reduce_scatter_tensor", "broadcast"):
        timer.wrap(dist, collective, "collectives (outside FSDP's own)")
    try:
        yield timer
    finally:
        timer.restore()


def our_epochs(epochs: int, out_dir: Path) -> tuple[list[dict], dict[str, float]]:
    """The trainer on the debug job for 1 + `epochs` epochs; per-epoch metrics and the phase split."""
    from titan_flow import train

    timer = PhaseTimer()
    args = [*EPOCH_ARGS, "--job.output_dir", str(out_dir), "--job.run_name", "ours", "--training.steps",
            str(1 + epochs)]
    with timed_phases(timer):
        train.main(args)
    rows = [json.loads(line) for line in (out_dir / "ours" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "perf/step_s" in r][1:], dict(timer.seconds)


def reference_style_epochs(epochs: int) -> list[dict[str, float]]:
    """The same GRPO epochs written as the reference writes them, on diffusers' transformer."""
    from diffusers import SD3Transformer2DModel

    from titan_flow.config import build_job_config
    from titan_flow.data.prompts import DEBUG_PROMPTS
    from titan_flow.models import get_model_spec
    from titan_flow.models.sd3.pipeline import SD3Pipeline
    from titan_flow.rewards import MultiReward

    cfg = build_job_config(EPOCH_ARGS)
    s, rl = cfg.sampling, cfg.rl
    spec = get_model_spec("sd3")
    torch.manual_seed(cfg.job.seed)
    ours = spec.build(cfg.model.flavor)
    transformer = SD3Transformer2DModel(**asdict(spec.args(cfg.model.flavor)))
    transformer.load_state_dict(spec.to_diffusers(ours.state_dict()))
    pipe = SD3Pipeline.load("", device="cpu", resolution=cfg.model.resolution,
                            max_sequence_length=cfg.model.max_sequence_length, seed=cfg.job.seed)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay)
    reward = MultiReward(cfg.reward.fns, {}, "cpu")
    sigmas = pipe.sigmas(s.num_steps).double()
    generator = torch.Generator().manual_seed(0)

    def sde_step_with_logprob(v, x, j, prev=None):
        # as the reference: everything upcast to fp32, sigma_max fallback at sigma = 1, mean over all dims
        v, x = v.float(), x.float()
        sigma, sigma_next = sigmas[j].float(), sigmas[j + 1].float()
        dt = sigma_next - sigma
        std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigmas[1].float(), sigma))) * s.noise_level
        mean = x * (1 + std_dev_t**2 / (2 * sigma) * dt) + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
        if prev is None:
            prev = mean + std_dev_t * torch.sqrt(-dt) * torch.randn(x.shape, generator=generator)
        std = std_dev_t * torch.sqrt(-dt)
        log_prob = -((prev.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
        return prev, log_prob.mean(dim=tuple(range(1, log_prob.ndim)))

    def velocity(x, j, cond):
        latent_in = torch.cat([x, x])
        timestep = (sigmas[j].float() * 1000).expand(latent_in.shape[0])
        noise_pred = transformer(hidden_states=latent_in, timestep=timestep,
                                 encoder_hidden_states=torch.cat([cond["negative_prompt_embeds"], cond["prompt_embeds"]]),
                                 pooled_projections=torch.cat([cond["negative_pooled_prompt_embeds"],
                                                               cond["pooled_prompt_embeds"]]),
                                 return_dict=False)[0]
        uncond, text = noise_pred.chunk(2)
        return uncond + s.guidance_scale * (text - uncond)

    rows = []
    trained = range(max(1, math.floor(s.num_steps * rl.timestep_fraction)))
    for epoch in range(1 + epochs):
        start = time.perf_counter()
        prompts = [DEBUG_PROMPTS[(epoch + i // s.num_image_per_prompt) % len(DEBUG_PROMPTS)]
                   for i in range(s.batch_size)]
        transformer.eval()
        with torch.no_grad():
            cond = pipe.encode(prompts)
            x = pipe.initial_noise(len(prompts), generator)
            latents, log_probs = [x], []
            for j in range(s.num_steps):
                x, lp = sde_step_with_logprob(velocity(x, j, cond), x, j)
                latents.append(x)
                log_probs.append(lp)
            images = pipe.decode(x)
        scores = reward(images, prompts, [{}] * len(prompts))["avg"]
        advantages = (scores - scores.mean()) / (scores.std() + 1e-4)
        rollout_s = time.perf_counter() - start
        start = time.perf_counter()
        transformer.train()
        for j in trained:
            _, lp = sde_step_with_logprob(velocity(latents[j], j, cond), latents[j], j, prev=latents[j + 1])
            ratio = torch.exp(lp - log_probs[j])
            unclipped = -advantages * ratio
            clipped = -advantages * torch.clamp(ratio, 1 - rl.clip_range, 1 + rl.clip_range)
            (torch.maximum(unclipped, clipped).mean() / len(trained)).backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), cfg.optimizer.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        rows.append({"perf/rollout_s": rollout_s, "perf/train_s": time.perf_counter() - start})
    reward.close()
    return rows[1:]


def bench_epoch(epochs: int) -> dict:
    from titan_flow.config import build_job_config

    batch = build_job_config(EPOCH_ARGS).sampling.batch_size
    with tempfile.TemporaryDirectory(prefix="titan_flow_versus_") as scratch:
        ours, split = our_epochs(epochs, Path(scratch))
    reference = reference_style_epochs(epochs)
    result = {}
    for phase in ("rollout", "train"):
        mine = statistics.median(r[f"perf/{phase}_s"] for r in ours)
        theirs = statistics.median(r[f"perf/{phase}_s"] for r in reference)
        result[phase] = {"ours_images_per_s": batch / mine, "reference_images_per_s": batch / theirs}
        print(f"GRPO epoch {phase}: ours {batch / mine:.1f} images/s vs the reference way {batch / theirs:.1f} "
              f"images/s = {theirs / mine:.2f}x as fast", flush=True)
    print(f"where our epochs' time goes ({epochs} epochs after the warm-up; the reward thread overlaps the next "
          "rollout):")
    for phase, seconds in sorted(split.items(), key=lambda kv: -kv[1]):
        print(f"  {phase:40s} {seconds:8.3f} s")
    result["split_seconds"] = split
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m titan_flow.bench.versus", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=["backbones", "epoch"], help="run one part (default: both)")
    p.add_argument("--families", default=",".join(BACKBONES), help=f"backbone families (of {', '.join(BACKBONES)})")
    p.add_argument("--repeats", type=int, default=7, help="timed fwd+bwd per implementation (median)")
    p.add_argument("--epochs", type=int, default=3, help="measured GRPO epochs per side (after one warm-up)")
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("--_peak", help=argparse.SUPPRESS)  # family:index:which, run in a fresh subprocess
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args._peak:
        family, index, which = args._peak.split(":")
        print(peak_growth_here(family, int(index), which))
        return 0
    families = [f for f in args.families.split(",") if f]
    unknown = sorted(set(families) - set(BACKBONES))
    if unknown:
        p.error(f"--families: {unknown} have no diffusers counterpart here; choose from {', '.join(BACKBONES)}")
    torch.manual_seed(0)
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
