"""Flow-SFT / OnlineSFT (the reference's train_sd3_sft.py): flow matching on each group's best images.

Advantages are the "sft" tracker's: 1 for every image with its group's best reward, 0 otherwise. A
training batch is a rollout batch (this rank's own samples, no exchange between ranks); one noise
level per sample is drawn per batch and

  loss = mean_i [ A_i |v(x_sigma) - (eps - x_0)|^2 + beta |v(x_sigma) - v_initial(x_sigma)|^2 ]

with beta = rl.beta and v_initial the initial model (LoRA: adapter off). The reference drops the
advantage weight when beta = 0 and then fits every rollout; here the weight always applies.
"""

from __future__ import annotations

import torch

from titan_flow.rl.algorithms.base import RolloutBatch
from titan_flow.rl.algorithms.flow_matching import FlowMatchingAlgorithm


class FlowSFT(FlowMatchingAlgorithm):
    advantage_mode = "sft"
    loss_name = "sft"  # in the epoch's log line

    def flow_matching_loss(self, x0: torch.Tensor, cond, weights: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(loss, scalars to log) of mean_i [w_i |v(x_sigma) - (eps - x_0)|^2 + beta |v - v_initial|^2] with
        one fresh noise level and noise per sample; the offline "supervised" algorithm uses it with w = 1."""
        rl = self.cfg.rl
        sigma, eps = self.draw_noise(x0)
        kl = None
        if rl.beta > 0:
            with torch.no_grad(), self.frozen.initial() as initial:
                _, v_initial = self.velocity_error(initial, x0, sigma, eps, cond)
        fm, v = self.velocity_error(self.model, x0, sigma, eps, cond)
        weighted = weights * fm
        if rl.beta > 0:
            kl = (v - v_initial).square().flatten(1).mean(1)
            weighted = weighted + rl.beta * kl
        loss = weighted.mean()
        # the same keys on every rank: they are all-reduced
        record = {"loss/total": loss, "loss/fm": fm.mean(), "loss/fm_weighted": (weights * fm).mean()}
        if kl is not None:
            record["loss/kl"] = kl.mean()
        return loss, record

    def loss_weights(self, batch: RolloutBatch) -> torch.Tensor:
        """Each rollout's weight in the flow-matching loss: its tracker advantage (1 for a group's best, else 0)."""
        return batch.advantages

    def train(self, batches: list[RolloutBatch], epoch: int) -> dict[str, float]:
        ga = self.cfg.training.gradient_accumulation_steps

        def train_batch(batch, stats, bar):
            weights = self.loss_weights(batch)
            fm_loss, record = self.flow_matching_loss(batch.trajectory.latents[:, -1], batch.cond, weights)
            (fm_loss / ga).backward()
            stats.add_scalars({**record, "sft/selected_fraction": (weights > 0).float().mean()})
            bar.update(1)

        return self.accumulate(epoch, batches, len(batches), train_batch)

    def summary(self, sc: dict[str, float]) -> str:
        kl = f"{sc['loss/kl']:.3g}" if "loss/kl" in sc else "-"
        return (f"reward {sc['reward/avg_mean']:.4f}  {self.loss_name} loss {sc['loss/total']:.4g}  "
                f"fm {sc['loss/fm']:.4g}  kl {kl}")
