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

import torch

from titan_flow.rl.algorithms.base import RolloutBatch
from titan_flow.rl.algorithms.sft import FlowSFT


class AdvantageWeightedMatching(FlowSFT):
    advantage_mode = "grpo"
    loss_name = "awm"

    def rollout_policy(self):
        return nullcontext(self.model)

    def loss_weights(self, batch: RolloutBatch) -> torch.Tensor:
        return batch.advantages.clamp(-self.cfg.rl.adv_clip_max, self.cfg.rl.adv_clip_max)
