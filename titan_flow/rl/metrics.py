"""Training-step statistics: means over micro-steps and ranks, and the ratio per denoising step.

The per-step ratio mean/std is GRPO-Guard's diagnostic (the ratio drifts below 1 at low-noise steps);
the reference logs no ratio at all.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from kernels import ClippedLoss


class StepStats:
    def __init__(self):
        self.sums: dict[str, list[torch.Tensor]] = {}
        self.ratios: dict[int, list[torch.Tensor]] = {}

    def add(self, step: int, pl: ClippedLoss, loss: torch.Tensor, kl: torch.Tensor | None) -> None:
        record = {
            "loss/policy": pl.loss.detach(),
            "loss/total": loss,
            "loss/clipfrac": pl.clipfrac,
            "loss/clipfrac_gt_one": pl.clipfrac_gt_one,
            "loss/clipfrac_lt_one": pl.clipfrac_lt_one,
            "loss/approx_kl": pl.approx_kl,
        }
        if kl is not None:
            record["loss/kl"] = kl.detach().mean()
        for k, v in record.items():
            self.sums.setdefault(k, []).append(v.float())
        self.sums.setdefault(f"clipfrac_per_step/{step}", []).append(pl.clipfrac.float())
        self.ratios.setdefault(step, []).append(pl.ratio.float())

    def reduce(self, dims) -> dict[str, float]:
        """Means of the scalars over micro-steps and ranks; ratio mean/std/min/max overall and per step."""
        names = sorted(self.sums)
        means = torch.stack([torch.stack(self.sums[k]).mean() for k in names])
        ratios = {j: torch.cat(r) for j, r in sorted(self.ratios.items())}
        all_ratios = torch.cat(list(ratios.values()))
        # Moments of (ratio - 1) in fp64, summed over ranks: the ratio sits within ~1e-4 of 1, where
        # E[r^2] - E[r]^2 in fp32 would be all rounding.
        moments = torch.stack(
            [torch.stack([d.sum(), d.square().sum(), torch.tensor(float(d.numel()), dtype=torch.float64, device=d.device)])
             for d in (r.double() - 1 for r in [all_ratios, *ratios.values()])]
        )
        lo, hi = all_ratios.min().reshape(1), all_ratios.max().reshape(1)
        if dims.world_size > 1:
            means, moments, lo, hi = (t.to(dims.device) for t in (means, moments, lo, hi))
            dist.all_reduce(means)
            means /= dims.world_size
            dist.all_reduce(moments)
            dist.all_reduce(lo, op=dist.ReduceOp.MIN)
            dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        out = dict(zip(names, means.tolist()))
        prefixes = ["ratio/", *(f"ratio_per_step/{j}_" for j in ratios)]
        for prefix, (s, sq, n) in zip(prefixes, moments.tolist()):
            out[f"{prefix}mean"] = 1 + s / n
            out[f"{prefix}std"] = max(sq / n - (s / n) ** 2, 0.0) ** 0.5
        out["ratio/min"], out["ratio/max"] = lo.item(), hi.item()
        return out
