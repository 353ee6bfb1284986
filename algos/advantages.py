"""Group-normalised advantages (ALGORITHMS.md §5.1–5.2), computed by the driver on the whole batch before it is
sharded over learners, so a group's statistics and flow_grpo's global std always see every sample.

For every reward k and sample i of group g (samples of one prompt share a group id):

    A_k[i] = (r_k[i] − mean_g r_k) / (std r_k + eps),   std over the group (ddof 0), or over the whole batch
    A[i]   = clip(Σ_k w_k · A_k[i], −c, c)

Normalising each reward before weighting (GDPO-style) makes a reward's scale and offset cancel, z(a·r + b) = z(r)
for a > 0, so PickScore (~20) and HPS (~0.25) contribute by their weights alone. A group whose samples all score
the same on every reward carries no signal: its advantage is 0 and it is masked (`valid` False) and counted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from rlfew.errors import ConfigError


@dataclass
class AdvantageSpec:
    std: Literal["group", "global"] = "group"  # normaliser: the group's std, or the whole batch's (flow_grpo)
    clip: float = 5.0  # |A| ≤ clip (flow_grpo, RTDMD: 5)
    eps: float = 1e-4  # added to the std (flow_grpo: 1e-4)


@dataclass
class Advantages:
    values: torch.Tensor  # (B,) float32
    valid: torch.Tensor  # (B,) bool: False for samples of zero-variance groups
    zero_variance_groups: int
    groups: int


def group_advantages(scores: Mapping[str, torch.Tensor], weights: Mapping[str, float], group_ids: torch.Tensor,
                     spec: AdvantageSpec) -> Advantages:
    """Per-reward normalised, weighted and clipped advantages of one batch (module docstring)."""
    if not scores:
        raise ConfigError("reward: advantages need at least one reward")
    if set(scores) != set(weights):
        raise ValueError(f"scores {sorted(scores)} and weights {sorted(weights)} name different rewards")
    group_ids = torch.as_tensor(group_ids)
    if group_ids.ndim != 1:
        raise ValueError(f"group_ids must have shape (B,), got {tuple(group_ids.shape)}")
    _, group_index = torch.unique(group_ids, return_inverse=True)
    groups = int(group_index.max()) + 1 if group_index.numel() else 0
    sizes = torch.zeros(groups, dtype=torch.float64).index_add_(0, group_index, torch.ones(len(group_ids),
                                                                                          dtype=torch.float64))
    total = torch.zeros(len(group_ids), dtype=torch.float64)
    flat = torch.ones(groups, dtype=torch.bool)
    for name, values in scores.items():
        values = torch.as_tensor(values).detach().double().cpu()
        if values.shape != group_ids.shape:
            raise ValueError(f"reward {name!r} has shape {tuple(values.shape)}, group_ids {tuple(group_ids.shape)}")
        means = torch.zeros(groups, dtype=torch.float64).index_add_(0, group_index, values) / sizes
        centred = values - means[group_index]
        squares = torch.zeros(groups, dtype=torch.float64).index_add_(0, group_index, centred**2)
        # flat: every sample scored the same (max = min; a mean's rounding leaves tiny non-zero squares)
        highest = torch.full((groups,), -torch.inf, dtype=torch.float64).scatter_reduce(0, group_index, values, "amax")
        lowest = torch.full((groups,), torch.inf, dtype=torch.float64).scatter_reduce(0, group_index, values, "amin")
        flat &= highest == lowest
        std = values.std(correction=0) if spec.std == "global" else (squares / sizes).sqrt()[group_index]
        total += weights[name] * centred / (std + spec.eps)
    valid = ~flat[group_index]
    values = torch.where(valid, total.clamp(-spec.clip, spec.clip), torch.zeros_like(total))
    return Advantages(values=values.float(), valid=valid, zero_variance_groups=int(flat.sum()), groups=groups)
