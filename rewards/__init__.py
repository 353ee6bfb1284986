"""Reward plug-ins and the reward API (imported as `rlfew.rewards`; see DESIGN.md, "Rewards")."""

from rlfew.rewards.api import (
    BUILTINS,
    ENTRY_POINT_GROUP,
    CallableReward,
    Reward,
    RewardInfo,
    RewardSpec,
    list_rewards,
    load,
    parse_reward_spec,
)
from rlfew.rewards.bench import benchmark_rewards
from rlfew.rewards.multi import MultiReward

__all__ = [
    "BUILTINS", "ENTRY_POINT_GROUP", "CallableReward", "MultiReward", "Reward", "RewardInfo", "RewardSpec",
    "benchmark_rewards", "list_rewards", "load", "parse_reward_spec",
]
