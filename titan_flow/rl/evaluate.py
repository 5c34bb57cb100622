"""Evaluation: deterministic (ODE) sampling of the test prompts, scored by the rewards, with the EMA weights.

The test set is split over ranks round-robin and padded to equal length; padded entries are dropped
after the gather, so no prompt is counted twice (the reference's padded duplicates enter its means).
Each prompt's initial noise is seeded by its index, so the figures do not depend on the world size.
"""

from __future__ import annotations

import contextlib

import torch
from tqdm import tqdm

from titan_flow.data.loader import collate_records
from titan_flow.distributed.utils import all_gather_tensor, reshard
from titan_flow.rewards import geneval_breakdown, reward_means
from titan_flow.rl.metrics import beside_sources, first_images
from titan_flow.rl.rollout import generate_images, step_noise_levels


@torch.no_grad()
def evaluate(cfg, dims, policy, model, ema, reward_fn, dataset):
    """Returns (scalars, images, captions): `eval/reward_<key>` means over the whole test set (GenEval's
    "not this task" entries excluded) and, for GenEval, `eval/geneval/<task>` and the overall score."""
    e = cfg.eval
    n_total = len(dataset) if e.max_prompts <= 0 else min(e.max_prompts, len(dataset))
    per_rank = -(-n_total // dims.world_size)
    mine = [dims.rank + i * dims.world_size for i in range(per_rank)]  # >= n_total marks padding
    sigmas = policy.sigmas(e.num_steps)
    levels = step_noise_levels(e.num_steps, 0.0, None)
    model.eval()
    scores: dict[str, list[torch.Tensor]] = {}
    images, captions = [], []
    swap = ema.swapped_in() if ema is not None else contextlib.nullcontext()
    reshard(model)
    with swap:
        for start in tqdm(range(0, per_rank, e.batch_size), desc="eval", disable=not dims.is_main, leave=False):
            index = mine[start : start + e.batch_size]
            batch = collate_records([dataset[i % n_total] for i in index])
            seeds = [torch.Generator().manual_seed(cfg.job.seed + i) for i in index]
            imgs = generate_images(policy, model, batch.prompts, seeds, sigmas, levels, "sde", e.guidance_scale,
                                   images=batch.images)
            rewards = reward_fn(imgs, batch.prompts, batch.metadata, ref_images=batch.images, only_strict=False)
            for k, v in rewards.items():
                scores.setdefault(k, []).append(v.float().to(dims.device))
            if len(images) < cfg.metrics.num_log_images:
                images.append(beside_sources(batch.images, imgs.float().cpu()))  # edits: source | result
                captions += [f"{p} | {r:.3f}" for p, r in zip(batch.prompts, rewards["avg"].tolist())]
        reshard(model)  # before the trained weights are written back
    valid = all_gather_tensor(torch.tensor([i < n_total for i in mine], device=dims.device))
    gathered = {k: all_gather_tensor(torch.cat(parts))[valid] for k, parts in scores.items()}
    scalars = {"eval/num_prompts": float(n_total)}
    scalars.update({f"eval/reward_{k}": v for k, v in reward_means(gathered).items()})
    scalars.update({f"eval/geneval/{k}": v for k, v in geneval_breakdown(gathered).items()})
    n_img = cfg.metrics.num_log_images
    return scalars, first_images(images, n_img), captions[:n_img]
