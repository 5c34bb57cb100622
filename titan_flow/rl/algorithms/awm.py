"""Advantage Weighted Matching (AWM, arXiv 2509.25050): GRPO's group-relative advantages on the
flow-matching loss instead of the sampled steps' likelihood ratio.

The policy samples its own rollouts (any sampler, the ODE included: nothing is re-scored), the rewards
are normalised per group exactly as GRPO's, and each rollout's final latent x_0, re-noised at one
noise level per sample, trains

  loss = mean_i [ clip(A_i) |v(x_sigma) - (eps - x_0)|^2 ]  (+ beta |v - v_initial|^2)

so pictures above their group's mean are fitted and those below pushed away. The flow-matching loss
bounds the model's log-likelihood, so this is a policy gradient with log pi replaced by that bound;
its noise is one re-noising per picture instead of the many dimensions of the sampler's exploration
noise. With `rl.fm_sigma_min` the noise level is drawn only where the composition is decided, which
keeps the model from fitting its own sampler's small rendering errors over many epochs.
"""

from __future__ import annotations

from contextlib import nullcontext

from titan_flow.rl.algorithms.base import RolloutBatch
from titan_flow.rl.algorithms.sft import FlowSFT


class AdvantageWeightedMatching(FlowSFT):
    advantage_mode = "grpo"

    def rollout_policy(self):
        return nullcontext(self.model)

    def train(self, batches: list[RolloutBatch], epoch: int) -> dict[str, float]:
        ga = self.cfg.training.gradient_accumulation_steps
        clip = self.cfg.rl.adv_clip_max

        def train_batch(batch, stats, bar):
            weights = batch.advantages.clamp(-clip, clip)
            loss, record = self.flow_matching_loss(batch.trajectory.latents[:, -1], batch.cond, weights)
            (loss / ga).backward()
            stats.add_scalars(record)
            bar.update(1)

        return self.accumulate(epoch, batches, len(batches), train_batch)

    def summary(self, sc: dict[str, float]) -> str:
        kl = f"{sc['loss/kl']:.3g}" if "loss/kl" in sc else "-"
        return f"reward {sc['reward/avg_mean']:.4f}  awm loss {sc['loss/total']:.4g}  fm {sc['loss/fm']:.4g}  kl {kl}"
