"""Group-normalised advantages (algos/advantages.py, ALGORITHMS.md §5.1–5.2, §5.8-4) against closed forms: per-reward
normalisation before weighting, group or global std, clipping, and zero-variance groups masked and counted."""

import math

import pytest
import torch

from rlfew.algos.advantages import AdvantageSpec, group_advantages


def test_per_reward_group_normalisation_closed_form():
    # Group 0 = samples 0, 2, 4 (non-contiguous ids), group 9 = samples 1, 3, group 5 = sample 5 alone.
    group_ids = torch.tensor([0, 9, 0, 9, 0, 5])
    quality = torch.tensor([1.0, 5.0, 2.0, 5.0, 3.0, 8.0])
    text = torch.tensor([0.0, 1.0, 0.0, 3.0, 6.0, 1.0])
    eps = 1e-4
    got = group_advantages({"quality": quality, "text": text}, {"quality": 1.0, "text": 0.5}, group_ids,
                           AdvantageSpec(eps=eps, clip=100.0))
    z_quality = torch.tensor([-1, 0, 0, 0, 1, 0]) * (1 / (math.sqrt(2 / 3) + eps))  # (r - 2) / std{1,2,3}
    z_text = torch.tensor([-2 / (math.sqrt(8) + eps), -1 / (1 + eps), -2 / (math.sqrt(8) + eps), 1 / (1 + eps),
                           4 / (math.sqrt(8) + eps), 0.0])  # group 0: mean 2, std sqrt(8); group 9: mean 2, std 1
    torch.testing.assert_close(got.values, (z_quality + 0.5 * z_text).float())
    # group 9 is flat in quality but not in text, so only the single-sample group 5 carries no signal
    assert got.valid.tolist() == [True, True, True, True, True, False]
    assert (got.zero_variance_groups, got.groups) == (1, 3)


def test_scale_and_offset_of_a_reward_cancel():
    group_ids = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    raw = torch.tensor([0.21, 0.25, 0.28, 0.30, 0.22, 0.26, 0.27])
    other = torch.tensor([3.0, 1.0, 2.0, 0.0, 5.0, 4.0, 4.0])
    spec, weights = AdvantageSpec(eps=1e-8), {"hps": 1.0, "other": 1.0}
    base = group_advantages({"hps": raw, "other": other}, weights, group_ids, spec)
    rescaled = group_advantages({"hps": 1000 * raw + 7, "other": other}, weights, group_ids, spec)
    torch.testing.assert_close(base.values, rescaled.values, atol=1e-5, rtol=0)


def test_global_std_is_the_whole_batch_std():
    group_ids = torch.tensor([0, 0, 1, 1])
    rewards = torch.tensor([1.0, 3.0, 10.0, 14.0])
    global_std = rewards.std(correction=0).item()
    got = group_advantages({"r": rewards}, {"r": 2.0}, group_ids, AdvantageSpec(std="global", eps=0.0))
    torch.testing.assert_close(got.values, 2.0 * torch.tensor([-1.0, 1.0, -2.0, 2.0]) / global_std)


def test_zero_variance_groups_are_masked_and_advantages_clipped():
    group_ids = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    rewards = torch.tensor([0.5, 0.5, 0.5, 0.0, 0.0, 1.0, 1.0, 1.0])  # groups 0 and 2 flat
    got = group_advantages({"world": rewards}, {"world": 3.0}, group_ids, AdvantageSpec(clip=5.0))
    assert got.valid.tolist() == [False, False, False, True, True, True, False, False]
    assert (got.zero_variance_groups, got.groups) == (2, 3)
    assert got.values[:3].abs().max() == 0 and got.values[6:].abs().max() == 0
    # group 1: mean 1/3, std √2/3, so 3·z ≈ 3·(−0.71, −0.71, 1.41): 4.24 < 5 stays; with clip 2 both sides are cut
    torch.testing.assert_close(got.values[3:6], 3.0 * torch.tensor([-1, -1, 2]) / 3 / (math.sqrt(2) / 3 + 1e-4))
    clipped = group_advantages({"world": rewards}, {"world": 3.0}, group_ids, AdvantageSpec(clip=2.0))
    torch.testing.assert_close(clipped.values[3:6], torch.tensor([-2.0, -2.0, 2.0]))


def test_mismatched_names_and_shapes_are_refused():
    with pytest.raises(ValueError, match="name different rewards"):
        group_advantages({"a": torch.ones(2)}, {"b": 1.0}, torch.tensor([0, 0]), AdvantageSpec())
    with pytest.raises(ValueError, match=r"reward 'a' has shape \(3,\)"):
        group_advantages({"a": torch.ones(3)}, {"a": 1.0}, torch.tensor([0, 0]), AdvantageSpec())


def test_a_group_of_equal_float64_scores_is_flat_despite_the_rounding_of_its_mean():
    """A mean of equal doubles can differ from them by an ulp; the group is still flat, masked and counted."""
    values = torch.full((2000 * 3,), 0.1, dtype=torch.float64) * torch.arange(1, 2001).repeat_interleave(3) / 7
    got = group_advantages({"r": values}, {"r": 1.0}, torch.arange(2000).repeat_interleave(3), AdvantageSpec())
    assert got.zero_variance_groups == 2000 and not got.valid.any() and got.values.abs().max() == 0
