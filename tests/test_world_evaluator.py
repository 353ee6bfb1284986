"""The exact world evaluator: right on renders (clean and degraded), wrong on noise and wrong captions."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from rlfew.errors import UsageError
from rlfew.world.evaluator import accuracy_report, evaluate
from rlfew.world.prompts import CATEGORIES, perturb_prompt, random_prompt
from rlfew.world.render import render_batch, render_prompt

PER_CATEGORY = 100


@pytest.fixture(scope="module")
def rendered():
    rng = np.random.default_rng(0)
    prompts = [random_prompt(rng, category, split) for category in CATEGORIES
               for split in ("train", "eval") for _ in range(PER_CATEGORY // 2)]
    return prompts, render_batch(prompts, seed=1)


def test_renders_score_perfectly_in_every_category(rendered):
    prompts, images = rendered
    report = accuracy_report(evaluate(images, prompts))
    assert report["count_by_category"] == {c: PER_CATEGORY for c in CATEGORIES}
    for category, accuracy in report["accuracy_by_category"].items():
        assert accuracy >= 0.99, (category, accuracy)


def test_blurred_noisy_colour_shifted_renders_still_score(rendered):
    prompts, images = rendered
    generator = torch.Generator().manual_seed(0)
    blurred = torch.from_numpy(ndimage.gaussian_filter(images.numpy(), sigma=(0, 0, 0.8, 0.8)))
    shift = 0.06 * (torch.rand(len(images), 3, 1, 1, generator=generator) - 0.5)  # per-image colour cast
    degraded = (blurred + shift + 0.03 * torch.randn(images.shape, generator=generator)).clamp(0, 1)
    report = accuracy_report(evaluate(degraded, prompts))
    for category, accuracy in report["accuracy_by_category"].items():
        assert accuracy >= 0.95, (category, accuracy)


def test_uniform_noise_scores_low(rendered):
    prompts, _ = rendered
    noise = torch.rand(len(prompts), 3, 64, 64, generator=torch.Generator().manual_seed(1))
    assert accuracy_report(evaluate(noise, prompts))["accuracy"] <= 0.02


def test_renders_with_a_wrong_caption_score_low(rendered):
    prompts, images = rendered
    rng = np.random.default_rng(2)
    wrong = [perturb_prompt(p, rng) for p in prompts]
    report = accuracy_report(evaluate(images, wrong))
    for category, accuracy in report["accuracy_by_category"].items():
        assert accuracy <= 0.02, (category, accuracy)


def test_overall_accuracy_is_the_category_mean_as_in_geneval():
    images = render_batch(["a red circle", "a blue square"] + ["two circles"] * 3, seed=0)
    prompts = ["a red circle", "a blue square"] + ["two circles", "three circles", "four circles"]  # 1/3 right
    report = accuracy_report(evaluate(images, prompts))
    assert report["accuracy_by_category"] == {"colour": 1.0, "counting": pytest.approx(1 / 3)}
    assert report["accuracy"] == pytest.approx((1 + 1 / 3) / 2)
    assert report["image_accuracy"] == pytest.approx(3 / 5)


def test_an_extra_object_breaks_the_closed_world():
    two = render_prompt("a red circle and a blue square", seed=3)
    (result,) = evaluate([two], ["a red circle"])
    assert not result.correct
    extra = next(c for c in result.checks if c.kind == "extra")
    assert not extra.passed and "blue square" in extra.detail


def test_position_checks_centroids():
    image = render_prompt("a red circle left of a blue square", seed=4)
    right, wrong = evaluate([image, image], ["a red circle left of a blue square", "a red circle right of a blue square"])
    assert right.correct and not wrong.correct
    assert [c.passed for c in wrong.checks if c.kind == "relation"] == [False]


def test_accepts_uint8_hwc_and_float_chw_alike():
    image = render_prompt("three triangles", seed=5)
    as_float = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    results = evaluate([image, as_float], ["three triangles"] * 2)
    assert [r.correct for r in results] == [True, True]
    assert len(results[0].objects) == 3


def test_caption_outside_grammar_is_a_usage_error():
    with pytest.raises(UsageError, match="a red dog"):
        evaluate([render_prompt("a circle", seed=0)], ["a red dog"])
