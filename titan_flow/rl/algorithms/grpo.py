"""Flow-GRPO: one epoch = rollouts of n_b batches -> rewards -> group advantages -> clipped-ratio updates.

Training batch b re-scores rollout batch b with the same composition and the same `velocity` call,
so with n_b = 1 and no accumulation the importance ratio is exactly 1. Rewards of a batch are
scored in the background while the next batch is sampled.
"""

from __future__ import annotations

import random
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

import kernels
from titan_flow.config import JobConfig
from titan_flow.distributed.utils import ParallelDims, all_gather_object, all_gather_tensor, clip_grad_norm
from titan_flow.rewards import masked_mean
from titan_flow.rl.advantage import compute_advantages
from titan_flow.rl.metrics import StepStats
from titan_flow.rl.rollout import Trajectory, draw_sde_window, prompt_seed, sample_trajectory, step_noise_levels, trained_steps
from titan_flow.rl.sde import sde_step


@dataclass
class RolloutBatch:
    prompts: list[str]
    metadata: list[dict]
    cond: dict
    trajectory: Trajectory
    images: torch.Tensor
    pending_rewards: Future
    rewards: dict[str, torch.Tensor] | None = None
    advantages: torch.Tensor | None = None


@dataclass
class EpochResult:
    scalars: dict[str, float] = field(default_factory=dict)
    images: torch.Tensor | None = None
    captions: list[str] = field(default_factory=list)


class GRPO:
    def __init__(self, cfg: JobConfig, dims: ParallelDims, policy, model, ref_model, optimizer, ema, reward_fn,
                 dataset, sampler, noise_generator: torch.Generator):
        self.cfg, self.dims = cfg, dims
        self.policy, self.model, self.ref_model = policy, model, ref_model
        self.optimizer, self.ema = optimizer, ema
        self.reward_fn, self.dataset, self.sampler = reward_fn, dataset, sampler
        self.noise_generator = noise_generator
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.global_step = 0  # optimizer updates so far
        # Fast windows come from the run's seeded stream, identical on all ranks, so a group shares its window.
        self.window_rng = random.Random(cfg.job.seed)
        self.window: tuple[int, int] | None = None

    # ------------------------------------------------------------------ rollout
    def _initial_latents(self, prompts: list[str], epoch: int, round_index: int) -> torch.Tensor:
        if not self.cfg.sampling.same_latent:
            return self.policy.initial_noise(len(prompts), self.noise_generator)
        gens = [torch.Generator(device="cpu").manual_seed(prompt_seed(p, epoch, round_index)) for p in prompts]
        return self.policy.initial_noise(len(prompts), gens)

    def collect(self, epoch: int) -> list[RolloutBatch]:
        s = self.cfg.sampling
        sigmas = self.policy.sigmas(s.num_steps)
        self.window = draw_sde_window(self.window_rng, s.num_steps, s.sde_window_size, tuple(s.sde_window_range))
        levels = step_noise_levels(s.num_steps, s.noise_level, self.window)
        self.model.eval()
        batches = []
        bar = tqdm(total=s.num_batches_per_epoch * s.num_steps, desc=f"epoch {epoch} rollout",
                   disable=not self.dims.is_main, leave=False)
        for r in range(s.num_batches_per_epoch):
            items = [self.dataset[i] for i in next(self.sampler)]
            prompts = [p for p, _ in items]
            metadata = [m for _, m in items]
            with torch.no_grad():
                cond = self.policy.encode(prompts, model=self.model)
            x0 = self._initial_latents(prompts, epoch, r)
            traj = sample_trajectory(self.policy, self.model, cond, x0, sigmas, levels, s.sde_type, s.guidance_scale,
                                     generator=self.noise_generator, progress=bar)
            with torch.no_grad():
                images = self.policy.decode(traj.latents[:, -1])
            pending = self.reward_fn.submit(images, prompts, metadata)
            batches.append(RolloutBatch(prompts, metadata, cond, traj, images, pending))
        bar.close()
        for b in batches:
            b.rewards = {k: v.to(self.dims.device) for k, v in b.pending_rewards.result().items()}
        return batches

    def assign_advantages(self, batches: list[RolloutBatch]) -> dict[str, float]:
        """Gather every rank's rewards and prompts, normalise per prompt group, keep this rank's slice."""
        rl = self.cfg.rl
        scalars = {}
        gathered = {}
        for key in batches[0].rewards:
            gathered[key] = all_gather_tensor(torch.cat([b.rewards[key].float() for b in batches]))
            scalars[f"reward/{key}_mean"] = masked_mean(gathered[key])  # GenEval's per-task keys hold -10 entries
        for key in ["avg", *self.cfg.reward.fns]:
            scalars[f"reward/{key}_std"] = gathered[key].std(unbiased=False).item()
        all_prompts = [p for rank_prompts in all_gather_object([p for b in batches for p in b.prompts]) for p in rank_prompts]
        adv, stats = compute_advantages(gathered["avg"].cpu(), all_prompts, rl.global_std, rl.per_prompt_stat_tracking)
        mine = adv.view(self.dims.world_size, -1)[self.dims.rank].to(self.dims.device)
        for b, chunk in zip(batches, mine.split([len(b.prompts) for b in batches])):
            b.advantages = chunk
        scalars.update({f"advantage/{k}": float(v) for k, v in stats.items()})
        return scalars

    # ------------------------------------------------------------------ training
    def rescore(self, batch: RolloutBatch, j: int, guidance: float):
        """Log-prob of the stored step j under the current model (with grad), plus the KL term when beta > 0."""
        traj = batch.trajectory
        n = len(batch.prompts)
        x = traj.latents[:, j]
        sigma, sigma_next = traj.sigmas[j].expand(n), traj.sigmas[j + 1].expand(n)
        v = self.policy.velocity(self.model, x, sigma, batch.cond, guidance)
        v_ref = None
        if self.ref_model is not None:
            with torch.no_grad():
                v_ref = self.policy.velocity(self.ref_model, x, sigma, batch.cond, guidance)
        return sde_step(v, x, sigma, sigma_next, traj.noise_levels[j], self.cfg.sampling.sde_type,
                        prev_sample=traj.latents[:, j + 1], sigma_fallback=traj.sigmas[1], v_ref=v_ref)

    def optimizer_step(self) -> torch.Tensor:
        grad_norm = clip_grad_norm(self.trainable, self.cfg.optimizer.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        if self.ema is not None:
            self.ema.step(self.global_step)
        return grad_norm

    def train(self, batches: list[RolloutBatch], epoch: int) -> dict[str, float]:
        cfg, rl = self.cfg, self.cfg.rl
        steps = trained_steps(cfg.sampling.num_steps, rl.timestep_fraction, self.window)
        ga = cfg.training.gradient_accumulation_steps
        guidance = cfg.sampling.guidance_scale if rl.train_cfg else 1.0
        stats = StepStats()
        grad_norms = []
        self.model.train()
        bar = tqdm(total=rl.num_inner_epochs * len(batches) * len(steps), desc=f"epoch {epoch} train",
                   disable=not self.dims.is_main, leave=False)
        for _ in range(rl.num_inner_epochs):
            for b, batch in enumerate(batches):
                for j in steps:
                    out = self.rescore(batch, j, guidance)
                    pl = kernels.clipped_ratio_loss(out.log_prob, batch.trajectory.log_probs[:, j], batch.advantages,
                                                    rl.clip_range, rl.clip_range, rl.adv_clip_max)
                    loss = pl.loss
                    if out.kl is not None:
                        loss = loss + rl.beta * out.kl.mean()
                    (loss / (ga * len(steps))).backward()
                    stats.add(j, pl, loss.detach(), out.kl)
                    bar.update(1)
                if (b + 1) % ga == 0:
                    grad_norms.append(self.optimizer_step())
        bar.close()
        scalars = stats.reduce(self.dims)
        scalars["optim/grad_norm"] = torch.stack(grad_norms).float().mean().item()
        scalars["optim/lr"] = self.optimizer.param_groups[0]["lr"]
        scalars["optim/global_step"] = self.global_step
        return scalars

    def run_epoch(self, epoch: int) -> EpochResult:
        t0 = time.perf_counter()
        batches = self.collect(epoch)
        t_rollout = time.perf_counter() - t0
        scalars = self.assign_advantages(batches)
        t1 = time.perf_counter()
        scalars.update(self.train(batches, epoch))
        t_train = time.perf_counter() - t1
        n_images = sum(len(b.prompts) for b in batches) * self.dims.world_size
        scalars["perf/rollout_images_per_s"] = n_images / t_rollout
        scalars["perf/images_per_s"] = n_images / (time.perf_counter() - t0)
        scalars["perf/rollout_s"] = t_rollout
        scalars["perf/train_s"] = t_train
        scalars["perf/step_s"] = time.perf_counter() - t0
        if self.window is not None:
            scalars["sampling/window_start"] = self.window[0]
        n_img = self.cfg.metrics.num_log_images
        avg = torch.cat([b.rewards["avg"] for b in batches])[:n_img]
        prompts = [p for b in batches for p in b.prompts][:n_img]
        return EpochResult(
            scalars,
            torch.cat([b.images for b in batches])[:n_img].float().cpu(),
            [f"{p} | {r:.3f}" for p, r in zip(prompts, avg.tolist())],
        )
