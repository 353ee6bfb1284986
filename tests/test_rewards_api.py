"""Reward API: resolution (built-in, module:attr, entry point, callable), output validation, specs,
multi-reward, per-group advantages, and the `rlfew rewards` CLI. No model weights needed here."""

from __future__ import annotations

import json
import math
import pickle
import sys
import textwrap

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from rlfew import cli
from rlfew.errors import RewardError, UsageError
from rlfew.images import from_uint8
from rlfew.rewards import MultiReward, Reward, RewardSpec, list_rewards, load, parse_reward_spec
from rlfew.rewards.simple import JpegCompressibility

PLUGIN_MODULE = "rlfew_reward_plugin_example"
PLUGIN_SOURCE = '''
import torch
from rlfew.rewards import Reward


def brightness(images, prompts, **kw):
    """Mean pixel value (a trl-style reward function)."""
    return images.mean(dim=(1, 2, 3)).tolist()


def differentiable_brightness(images, prompts, **kw):
    return images.mean(dim=(1, 2, 3))
differentiable_brightness.differentiable = True


def prompt_length(images, prompts, scale=1.0, **kw):
    return [scale * len(p) for p in prompts]


class Redness(Reward):
    """Mean of the red channel minus the others."""
    differentiable = True

    def __init__(self, gain=1.0):
        self.gain = gain

    def compute(self, images, prompts, **meta):
        return self.gain * (images[:, 0] - images[:, 1:].mean(1)).mean(dim=(1, 2))


def make_redness(gain=2.0):
    return Redness(gain=gain)


class ForeignScorer:
    """Not an rlfew Reward: just has score()."""
    differentiable = False

    def score(self, images, prompts):
        return torch.ones(len(prompts))


def nan_for_cats(images, prompts, **kw):
    return [float("nan") if "cat" in p else 1.0 for p in prompts]


def wrong_length(images, prompts, **kw):
    return [1.0] * (len(prompts) + 1)


def raises(images, prompts, **kw):
    raise KeyError("boom")
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """An importable plugin module plus an installed distribution declaring one of its rewards as an
    entry point (a dist-info folder on sys.path is what importlib.metadata reads)."""
    (tmp_path / f"{PLUGIN_MODULE}.py").write_text(PLUGIN_SOURCE)
    dist_info = tmp_path / "rlfew_plugin_example-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: rlfew-plugin-example\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(textwrap.dedent(f"""
        [rlfew.rewards]
        redness = {PLUGIN_MODULE}:Redness
        broken = {PLUGIN_MODULE}_missing:thing
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield sys.modules.get(PLUGIN_MODULE) or __import__(PLUGIN_MODULE)
    sys.modules.pop(PLUGIN_MODULE, None)


def images_and_prompts(batch=3, size=16, seed=0):
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return images, [f"prompt number {i}" for i in range(batch)]


# --------------------------------------------------------------------------------------- resolution

def test_builtin_name_resolves_to_its_class():
    reward = load("jpeg", quality=80)
    assert isinstance(reward, JpegCompressibility) and reward.quality == 80
    assert reward.name == "jpeg" and not reward.differentiable
    assert reward.spec == RewardSpec("jpeg", 1.0, {"quality": 80})


def test_module_path_resolves_callable_class_and_factory(plugin):
    images, prompts = images_and_prompts()
    brightness = load(f"{PLUGIN_MODULE}:brightness")
    assert not brightness.differentiable and brightness.name == f"{PLUGIN_MODULE}:brightness"
    torch.testing.assert_close(brightness.score(images, prompts), images.mean(dim=(1, 2, 3)))

    redness = load(f"{PLUGIN_MODULE}:Redness", gain=3.0)
    assert isinstance(redness, plugin.Redness) and redness.differentiable and redness.gain == 3.0
    expected = 3.0 * (images[:, 0] - images[:, 1:].mean(1)).mean(dim=(1, 2))
    torch.testing.assert_close(redness.score(images, prompts), expected)

    from_factory = load(f"{PLUGIN_MODULE}:make_redness")
    assert isinstance(from_factory, plugin.Redness) and from_factory.gain == 2.0

    foreign = load(f"{PLUGIN_MODULE}:ForeignScorer")
    torch.testing.assert_close(foreign.score(images, prompts), torch.ones(3))


def test_callable_options_are_bound_and_meta_passes_through(plugin):
    images, prompts = images_and_prompts()
    reward = load(f"{PLUGIN_MODULE}:prompt_length", scale=0.5)
    torch.testing.assert_close(reward.score(images, prompts), torch.tensor([0.5 * len(p) for p in prompts]))


def test_entry_point_resolves_and_is_listed(plugin):
    reward = load("redness", gain=1.5)
    assert isinstance(reward, plugin.Redness) and reward.name == "redness" and reward.gain == 1.5
    infos = {info.name: info for info in list_rewards()}
    assert infos["redness"].differentiable is True and PLUGIN_MODULE in infos["redness"].source
    assert infos["pickscore"].differentiable is True and infos["jpeg"].differentiable is False
    assert infos["broken"].differentiable is None and "fails to import" in infos["broken"].summary
    with pytest.raises(UsageError, match="entry point 'broken'"):
        load("broken")


def test_trl_style_callable_is_non_differentiable_unless_declared(plugin):
    images, prompts = images_and_prompts()
    calls = []

    def trl_reward(images, prompts, **kwargs):
        calls.append(kwargs)
        return [float(len(p)) for p in prompts]

    reward = load(trl_reward)
    assert isinstance(reward, Reward) and not reward.differentiable and reward.spec is None
    scores = reward.score(images, prompts, step=7)
    assert scores.dtype == torch.float32 and scores.tolist() == [float(len(p)) for p in prompts]
    assert calls == [{"step": 7}]
    assert load(trl_reward, differentiable=True).differentiable
    assert load(plugin.differentiable_brightness).differentiable  # declared on the function


def test_unknown_name_and_bad_path_are_usage_errors(plugin):
    with pytest.raises(UsageError, match="unknown reward 'nope'.*pickscore"):
        load("nope")
    with pytest.raises(UsageError, match="no attribute 'missing'"):
        load(f"{PLUGIN_MODULE}:missing")
    with pytest.raises(UsageError, match="cannot import module"):
        load("no_such_module_xyz:f")
    with pytest.raises(UsageError, match="cannot construct Redness"):
        load(f"{PLUGIN_MODULE}:Redness", colour="red")


def test_spec_is_picklable_and_rebuilds_the_same_reward(plugin):
    images, prompts = images_and_prompts()
    reward = load(f"{PLUGIN_MODULE}:Redness", gain=2.5)
    spec = pickle.loads(pickle.dumps(reward.spec))
    assert spec == RewardSpec(f"{PLUGIN_MODULE}:Redness", 1.0, {"gain": 2.5})
    torch.testing.assert_close(load(spec).score(images, prompts), reward.score(images, prompts))
    # An importable function gets a spec too, so a worker can rebuild it by path.
    assert load(plugin.brightness).spec == RewardSpec(f"{PLUGIN_MODULE}:brightness")


# --------------------------------------------------------------------------------------- validation

def test_nan_names_the_reward_and_only_the_offending_prompts(plugin):
    images, _ = images_and_prompts()
    reward = load(f"{PLUGIN_MODULE}:nan_for_cats")
    with pytest.raises(RewardError) as info:
        reward.score(images, ["a dog", "a cat on a mat", "a bird"])
    message = str(info.value)
    assert f"{PLUGIN_MODULE}:nan_for_cats" in message and "'a cat on a mat'" in message
    assert "a dog" not in message and "1 of 3" in message


def test_infinite_scores_are_rejected():
    reward = load(lambda images, prompts: torch.tensor([1.0, math.inf]))
    with pytest.raises(RewardError, match="non-finite.*'second'"):
        reward.score(torch.rand(2, 3, 8, 8), ["first", "second"])


def test_wrong_shape_and_exceptions_name_reward_and_prompts(plugin):
    images, prompts = images_and_prompts()
    with pytest.raises(RewardError, match=r"wrong_length' returned shape \(4,\), expected \(3,\).*prompt number 0"):
        load(f"{PLUGIN_MODULE}:wrong_length").score(images, prompts)
    with pytest.raises(RewardError, match=r"raises' raised KeyError: 'boom'.*prompt number 2") as info:
        load(f"{PLUGIN_MODULE}:raises").score(images, prompts)
    assert isinstance(info.value.__cause__, KeyError)
    matrix = load(lambda images, prompts: torch.zeros(len(prompts), 1))
    with pytest.raises(RewardError, match=r"shape \(3, 1\)"):
        matrix.score(images, prompts)
    strings = load(lambda images, prompts: ["high"] * len(prompts))
    with pytest.raises(RewardError, match="list of 3 numbers"):
        strings.score(images, prompts)


def test_bad_inputs_are_rejected_before_scoring():
    reward = load("jpeg")
    with pytest.raises(ValueError, match=r"\(B,3,H,W\)"):
        reward.score(torch.rand(3, 8, 8), ["a"])
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        reward.score(torch.rand(2, 3, 8, 8), ["a"])


# -------------------------------------------------------------------------------------------- specs

def test_parse_reward_spec_strings():
    assert parse_reward_spec("pickscore:1.0,hpsv2:0.5") == [RewardSpec("pickscore", 1.0), RewardSpec("hpsv2", 0.5)]
    assert parse_reward_spec(" jpeg ") == [RewardSpec("jpeg")]
    assert parse_reward_spec("pkg.mod:attr:0.25, hpsv2.1") == [RewardSpec("pkg.mod:attr", 0.25), RewardSpec("hpsv2.1")]
    assert parse_reward_spec("pkg.mod:attr") == [RewardSpec("pkg.mod:attr", 1.0)]
    assert parse_reward_spec("jpeg:-2") == [RewardSpec("jpeg", -2.0)]


def test_parse_reward_spec_yaml_list_of_dicts():
    config = yaml.safe_load("""
        reward:
          - {name: pickscore, weight: 1.0, options: {model: /models/pick}}
          - name: jpeg
            weight: 0.1
          - hpsv2:0.5
    """)
    assert parse_reward_spec(config["reward"]) == [
        RewardSpec("pickscore", 1.0, {"model": "/models/pick"}), RewardSpec("jpeg", 0.1), RewardSpec("hpsv2", 0.5)]


@pytest.mark.parametrize("value, message", [
    ("", "empty reward spec"),
    ("pickscore:1,pickscore:2", "appears twice"),
    ([{"name": "jpeg", "weigth": 2}], r"unknown key 'reward.weigth' \(did you mean 'weight'\?\)"),
    ([{"weight": 2}], "reward.name: missing required key"),
    ([{"name": "jpeg", "weight": "heavy"}], "reward.weight: expected float"),
    ([{"name": "jpeg", "weight": float("nan")}], "weight must be a finite number"),
    ([{"name": "jpeg", "options": [1]}], "reward.options: expected a mapping"),
    ([3], "cannot read a reward spec from int"),
])
def test_parse_reward_spec_errors(value, message):
    with pytest.raises(UsageError, match=message):
        parse_reward_spec(value)


# --------------------------------------------------------------------------------------- multi-reward

def test_multi_reward_weighted_sum_and_differentiability(plugin):
    images, prompts = images_and_prompts()
    multi = load(f"{PLUGIN_MODULE}:Redness:2.0,{PLUGIN_MODULE}:differentiable_brightness:-0.5")
    assert isinstance(multi, MultiReward) and multi.differentiable
    redness = (images[:, 0] - images[:, 1:].mean(1)).mean(dim=(1, 2))
    torch.testing.assert_close(multi.score(images, prompts), 2.0 * redness - 0.5 * images.mean(dim=(1, 2, 3)))
    each = multi.score_each(images, prompts)
    assert list(each) == [f"{PLUGIN_MODULE}:Redness", f"{PLUGIN_MODULE}:differentiable_brightness"]
    assert multi.weights == {f"{PLUGIN_MODULE}:Redness": 2.0, f"{PLUGIN_MODULE}:differentiable_brightness": -0.5}
    assert not load(f"{PLUGIN_MODULE}:Redness:1,jpeg:1").differentiable  # one non-differentiable part
    with pytest.raises(UsageError, match="ambiguous"):
        load(f"jpeg:1,{PLUGIN_MODULE}:Redness:2", quality=3)


def test_multi_reward_gradient_is_the_weighted_sum_of_gradients(plugin):
    images, prompts = images_and_prompts()
    images.requires_grad_(True)
    load(f"{PLUGIN_MODULE}:differentiable_brightness:3.0").score(images, prompts).sum().backward()
    torch.testing.assert_close(images.grad, torch.full_like(images, 3.0 / images[0].numel()))


# ---------------------------------------------------------------------------------------------- CLI

@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    flat = np.full((32, 32, 3), 128, dtype=np.uint8)
    noisy = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    for name, array in [("b.png", noisy), ("a.png", flat), ("c.png", flat)]:
        Image.fromarray(array).save(folder / name)
    (tmp_path / "prompts.txt").write_text("grey one\nnoise\ngrey two\n")
    return folder


def test_cli_list_shows_builtins_and_entry_points(plugin, capsys):
    assert cli.main(["rewards", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split()[1] for line in lines[1:]}
    assert rows["pickscore"] == "yes" and rows["jpeg"] == "no" and rows["redness"] == "yes"


def test_cli_score_writes_json_in_sorted_file_order(image_folder, tmp_path, capsys):
    out = tmp_path / "scores.json"
    code = cli.main(["rewards", "score", "--reward", "jpeg", "--images", str(image_folder),
                     "--prompts", str(tmp_path / "prompts.txt"), "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert [row["image"] for row in result["scores"]] == ["a.png", "b.png", "c.png"]
    assert [row["prompt"] for row in result["scores"]] == ["grey one", "noise", "grey two"]
    expected = JpegCompressibility().score(
        from_uint8(np.stack([np.asarray(Image.open(image_folder / n)) for n in ("a.png", "b.png", "c.png")])),
        ["x"] * 3)
    assert [row["jpeg"] for row in result["scores"]] == pytest.approx(expected.tolist())
    assert result["scores"][1]["jpeg"] < result["scores"][0]["jpeg"]  # noise compresses worse
    assert "mean jpeg" in capsys.readouterr().out


def test_cli_score_multi_reward_reports_each_and_total(image_folder, tmp_path, plugin):
    out = tmp_path / "scores.json"
    assert cli.main(["rewards", "score", "--reward", f"jpeg:2,{PLUGIN_MODULE}:brightness:1",
                     "--images", str(image_folder), "--prompts", str(tmp_path / "prompts.txt"),
                     "--out", str(out), "--batch-size", "2"]) == 0
    for row in json.loads(out.read_text())["scores"]:
        assert row["total"] == pytest.approx(2 * row["jpeg"] + row[f"{PLUGIN_MODULE}:brightness"], abs=1e-5)


def test_cli_score_count_mismatch_exits_2(image_folder, tmp_path, capsys):
    (tmp_path / "two.txt").write_text("one\ntwo\n")
    code = cli.main(["rewards", "score", "--reward", "jpeg", "--images", str(image_folder),
                     "--prompts", str(tmp_path / "two.txt")])
    assert code == 2
    assert "3 images" in capsys.readouterr().err
