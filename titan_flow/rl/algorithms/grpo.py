"""Flow-GRPO, Flow-GRPO-Fast and GRPO-Guard: clipped importance-ratio updates on the sampled steps.

Training batch b re-scores rollout batch b with the same composition and the same `velocity` call,
so with n_b = 1 and no accumulation the importance ratio is exactly 1. Fast trains only the steps of
each batch's SDE window (flow_grpo_algorithm.md section 6). GRPO-Guard (section 7):

  RatioNorm       log rho = S (log_prob - old_log_prob + b),  b = mean (mu - mu_old)^2 / (2 S^2)
  grad reweight   the step's policy loss is divided by |dt_j|

with S the step's per-element noise std and b per sample (the reference code averages b over the
batch by accident; `rl.ratio_norm_batch_bias` reproduces that).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

import kernels
from titan_flow.rl.algorithms.base import OnlineAlgorithm, RolloutBatch
from titan_flow.rl.rollout import trained_steps
from titan_flow.rl.sde import StepOutput, sde_step


class GRPO(OnlineAlgorithm):
    @property
    def stores_means(self) -> bool:
        return self.cfg.rl.ratio_norm

    def rollout_policy(self):
        return nullcontext(self.model)

    def rescore(self, batch: RolloutBatch, j: int, guidance: float) -> StepOutput:
        """Log-prob of the stored step j under the current model (with grad), the KL term when beta > 0
        and, for GRPO-Guard, the RatioNorm bias against the stored rollout mean."""
        traj = batch.trajectory
        n = len(batch.prompts)
        x = traj.latents[:, j]
        sigma, sigma_next = traj.sigmas[j].expand(n), traj.sigmas[j + 1].expand(n)
        v_ref = None
        if self.cfg.rl.beta > 0:
            with torch.no_grad(), self.frozen.initial() as ref:
                v_ref = self.policy.velocity(ref, x, sigma, batch.cond, guidance)
        v = self.policy.velocity(self.model, x, sigma, batch.cond, guidance)
        return sde_step(v, x, sigma, sigma_next, traj.noise_levels[j], self.cfg.sampling.sde_type,
                        prev_sample=traj.latents[:, j + 1], sigma_fallback=traj.sigmas[1], v_ref=v_ref,
                        mean_old=traj.means[:, j] if self.cfg.rl.ratio_norm else None)

    def policy_loss(self, batch: RolloutBatch, j: int, out: StepOutput) -> kernels.ClippedLoss:
        rl = self.cfg.rl
        scale = bias = None
        if rl.ratio_norm:
            scale, bias = out.std, out.ratio_bias
            if rl.ratio_norm_batch_bias:
                bias = bias.mean().expand_as(bias)
        weight = 1.0
        if rl.grad_reweight:
            sigmas = batch.trajectory.sigmas
            weight = 1.0 / abs(sigmas[j + 1] - sigmas[j]).item()
        return kernels.clipped_ratio_loss(out.log_prob, batch.trajectory.log_probs[:, j], batch.advantages,
                                          rl.clip_range, rl.clip_range, rl.adv_clip_max,
                                          ratio_scale=scale, ratio_bias=bias, loss_weight=weight)

    def train(self, batches: list[RolloutBatch], epoch: int) -> dict[str, float]:
        cfg, rl = self.cfg, self.cfg.rl
        ga = cfg.training.gradient_accumulation_steps
        guidance = cfg.sampling.guidance_scale if rl.train_cfg else 1.0
        plan = [trained_steps(cfg.sampling.num_steps, rl.timestep_fraction, b.trajectory.window) for b in batches]

        def train_batch(unit, stats, bar):
            batch, steps = unit
            for j in steps:
                out = self.rescore(batch, j, guidance)
                pl = self.policy_loss(batch, j, out)
                loss = pl.loss
                if out.kl is not None:
                    loss = loss + rl.beta * out.kl.mean()
                (loss / (ga * len(steps))).backward()
                raw = (out.log_prob.detach() - batch.trajectory.log_probs[:, j]).exp() if rl.ratio_norm else None
                stats.add(j, pl, loss.detach(), out.kl, raw_ratio=raw)
                bar.update(1)

        return self.accumulate(epoch, list(zip(batches, plan)), sum(map(len, plan)), train_batch)

    def summary(self, sc: dict[str, float]) -> str:
        kl = f"{sc['loss/kl']:.3g}" if "loss/kl" in sc else "-"
        return (
            f"reward {sc['reward/avg_mean']:.4f}  loss {sc['loss/total']:.4g}  kl {kl}  clipfrac "
            f"{sc['loss/clipfrac']:.3f}  ratio [{sc['ratio/min']:.4f}, {sc['ratio/max']:.4f}]  "
            f"grad {sc['optim/grad_norm']:.3g}"
        )

