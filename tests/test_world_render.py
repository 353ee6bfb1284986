"""World captions, scenes, prompt sets, renders and `rlfew world render`."""

import numpy as np
import pytest
from PIL import Image

from rlfew.cli import main
from rlfew.errors import UsageError
from rlfew.world import resolve_world_asset
from rlfew.world.prompts import (
    CATEGORIES, HELD_OUT_PAIRS, caption_pairs, load_prompts, parse_prompt, perturb_prompt, prompt_set,
    random_prompt, sample_scene, scene_satisfies,
)
from rlfew.world.render import render, render_batch, render_prompt
from rlfew.world.tokenizer import build_tokenizer


@pytest.mark.parametrize("prompt, category, claims", [
    ("a circle", "single_object", [("circle", None, 1)]),
    ("a red circle", "colour", [("circle", "red", 1)]),
    ("one square", "counting", [("square", None, 1)]),
    ("Three Squares.", "counting", [("square", None, 3)]),
    ("a circle and a triangle", "two_objects", [("circle", None, 1), ("triangle", None, 1)]),
    ("a red circle and a blue circle", "colour_binding", [("circle", "red", 1), ("circle", "blue", 1)]),
    ("a red circle below a blue square", "position", [("circle", "red", 1), ("square", "blue", 1)]),
])
def test_parse_prompt(prompt, category, claims):
    parsed = parse_prompt(prompt)
    assert parsed.category == category
    assert [(c.spec.shape, c.spec.colour, c.count) for c in parsed.counts] == claims
    if category == "position":
        assert parsed.relations[0].relation == "below"


@pytest.mark.parametrize("prompt", [
    "", "a dog", "a pink circle", "five circles", "two circle", "one circles", "a circle and a circle",
    "a red circle and a red square", "a circle left of a square", "a red circle near a blue square",
    "a red circle and a blue square and a green triangle",
])
def test_prompt_outside_grammar_is_a_usage_error_naming_it(prompt):
    with pytest.raises(UsageError) as err:
        parse_prompt(prompt)
    assert repr(prompt) in str(err.value)


def test_eval_compositions_never_occur_in_train_captions():
    train, evaluation = prompt_set("train"), prompt_set("eval")
    assert train == prompt_set("train") and evaluation == prompt_set("eval")  # deterministic
    assert not any(caption_pairs(p) & HELD_OUT_PAIRS for p in train)
    train_categories = {parse_prompt(p).category for p in train}
    eval_categories = [parse_prompt(p).category for p in evaluation]
    assert train_categories == set(eval_categories) == set(CATEGORIES)
    for prompt, category in zip(evaluation, eval_categories):
        if category in ("colour", "colour_binding", "position"):
            assert caption_pairs(prompt) & HELD_OUT_PAIRS, prompt
            assert prompt not in train


def test_random_prompts_respect_their_split():
    rng = np.random.default_rng(0)
    for _ in range(300):
        assert not caption_pairs(random_prompt(rng, split="train")) & HELD_OUT_PAIRS
    assert all(parse_prompt(random_prompt(rng, "position")).category == "position" for _ in range(20))
    with pytest.raises(UsageError, match="nonsense"):
        random_prompt(rng, "nonsense")


def test_category_weights_set_category_frequencies():
    rng = np.random.default_rng(0)
    weights = (0, 0, 1, 0, 0, 3)  # counting : position = 1 : 3, nothing else
    categories = [parse_prompt(random_prompt(rng, category_weights=weights)).category for _ in range(2000)]
    assert set(categories) == {"counting", "position"}
    assert categories.count("position") / len(categories) == pytest.approx(0.75, abs=0.03)
    for bad in ((1, 1), (1, 1, 1, 1, 1, -1), (0,) * 6):
        with pytest.raises(UsageError, match="category_weights"):
            random_prompt(rng, category_weights=bad)


def test_scenes_satisfy_their_prompt_without_overlaps_and_perturbations_do_not():
    rng = np.random.default_rng(1)
    for category in CATEGORIES:
        for _ in range(40):
            prompt = random_prompt(rng, category)
            scene = sample_scene(prompt, rng)
            assert scene_satisfies(scene, prompt)
            assert not scene_satisfies(scene, perturb_prompt(prompt, rng))
            boxes = [o.box for o in scene.objects]
            for i, a in enumerate(boxes):
                assert 0 <= a[0] and a[2] <= 64 and 0 <= a[1] and a[3] <= 64
                for b in boxes[i + 1:]:
                    assert a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1]


def test_renders_are_deterministic_for_a_seed():
    first, again, other = (render_prompt("four triangles", seed=s) for s in (7, 7, 8))
    assert first.shape == (64, 64, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    batch = render_batch(["a red circle", "two squares"], seed=3)
    assert batch.shape == (2, 3, 64, 64) and 0 <= batch.min() and batch.max() <= 1
    assert batch.equal(render_batch(["a red circle", "two squares"], seed=3))


def test_render_scales_to_other_sizes():
    scene = sample_scene("a blue square", np.random.default_rng(0))
    small, large = render(scene, 64), render(scene, 128)
    blue = np.array([30, 60, 220])
    assert (large == blue).all(-1).sum() == 4 * (small == blue).all(-1).sum()


def test_load_prompts(tmp_path):
    assert load_prompts("world:eval") == prompt_set("eval")
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\n\n two squares \n")
    assert load_prompts(str(path)) == ["a red circle", "two squares"]
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(UsageError, match="empty.txt"):
        load_prompts(str(tmp_path / "empty.txt"))
    with pytest.raises(UsageError, match="missing.txt"):
        load_prompts(str(tmp_path / "missing.txt"))
    with pytest.raises(UsageError, match="world:nope"):
        load_prompts("world:nope")


def test_tokenizer_round_trips_and_covers_the_grammar(tmp_path):
    from transformers import PreTrainedTokenizerFast

    tokenizer = build_tokenizer(max_length=16)
    for prompt in prompt_set("train") + prompt_set("eval"):
        assert tokenizer.unk_token_id not in tokenizer(prompt)["input_ids"], prompt
    tokenizer.save_pretrained(tmp_path)
    reloaded = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    encoded = reloaded(["a purple triangle left of a yellow square"], padding="max_length", return_tensors="pt")
    assert encoded["input_ids"].shape == (1, 16)
    assert encoded["input_ids"][0, 0] == reloaded.bos_token_id and encoded["input_ids"][0, 9] == reloaded.eos_token_id


def test_cli_render_writes_a_png(tmp_path):
    out = tmp_path / "grid.png"
    assert main(["world", "render", "--prompts", "world:eval", "--n", "6", "--seed", "0", "--out", str(out)]) == 0
    assert Image.open(out).size[0] >= 3 * 128
    single = tmp_path / "one.png"
    assert main(["world", "render", "--prompts", "a red circle", "--n", "2", "--out", str(single)]) == 0
    assert single.is_file()


def test_cli_render_rejects_a_bad_caption(tmp_path, capsys):
    assert main(["world", "render", "--prompts", "a red dog", "--out", str(tmp_path / "x.png")]) == 2
    assert "a red dog" in capsys.readouterr().err


def test_missing_world_asset_names_it_and_how_to_build_it(monkeypatch, tmp_path):
    import rlfew.world as world

    monkeypatch.setattr(world, "ASSETS_DIR", tmp_path)
    with pytest.raises(UsageError, match="world:teacher.*rlfew world"):
        resolve_world_asset("world:teacher")
    with pytest.raises(UsageError, match="world:nope"):
        resolve_world_asset("world:nope")
