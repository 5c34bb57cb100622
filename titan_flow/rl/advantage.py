"""Rewards -> advantages, normalised within each prompt's group (Flow-GRPO's PerPromptStatTracker).

Groups are resolved after the all-gather: every image with the same prompt key in this epoch, on any
rank, is one group. Stats are not kept across epochs (the reference clears them every epoch).
"""

from __future__ import annotations

import torch

EPS = 1e-4


MODES = ("grpo", "sft", "dpo")


def compute_advantages(
    rewards: torch.Tensor, keys: list[str], global_std: bool, per_prompt: bool = True, mode: str = "grpo"
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-group advantages; the group statistics for logging come with them.

    mode "grpo": A_j = (r_j - mean of j's group) / (std + 1e-4), std = population std of the group or
    of all rewards. "sft": 1 for every member with the group's best reward, else 0 (the reference's
    tracker). "dpo": +1 for the group's best, -1 for its worst (first occurrence on ties), 0 for the
    rest; a group whose rewards are all equal gets no pair (all 0), where the reference would mark
    members 1 and 0 as best and worst anyway. Without per-prompt tracking (or when every group has
    one member) the whole batch is one group.
    """
    if mode not in MODES:
        raise ValueError(f"advantage mode {mode!r} is not one of {MODES}")
    rewards = rewards.double()
    if len(keys) != rewards.numel():
        raise ValueError(f"{len(keys)} prompt keys for {rewards.numel()} rewards")
    groups: dict[str, list[int]] = {}
    for j, key in enumerate(keys):
        groups.setdefault(key, []).append(j)
    if not per_prompt or all(len(idx) == 1 for idx in groups.values()):
        groups = {"": list(range(len(keys)))}
    all_std = rewards.std(unbiased=False)
    adv = torch.empty_like(rewards)
    group_stds = []
    for idx in groups.values():
        r = rewards[idx]
        std = r.std(unbiased=False)
        group_stds.append(std)
        if mode == "grpo":
            adv[idx] = (r - r.mean()) / ((all_std if global_std else std) + EPS)
        elif mode == "sft":
            adv[idx] = (r == r.max()).double()
        else:
            pair = torch.zeros_like(r)
            if r.max() > r.min():
                pair[r.argmax()], pair[r.argmin()] = 1.0, -1.0
            adv[idx] = pair
    stds = torch.stack(group_stds)
    stats = {
        "group_size": len(keys) / len(groups),
        "num_groups": float(len(groups)),
        "zero_std_ratio": (stds == 0).double().mean().item(),
        "reward_std_mean": stds.mean().item(),
    }
    return adv.float(), stats
