"""Training-step statistics: means over micro-steps and ranks, and the ratio per denoising step.

The per-step ratio mean/std is GRPO-Guard's diagnostic (the ratio drifts below 1 at low-noise steps);
the reference logs no ratio at all. With RatioNorm on, `ratio/` is the normalised ratio the loss
clips and `raw_ratio/` the plain exp(log_prob - old_log_prob) whose left shift RatioNorm removes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from kernels import ClippedLoss


def beside_sources(sources: list[torch.Tensor] | None, images: torch.Tensor) -> torch.Tensor:
    """Edits: each result with its source image on the left, (B, 3, H, 2W); without sources, the images.

    A source (3, h, w) in [0, 1] of any size is resized (bilinear, antialiased) to the result's H x W.
    """
    if sources is None:
        return images
    if len(sources) != len(images):
        raise ValueError(f"beside_sources: {len(sources)} source images for {len(images)} results")
    height, width = images.shape[-2:]
    resized = [F.interpolate(s[None].float().cpu(), size=(height, width), mode="bilinear", antialias=True,
                             align_corners=False)[0].clamp(0, 1) for s in sources]
    return torch.cat([torch.stack(resized), images.float().cpu()], dim=-1)


def first_images(batches: list[torch.Tensor], limit: int) -> torch.Tensor:
    """The first `limit` images of several (B, 3, H, W) batches as one tensor, for the logged grid.

    Batches may differ in size (an edit is generated at its source image's shape): images are then
    padded with black at the bottom and right to the largest height and width.
    """
    images = [image for batch in batches for image in batch][: max(limit, 0)]
    if not images:
        return batches[0][:0] if batches else torch.zeros(0, 3, 1, 1)
    height, width = max(im.shape[-2] for im in images), max(im.shape[-1] for im in images)
    return torch.stack([F.pad(im, (0, width - im.shape[-1], 0, height - im.shape[-2])) for im in images])


class StepStats:
    def __init__(self):
        self.sums: dict[str, list[torch.Tensor]] = {}
        self.ratios: dict[str, dict[int, list[torch.Tensor]]] = {}
        self.losses: list[tuple[str, torch.Tensor]] = []  # (where, loss/total) since the last take_losses()

    def add_scalars(self, values: dict[str, torch.Tensor], where: str = "") -> None:
        """Scalars averaged over the epoch's micro-steps (and ranks) by `reduce`; `where` names the micro-step
        in an error about its loss."""
        for k, v in values.items():
            self.sums.setdefault(k, []).append(v.detach().float().reshape(()))
        if "loss/total" in values:
            self.losses.append((where or f"micro-step {len(self.sums['loss/total'])}", self.sums["loss/total"][-1]))

    def take_losses(self) -> list[tuple[str, torch.Tensor]]:
        """The micro-steps' total losses since the last call (the non-finite guard checks them per update)."""
        losses, self.losses = self.losses, []
        return losses

    def add_ratio(self, name: str, step: int, ratio: torch.Tensor) -> None:
        self.ratios.setdefault(name, {}).setdefault(step, []).append(ratio.detach().float())

    def add(self, step: int, pl: ClippedLoss, loss: torch.Tensor, kl: torch.Tensor | None,
            raw_ratio: torch.Tensor | None = None) -> None:
        """One clipped-ratio micro-step at denoising step `step`."""
        record = {
            "loss/policy": pl.loss,
            "loss/total": loss,
            "loss/clipfrac": pl.clipfrac,
            "loss/clipfrac_gt_one": pl.clipfrac_gt_one,
            "loss/clipfrac_lt_one": pl.clipfrac_lt_one,
            "loss/approx_kl": pl.approx_kl,
            f"clipfrac_per_step/{step}": pl.clipfrac,
        }
        if kl is not None:
            record["loss/kl"] = kl.mean()
            record[f"kl_per_step/{step}"] = kl.mean()
        self.add_scalars(record, where=f"denoising step {step}")
        self.add_ratio("ratio", step, pl.ratio)
        if raw_ratio is not None:
            self.add_ratio("raw_ratio", step, raw_ratio)

    def reduce(self, dims) -> dict[str, float]:
        """Means of the scalars over micro-steps and ranks; ratio mean/std/min/max overall and per step."""
        names = sorted(self.sums)
        means = torch.stack([torch.stack(self.sums[k]).mean() for k in names])
        # Moments of (ratio - 1) in fp64, summed over ranks: the ratio sits within ~1e-4 of 1, where
        # E[r^2] - E[r]^2 in fp32 would be all rounding.
        prefixes, moments, extremes = [], [], []
        for name, per_step in sorted(self.ratios.items()):
            per_step = {j: torch.cat(r) for j, r in sorted(per_step.items())}
            everything = torch.cat(list(per_step.values()))
            for prefix, r in [(f"{name}/", everything), *((f"{name}_per_step/{j}_", r) for j, r in per_step.items())]:
                d = r.double() - 1
                prefixes.append(prefix)
                moments.append(torch.stack([d.sum(), d.square().sum(), d.new_tensor(float(d.numel()))]))
            extremes.append(torch.stack([-everything.min(), everything.max()]))
        moments = torch.stack(moments) if moments else means.new_zeros(0, 3, dtype=torch.float64)
        extremes = torch.stack(extremes) if extremes else means.new_zeros(0, 2)
        if dims.world_size > 1:
            means, moments, extremes = (t.to(dims.device) for t in (means, moments, extremes))
            dist.all_reduce(means)
            means /= dims.world_size
            dist.all_reduce(moments)
            dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
        out = dict(zip(names, means.tolist()))
        for prefix, (s, sq, n) in zip(prefixes, moments.tolist()):
            out[f"{prefix}mean"] = 1 + s / n
            out[f"{prefix}std"] = max(sq / n - (s / n) ** 2, 0.0) ** 0.5
        for name, (neg_lo, hi) in zip(sorted(self.ratios), extremes.tolist()):
            out[f"{name}/min"], out[f"{name}/max"] = -neg_lo, hi
        return out
