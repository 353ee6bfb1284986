"""Several rewards at once, as one differentiable weighted sum (what reward-gradient methods such as DMDR
back-propagate). Policy-gradient methods normalise each reward on its own instead: rlfew.algos.advantages."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from rlfew.errors import UsageError
from rlfew.rewards.api import Reward


class MultiReward(Reward):
    """Weighted rewards. `score` returns the weighted sum; `score_each` returns every reward's raw scores by name
    (for logging each one). Differentiable only if every part is."""

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
        self.spec = None  # several rewards: workers load each part's own spec

    @property
    def weights(self) -> dict[str, float]:
        return {reward.name: weight for reward, weight in self.parts}

    def score_each(self, images: torch.Tensor, prompts: Sequence[str], **meta: Any) -> dict[str, torch.Tensor]:
        return {reward.name: reward.score(images, prompts, **meta) for reward, _ in self.parts}

    def compute(self, images: torch.Tensor, prompts: list[str], **meta: Any) -> torch.Tensor:
        return self.weighted_sum(self.score_each(images, prompts, **meta))

    def weighted_sum(self, scores_by_name: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(weight * scores_by_name[reward.name] for reward, weight in self.parts)
