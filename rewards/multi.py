"""Several rewards at once: a weighted sum for reward-gradient methods, per-reward group-normalised
advantages for policy-gradient methods."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from rlfew.errors import UsageError
from rlfew.rewards.api import Reward, RewardSpec


class MultiReward(Reward):
    """Weighted rewards. `score` returns the weighted sum (what a reward-gradient method such as DMDR
    back-propagates); `score_each` returns every reward's raw scores by name, the input of
    `combine_advantages` for policy-gradient methods. Differentiable only if every part is."""

    def __init__(self, parts: Sequence[tuple[Reward, float]]):
        if not parts:
            raise UsageError("a MultiReward needs at least one reward")
        names = [reward.name for reward, _ in parts]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise UsageError(f"rewards {duplicates} appear more than once in a MultiReward")
        self.parts = [(reward, float(weight)) for reward, weight in parts]
        self.name = ",".join(f"{reward.name}:{weight:g}" for reward, weight in self.parts)
        self.differentiable = all(reward.differentiable for reward, _ in self.parts)
        self.spec = None
        self.specs = [RewardSpec(r.spec.name, w, r.spec.options) if r.spec else None for r, w in self.parts]

    @property
    def weights(self) -> dict[str, float]:
        return {reward.name: weight for reward, weight in self.parts}

    def score_each(self, images: torch.Tensor, prompts: Sequence[str], **meta: Any) -> dict[str, torch.Tensor]:
        return {reward.name: reward.score(images, prompts, **meta) for reward, _ in self.parts}

    def compute(self, images: torch.Tensor, prompts: list[str], **meta: Any) -> torch.Tensor:
        return self.weighted_sum(self.score_each(images, prompts, **meta))

    def weighted_sum(self, scores_by_name: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(weight * scores_by_name[reward.name] for reward, weight in self.parts)


def combine_advantages(rewards_by_name: Mapping[str, torch.Tensor], weights: Mapping[str, float],
                       group_ids: torch.Tensor, eps: float = 1e-4, global_std: bool = False) -> torch.Tensor:
    """Per-reward group-normalised advantages, then weighted and summed (GDPO-style).

    For every reward k and sample i in group g:  A_k[i] = (r_k[i] - mean_g(r_k)) / (std_g(r_k) + eps),
    with the population std (ddof=0) over the group, or over the whole batch when `global_std` is true
    (flow_grpo's option, steadier for tiny groups). The result is sum_k weights[k] * A_k.

    Normalising each reward before weighting means a reward's scale and offset cancel: z(a*r + b) = z(r)
    for a > 0 (up to eps), so PickScore (~20) and HPS (~0.25) contribute by their weights alone, and a
    weight is the reward's share of the advantage, not a units conversion. Groups of one sample, or whose
    samples all score the same, get advantage 0 for that reward.

    `group_ids` (B,) are explicit integer ids (samples of the same prompt share one); they are never
    recovered from prompt strings.
    """
    if not rewards_by_name:
        raise UsageError("combine_advantages needs at least one reward")
    if set(rewards_by_name) != set(weights):
        raise UsageError(f"rewards {sorted(rewards_by_name)} and weights {sorted(weights)} name different rewards")
    group_ids = torch.as_tensor(group_ids)
    if group_ids.ndim != 1:
        raise ValueError(f"group_ids must have shape (B,), got {tuple(group_ids.shape)}")
    _, group_index = torch.unique(group_ids, return_inverse=True)
    group_index = group_index.to(next(iter(rewards_by_name.values())).device)
    group_count = int(group_index.max()) + 1 if group_index.numel() else 0
    total = None
    for name, rewards in rewards_by_name.items():
        rewards = rewards.detach().double()
        if rewards.shape != group_ids.shape:
            raise ValueError(f"reward {name!r} has shape {tuple(rewards.shape)}, group_ids {tuple(group_ids.shape)}")
        sizes = torch.zeros(group_count, dtype=rewards.dtype, device=rewards.device).index_add_(
            0, group_index, torch.ones_like(rewards))
        means = torch.zeros_like(sizes).index_add_(0, group_index, rewards) / sizes
        centred = rewards - means[group_index]
        if global_std:
            std = rewards.std(correction=0)
        else:
            std = (torch.zeros_like(sizes).index_add_(0, group_index, centred**2) / sizes).sqrt()[group_index]
        advantage = weights[name] * centred / (std + eps)
        total = advantage if total is None else total + advantage
    return total.float()
