"""What every algorithm of the family shares: rollouts, rewards, group advantages, optimizer updates.

One epoch = n_b sampling rounds (rewards of a round are scored in the background while the next one
is sampled) -> rewards gathered over ranks -> per-group advantages -> `train` (the algorithm's own
loss) -> optimizer steps every `gradient_accumulation_steps` training batches.

State that must survive a resume (beyond model, optimizer and EMA) is the algorithm's
`state_dict()`: `global_step`, `window_rng` (the Fast window stream) and, for online DPO/SFT,
`ref_synced_step`; their reference weights are the LoRA reference slot (part of the model's state
dict) or the full-fine-tuning frozen copy `frozen.frozen_copy`.
"""

from __future__ import annotations

import random
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from titan_flow.config import JobConfig
from titan_flow.distributed.utils import ParallelDims, all_gather_object, all_gather_tensor, clip_grad_norm
from titan_flow.rewards import masked_mean
from titan_flow.rl.advantage import compute_advantages
from titan_flow.rl.algorithms.reference import FrozenPolicies
from titan_flow.rl.guard import NonFiniteGuard
from titan_flow.rl.metrics import StepStats, beside_sources, first_images
from titan_flow.rl.rollout import (
    Trajectory,
    draw_sde_window,
    prompt_seed,
    sample_branched_trajectory,
    sample_trajectory,
    step_noise_levels,
)


@dataclass
class RolloutBatch:
    prompts: list[str]
    metadata: list[dict]
    keys: list[str]  # group keys: the prompt, or prompt and source image for edits
    source_images: list[torch.Tensor] | None  # the edit inputs the prompts were encoded with
    cond: dict
    trajectory: Trajectory
    images: torch.Tensor  # decoded samples: images (B, 3, H, W) or videos (B, F, 3, H, W)
    pending_rewards: Future
    rewards: dict[str, torch.Tensor] | None = None
    advantages: torch.Tensor | None = None


@dataclass
class EpochResult:
    scalars: dict[str, float] = field(default_factory=dict)
    images: torch.Tensor | None = None
    captions: list[str] = field(default_factory=list)
    summary: str = ""  # one log line of the algorithm's headline numbers


@dataclass
class GroupAdvantages:
    """The whole epoch's view after the all-gather, in rank order (what pairing across ranks needs)."""

    advantages: torch.Tensor  # (W * N,) on CPU
    prompts: list[str]
    keys: list[str]  # group keys, aligned with `prompts`


class OnlineAlgorithm:
    advantage_mode = "grpo"  # the tracker mode of rl/advantage.py
    stores_means = False  # GRPO-Guard keeps every SDE step's mean

    def __init__(self, cfg: JobConfig, dims: ParallelDims, policy, model, frozen: FrozenPolicies, optimizer, ema,
                 reward_fn, loader, noise_generator: torch.Generator):
        self.cfg, self.dims = cfg, dims
        self.policy, self.model, self.frozen = policy, model, frozen
        self.optimizer, self.ema = optimizer, ema
        self.reward_fn, self.loader = reward_fn, loader
        self._batches = None  # the loader's iterator, made at the first rollout (after a resume restored it)
        self.guard = NonFiniteGuard(cfg.training.on_nonfinite, cfg.training.max_nonfinite_skips, dims.rank,
                                    dims.device)
        self.noise_generator = noise_generator
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.global_step = 0  # optimizer updates so far
        # Fast windows come from the run's seeded stream, identical on all ranks, so a group shares its window.
        self.window_rng = random.Random(cfg.job.seed)
        self.epoch_view: GroupAdvantages | None = None

    def state_dict(self) -> dict:
        """The counters a resume restores besides model, optimizer and EMA (identical on every rank)."""
        return {"global_step": self.global_step, "window_rng": self.window_rng.getstate(),
                "nonfinite": self.guard.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.global_step = state["global_step"]
        self.window_rng.setstate(state["window_rng"])
        self.guard.load_state_dict(state["nonfinite"])

    # ------------------------------------------------------------------ rollout
    def rollout_policy(self):
        """Context manager yielding the module that samples this algorithm's rollouts."""
        raise NotImplementedError

    def next_batch(self):
        """The loader's next batch (prompts, metadata, source images, group keys) for this rank."""
        if self._batches is None:
            self._batches = iter(self.loader)
        return next(self._batches)

    def _initial_latents(self, keys: list[str], epoch: int, round_index: int, cond: dict) -> torch.Tensor:
        if not (self.cfg.sampling.same_latent or self.cfg.sampling.branch_prefix):
            return self.policy.initial_noise(len(keys), self.noise_generator, cond=cond)
        gens = [torch.Generator(device="cpu").manual_seed(prompt_seed(k, epoch, round_index)) for k in keys]
        return self.policy.initial_noise(len(keys), gens, cond=cond)

    def _sample(self, module, data, cond, epoch: int, round_index: int, sigmas, window, bar):
        s = self.cfg.sampling
        levels = step_noise_levels(s.num_steps, s.noise_level, window)
        common = dict(generator=self.noise_generator, progress=bar, return_means=self.stores_means)
        if not s.branch_prefix:
            x0 = self._initial_latents(data.keys, epoch, round_index, cond)
            return sample_trajectory(self.policy, module, cond, x0, sigmas, levels, s.sde_type, s.guidance_scale,
                                     window=window, **common)
        distinct = list(dict.fromkeys(data.keys))
        first = [data.keys.index(k) for k in distinct]
        member_of = torch.tensor([distinct.index(k) for k in data.keys], device=self.dims.device)
        images = [data.images[i] for i in first] if data.images is not None else None
        with torch.no_grad():
            prefix_cond = self.policy.encode([data.prompts[i] for i in first], images=images, model=self.model)
        x0 = self._initial_latents(distinct, epoch, round_index, prefix_cond)
        return sample_branched_trajectory(self.policy, module, cond, prefix_cond, x0, member_of, sigmas, levels,
                                          window, s.sde_type, s.guidance_scale, **common)

    def collect(self, epoch: int) -> list[RolloutBatch]:
        s = self.cfg.sampling
        sigmas = self.policy.sigmas(s.num_steps)
        self.model.eval()
        batches = []
        bar = tqdm(total=s.num_batches_per_epoch * s.num_steps, desc=f"epoch {epoch} rollout",
                   disable=not self.dims.is_main, leave=False)
        with self.rollout_policy() as module:
            for r in range(s.num_batches_per_epoch):
                window = draw_sde_window(self.window_rng, s.num_steps, s.sde_window_size, tuple(s.sde_window_range))
                data = self.next_batch()
                with torch.no_grad():
                    cond = self.policy.encode(data.prompts, images=data.images, model=self.model)
                traj = self._sample(module, data, cond, epoch, r, sigmas, window, bar)
                with torch.no_grad():
                    images = self.policy.decode(traj.latents[:, -1])
                pending = self.reward_fn.submit(images, data.prompts, data.metadata, ref_images=data.images)
                batches.append(RolloutBatch(data.prompts, data.metadata, data.keys, data.images, cond, traj, images,
                                            pending))
        bar.close()
        for b in batches:
            b.rewards = {k: v.to(self.dims.device) for k, v in b.pending_rewards.result().items()}
        return batches

    def check_rollouts(self, batches: list[RolloutBatch]) -> None:
        """Non-finite latents, log-probs of the SDE steps (ODE steps have none) and scores of each reward function."""

        def bad_steps(log_probs: torch.Tensor, steps: list[int]) -> str:
            return f"at denoising steps {[steps[j] for j in (~torch.isfinite(log_probs)).any(0).nonzero().flatten()]}"

        def bad_prompts(scores: torch.Tensor, prompts: list[str]) -> str:
            return "prompts: " + "; ".join(repr(p) for p, ok in zip(prompts, torch.isfinite(scores).tolist()) if not ok)

        for r, b in enumerate(batches):
            traj = b.trajectory
            self.guard.check(f"rollout latents (round {r})", traj.latents)
            sde_steps = [j for j, level in enumerate(traj.noise_levels) if level > 0]
            if sde_steps:
                log_probs = traj.log_probs[:, sde_steps]
                self.guard.check(f"rollout log-probs (round {r})", log_probs,
                                 lambda lp=log_probs, steps=sde_steps: bad_steps(lp, steps))
            for key, scores in b.rewards.items():
                if key != "avg":  # the weighted sum: a function that failed is named on its own
                    self.guard.check(f"reward {key!r} (round {r})", scores,
                                     lambda sc=scores, prompts=b.prompts: bad_prompts(sc, prompts))

    def assign_advantages(self, batches: list[RolloutBatch]) -> dict[str, float]:
        """Gather every rank's rewards and prompts, form per-group advantages, keep this rank's slice."""
        rl = self.cfg.rl
        scalars = {}
        gathered = {}
        for key in batches[0].rewards:
            gathered[key] = all_gather_tensor(torch.cat([b.rewards[key].float() for b in batches]))
            scalars[f"reward/{key}_mean"] = masked_mean(gathered[key])  # GenEval's per-task keys hold -10 entries
        for key in ["avg", *self.cfg.reward.fns]:
            scalars[f"reward/{key}_std"] = gathered[key].std(unbiased=False).item()
        mine = [(p, k) for b in batches for p, k in zip(b.prompts, b.keys)]
        everyone = [item for rank_items in all_gather_object(mine) for item in rank_items]
        all_prompts, all_keys = [p for p, _ in everyone], [k for _, k in everyone]
        adv, stats = compute_advantages(
            gathered["avg"].cpu(), all_keys, rl.global_std, rl.per_prompt_stat_tracking, self.advantage_mode
        )
        self.epoch_view = GroupAdvantages(adv, all_prompts, all_keys)
        self.guard.check("advantages", adv)  # identical on every rank: decided with the first update
        local = adv.view(self.dims.world_size, -1)[self.dims.rank].to(self.dims.device)
        for b, chunk in zip(batches, local.split([len(b.prompts) for b in batches])):
            b.advantages = chunk
        scalars.update({f"advantage/{k}": float(v) for k, v in stats.items()})
        return scalars

    # ------------------------------------------------------------------ training
    def optimizer_step(self, epoch: int, losses: list[tuple[str, torch.Tensor]]) -> torch.Tensor | None:
        """Clip and apply the accumulated gradients, unless a loss or the gradient norm is non-finite on any
        rank; then (on_nonfinite = skip) the update and its EMA step are dropped and None is returned."""
        grad_norm = clip_grad_norm(self.trainable, self.cfg.optimizer.max_grad_norm)
        if losses:
            self.guard.check("loss", torch.stack([loss for _, loss in losses]), lambda: "at " + ", ".join(
                where for where, loss in losses if not torch.isfinite(loss)))
        self.guard.check("gradient norm (before the update)", grad_norm)
        if self.guard.decide(epoch, f"optimizer step {self.global_step + 1}"):
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self.guard.passed()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        if self.ema is not None:
            self.ema.step(self.global_step)
        return grad_norm

    def train(self, batches: list[RolloutBatch], epoch: int) -> dict[str, float]:
        raise NotImplementedError

    def accumulate(self, epoch: int, units: list, num_micro_steps: int, train_unit) -> dict[str, float]:
        """The training skeleton every algorithm shares: `rl.num_inner_epochs` passes over `units` (the
        epoch's training batches), `train_unit(unit, stats, bar)` backpropagating one of them, and an
        optimizer step every `gradient_accumulation_steps` units. Returns the reduced scalars."""
        ga = self.cfg.training.gradient_accumulation_steps
        passes = self.cfg.rl.num_inner_epochs
        stats, grad_norms = StepStats(), []
        self.model.train()
        bar = tqdm(total=passes * num_micro_steps, desc=f"epoch {epoch} train", disable=not self.dims.is_main,
                   leave=False)
        for _ in range(passes):
            for b, unit in enumerate(units):
                train_unit(unit, stats, bar)
                if (b + 1) % ga == 0:
                    grad_norm = self.optimizer_step(epoch, stats.take_losses())
                    if grad_norm is not None:
                        grad_norms.append(grad_norm)
        bar.close()
        scalars = stats.reduce(self.dims) if units else {}
        scalars.update(self.optim_scalars(grad_norms))
        return scalars

    def summary(self, scalars: dict[str, float]) -> str:
        return f"reward {scalars['reward/avg_mean']:.4f}  loss {scalars.get('loss/total', float('nan')):.4g}"

    def optim_scalars(self, grad_norms: list[torch.Tensor]) -> dict[str, float]:
        return {
            "optim/grad_norm": torch.stack(grad_norms).float().mean().item() if grad_norms else float("nan"),
            "optim/lr": self.optimizer.param_groups[0]["lr"],
            "optim/global_step": self.global_step,
        }

    def before_epoch(self, epoch: int) -> None:
        """Hook run before the rollouts (online variants refresh their reference here)."""

    def run_epoch(self, epoch: int) -> EpochResult:
        t0 = time.perf_counter()
        self.guard.seconds = self.guard.collective_seconds = 0.0
        self.before_epoch(epoch)
        batches = self.collect(epoch)
        t_rollout = time.perf_counter() - t0
        self.check_rollouts(batches)
        if self.guard.decide(epoch, "rollouts and rewards"):
            scalars = {"nonfinite/skipped": 1.0, "nonfinite/skips_in_a_row": float(self.guard.consecutive_skips),
                       "nonfinite/total_skips": float(self.guard.total_skips), "perf/rollout_s": t_rollout}
            return EpochResult(scalars, summary="skipped: non-finite rollouts or rewards (see the warning above)")
        scalars = self.assign_advantages(batches)
        t1 = time.perf_counter()
        scalars.update(self.train(batches, epoch))
        # Finite gradients can still overflow the weights (a huge lr with weight decay): before any save.
        self.guard.check("weights after the updates", self.trainable, skippable=False)
        if self.ema is not None:
            self.guard.check("EMA weights", self.ema.shadow, skippable=False)
        self.guard.decide(epoch, "after the updates")
        t_train = time.perf_counter() - t1
        scalars["nonfinite/total_skips"] = float(self.guard.total_skips)
        scalars["perf/nonfinite_check_s"] = self.guard.seconds
        scalars["perf/nonfinite_allreduce_s"] = self.guard.collective_seconds
        n_images = sum(len(b.prompts) for b in batches) * self.dims.world_size
        scalars["perf/rollout_images_per_s"] = n_images / t_rollout
        scalars["perf/images_per_s"] = n_images / (time.perf_counter() - t0)
        scalars["perf/rollout_s"] = t_rollout
        scalars["perf/train_s"] = t_train
        scalars["perf/step_s"] = time.perf_counter() - t0
        windows = [b.trajectory.window for b in batches if b.trajectory.window is not None]
        if windows:
            scalars["sampling/window_start"] = sum(w[0] for w in windows) / len(windows)
            for r, w in enumerate(windows):
                scalars[f"sampling/window_start_round/{r}"] = w[0]
        n_img = self.cfg.metrics.num_log_images
        avg = torch.cat([b.rewards["avg"] for b in batches])[:n_img]
        prompts = [p for b in batches for p in b.prompts][:n_img]
        return EpochResult(
            scalars,
            first_images([beside_sources(b.source_images, b.images) for b in batches], n_img).float().cpu(),
            [f"{p} | {r:.3f}" for p, r in zip(prompts, avg.tolist())],
            self.summary(scalars),
        )
