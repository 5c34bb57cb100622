"""Rewards: one file per reward, a registry by config name, the reward-server client and server.

Importing this package imports no model library; a reward's module (and transformers, rapidocr...)
is imported when a reward of that name is built.
"""

from titan_flow.rewards.multi import MultiReward, geneval_breakdown, masked_mean, reward_means
from titan_flow.rewards.registry import Reward, build_reward, get_reward_class, register_reward, reward_names
from titan_flow.rewards.remote import RemoteReward, RetryPolicy, RewardServerError

__all__ = [
    "MultiReward",
    "RemoteReward",
    "RetryPolicy",
    "Reward",
    "RewardServerError",
    "build_reward",
    "geneval_breakdown",
    "get_reward_class",
    "masked_mean",
    "register_reward",
    "reward_names",
    "reward_means",
]
