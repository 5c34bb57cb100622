"""The algorithm family by `rl.algorithm`, and what each needs the trainer to build."""

from __future__ import annotations

from titan_flow.config import JobConfig
from titan_flow.rl.algorithms.awm import AdvantageWeightedMatching
from titan_flow.rl.algorithms.base import EpochResult, OnlineAlgorithm, RolloutBatch
from titan_flow.rl.algorithms.dpo import FlowDPO
from titan_flow.rl.algorithms.grpo import GRPO
from titan_flow.rl.algorithms.reference import FrozenPolicies
from titan_flow.rl.algorithms.sft import FlowSFT
from titan_flow.rl.algorithms.supervised import SupervisedFlowMatching

ALGORITHMS = {
    "grpo": GRPO, "awm": AdvantageWeightedMatching, "dpo": FlowDPO, "online_dpo": FlowDPO, "sft": FlowSFT, "online_sft": FlowSFT,
    "supervised": SupervisedFlowMatching,
}


def is_online(cfg: JobConfig) -> bool:
    return cfg.rl.algorithm.startswith("online_")


def needs_frozen_copy(cfg: JobConfig) -> bool:
    """Full fine-tuning keeps one frozen copy of the model for the reference policy (DPO/SFT rollouts
    and anchors, GRPO's KL); under LoRA the reference is the adapter switched off or its frozen slot."""
    return not cfg.lora.enable and (cfg.rl.algorithm not in ("grpo", "awm", "supervised") or cfg.rl.beta > 0)


def needs_lora_reference_slot(cfg: JobConfig) -> bool:
    """Online DPO/SFT under LoRA keep a frozen copy of the adapter (not of the model) as the reference."""
    return cfg.lora.enable and is_online(cfg)


def build_algorithm(cfg: JobConfig, dims, policy, model, frozen_copy, optimizer, ema, reward_fn, loader,
                    noise_generator) -> OnlineAlgorithm:
    frozen = FrozenPolicies(model, frozen_copy, online=is_online(cfg))
    return ALGORITHMS[cfg.rl.algorithm](
        cfg, dims, policy, model, frozen, optimizer, ema, reward_fn, loader, noise_generator
    )


__all__ = [
    "ALGORITHMS", "EpochResult", "FlowDPO", "FlowSFT", "GRPO", "OnlineAlgorithm", "RolloutBatch", "SupervisedFlowMatching",
    "build_algorithm", "needs_frozen_copy", "needs_lora_reference_slot",
]
