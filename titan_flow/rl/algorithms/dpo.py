"""Flow-DPO / OnlineDPO (the reference's train_sd3_dpo.py): Diffusion-DPO on the best and worst image of a group.

Pairs: in every group (a prompt's images this epoch, over all ranks) the best reward is the winner
and the worst the loser (rl/advantage.py mode "dpo"; groups with all-equal rewards give no pair).
Their final latents are gathered from whichever rank sampled them, the pair list is padded by
repeating pairs (chosen from the epoch's seeded stream, identical on all ranks) to a multiple of
world size x n_b, and each rank trains its contiguous share in n_b equal batches. For each batch the loss
is drawn `floor(T * timestep_fraction)` times (the reference loops over its trained timesteps but
uses a fresh random noise level each time), every time with one sigma and one eps per pair, shared
by winner and loser:

  e = |v(x_sigma) - (eps - x_0)|^2 (per-sample mean), e_ref the same under the reference policy
  loss = -log sigmoid(-beta/2 ((e_w - e_w_ref) - (e_l - e_l_ref))),  beta = rl.dpo_beta
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from titan_flow.distributed.utils import all_gather_tensor
from titan_flow.rl.algorithms.base import RolloutBatch
from titan_flow.rl.algorithms.flow_matching import FlowMatchingAlgorithm
from titan_flow.rl.rollout import trained_steps


def preference_pairs(advantages: torch.Tensor, keys: list[str]) -> list[tuple[int, int]]:
    """(winner, loser) global indices per group (images sharing a group key), in order of the groups' first
    appearance."""
    winners, losers = {}, {}
    for i, (a, k) in enumerate(zip(advantages.tolist(), keys)):
        if a > 0:
            winners[k] = i
        elif a < 0:
            losers[k] = i
    return [(winners[k], losers[k]) for k in dict.fromkeys(keys) if k in winners]


class FlowDPO(FlowMatchingAlgorithm):
    advantage_mode = "dpo"

    def my_pairs(self, epoch: int) -> tuple[list[tuple[int, int]], int]:
        """This rank's pairs (padded to an equal share per rank and batch) and the global pair count."""
        view = self.epoch_view
        pairs = preference_pairs(view.advantages, view.keys)
        if not pairs:
            return [], 0
        unit = self.dims.world_size * self.cfg.sampling.num_batches_per_epoch
        padded = math.ceil(len(pairs) / unit) * unit
        g = torch.Generator().manual_seed(self.cfg.job.seed * 100003 + epoch)
        extra = torch.randint(len(pairs), (padded - len(pairs),), generator=g).tolist()
        everything = pairs + [pairs[i] for i in extra]
        share = padded // self.dims.world_size
        return everything[self.dims.rank * share : (self.dims.rank + 1) * share], len(pairs)

    def train(self, batches: list[RolloutBatch], epoch: int) -> dict[str, float]:
        cfg, rl = self.cfg, self.cfg.rl
        ga = cfg.training.gradient_accumulation_steps
        n_b = cfg.sampling.num_batches_per_epoch
        draws = len(trained_steps(cfg.sampling.num_steps, rl.timestep_fraction, None))
        if any(b.source_images is not None for b in batches):
            raise NotImplementedError(
                f"rl.algorithm = {rl.algorithm!r} pairs images sampled on any rank and re-encodes their prompts, but an "
                "edit dataset's source images stay on the rank that loaded them; train editing with grpo or sft"
            )
        finals = all_gather_tensor(torch.cat([b.trajectory.latents[:, -1] for b in batches]))
        pairs, num_pairs = self.my_pairs(epoch)
        chunks = [pairs[i::n_b] for i in range(n_b)] if pairs else []  # no pairs on any rank: nothing to train
        scalars = self.accumulate(epoch, chunks, len(chunks) * draws,
                                  lambda chunk, stats, bar: self.train_batch(chunk, finals, draws, ga, stats, bar))
        scalars["dpo/num_pairs"] = float(num_pairs)
        return scalars

    def train_batch(self, chunk, finals, draws, ga, stats, bar) -> None:
        winners = [winner for winner, _ in chunk]
        losers = [loser for _, loser in chunk]
        prompts = [self.epoch_view.prompts[i] for i in winners]
        with torch.no_grad():
            cond = self.policy.encode(prompts + prompts, model=self.model)
        x0 = torch.cat([finals[winners], finals[losers]])
        half = len(chunk)
        beta = self.cfg.rl.dpo_beta
        for _ in range(draws):
            sigma, eps = self.draw_noise(finals[winners])
            sigma, eps = torch.cat([sigma, sigma]), torch.cat([eps, eps])  # winner and loser share them
            with torch.no_grad(), self.frozen.reference() as ref:
                ref_err, _ = self.velocity_error(ref, x0, sigma, eps, cond)
            err, _ = self.velocity_error(self.model, x0, sigma, eps, cond)
            w_diff = err[:half] - ref_err[:half]
            l_diff = err[half:] - ref_err[half:]
            inside = -0.5 * beta * (w_diff - l_diff)
            loss = -F.logsigmoid(inside).mean()
            (loss / (ga * draws)).backward()
            stats.add_scalars({
                "loss/total": loss,
                "dpo/err_winner": err[:half].mean(),
                "dpo/err_loser": err[half:].mean(),
                "dpo/ref_err_winner": ref_err[:half].mean(),
                "dpo/ref_err_loser": ref_err[half:].mean(),
                "dpo/inside_term": inside.mean(),
                "dpo/implicit_acc": (inside > 0).float().mean(),
            })
            bar.update(1)

    def summary(self, sc: dict[str, float]) -> str:
        return (
            f"reward {sc['reward/avg_mean']:.4f}  pairs {int(sc['dpo/num_pairs'])}  dpo loss "
            f"{sc.get('loss/total', float('nan')):.4g}  implicit acc {sc.get('dpo/implicit_acc', float('nan')):.3f}"
        )
