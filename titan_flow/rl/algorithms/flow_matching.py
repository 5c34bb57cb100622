"""Shared by Flow-DPO and Flow-SFT: rollouts from the reference policy, losses on re-noised final latents.

As in the reference scripts (train_sd3_dpo.py / train_sd3_sft.py), these methods do not re-score
the sampling trajectory: they take each rollout's final latent x_0, draw a noise level sigma from
the logit-normal density (u = sigmoid(N(0, 1)), sigma = the family's 1000-step schedule at index
floor(1000 u)), form x_sigma = (1 - sigma) x_0 + sigma eps and regress the velocity onto eps - x_0,
without CFG.

Who samples: the reference policy (flow_grpo's "ref" adapter). `dpo` / `sft` ("offline"): it is the
frozen initial model, so every epoch draws fresh prompts but the data always comes from the
initial policy. `online_dpo` / `online_sft`: before an epoch's rollouts, the reference is set to
the trained policy once `rl.ref_update_interval` optimizer steps have passed since the last sync
(the reference code's `ref_update_step`), so with interval 1 and one update per epoch every
epoch's data comes from the current policy.
"""

from __future__ import annotations

import torch

from titan_flow.rl.algorithms.base import OnlineAlgorithm


class FlowMatchingAlgorithm(OnlineAlgorithm):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.online = self.cfg.rl.algorithm.startswith("online_")
        self.ref_synced_step = 0  # optimizer step at which the reference last took the policy's weights
        self._sigma_grid = None

    def state_dict(self) -> dict:
        return {**super().state_dict(), "ref_synced_step": self.ref_synced_step}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.ref_synced_step = state["ref_synced_step"]

    def rollout_policy(self):
        return self.frozen.reference()

    def before_epoch(self, epoch: int) -> None:
        if self.online and self.global_step - self.ref_synced_step >= self.cfg.rl.ref_update_interval:
            self.frozen.sync()
            self.ref_synced_step = self.global_step

    def sigma_grid(self) -> torch.Tensor:
        """The family's 1000-step schedule without its final 0: index k of u * 1000 as the reference."""
        if self._sigma_grid is None:
            self._sigma_grid = self.policy.sigmas(1000)[:-1].float()
        return self._sigma_grid

    def draw_noise(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigma (B,), eps like x0): logit-normal sigma on the family's grid (with `rl.fm_sigma_min` > 0:
        uniform over the grid's levels at or above it), standard normal eps."""
        grid = self.sigma_grid()
        n, device = x0.shape[0], self.noise_generator.device
        if self.cfg.rl.fm_sigma_min > 0:
            grid = grid[grid >= self.cfg.rl.fm_sigma_min]
            u = torch.rand(n, generator=self.noise_generator, device=device)
        else:
            u = torch.sigmoid(torch.randn(n, generator=self.noise_generator, device=device))
        index = (u * len(grid)).long().clamp(max=len(grid) - 1).to(grid.device)
        eps = torch.randn(x0.shape, generator=self.noise_generator, device=device)
        return grid[index].to(x0.device), eps.to(x0.device)

    def velocity_error(self, module, x0: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor, cond) -> torch.Tensor:
        """(per-sample mean squared error of the velocity at x_sigma against the target eps - x0, the velocity)."""
        s = sigma.view(-1, *([1] * (x0.dim() - 1)))
        x_t = (1 - s) * x0 + s * eps
        # Without CFG (scale 1); a guidance-distilled policy (FLUX) keeps its guidance input at the sampling value.
        guidance = self.cfg.sampling.guidance_scale if getattr(self.policy, "guidance_distilled", False) else 1.0
        v = self.policy.velocity(module, x_t, sigma, cond, guidance)
        return (v - (eps - x0)).square().flatten(1).mean(1), v

    def optim_scalars(self, grad_norms):
        out = super().optim_scalars(grad_norms)
        if self.online:
            out["reference/steps_since_sync"] = self.global_step - self.ref_synced_step
        return out
