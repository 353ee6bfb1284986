import argparse
from dataclasses import dataclass, field
from typing import Literal

import pytest

from rlfew import method as method_module
from rlfew.config import (
    ConfigError,
    RewardSpec,
    TrainConfig,
    add_config_arguments,
    config_from_args,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_reward_spec,
    save_config,
)
from rlfew.method import Method, register_method, resolve_algo_options


def write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_without_a_file():
    cfg = load_config(None)
    assert isinstance(cfg, TrainConfig)
    assert cfg.model.source == "world:teacher"
    assert cfg.algo.name == "dmd" and cfg.algo.options == {}
    assert cfg.train.prompts == "world:train" and cfg.eval.prompts == "world:eval"
    assert cfg.runtime.backend == "ray" and cfg.runtime.placement == "colocated"


def test_yaml_recipe_and_overrides(tmp_path):
    path = write(tmp_path, """
run: {name: demo, seed: 3}
train:
  steps: 50
  lr: 1e-4          # YAML 1.1 would read this as a string
algo: {name: grpo, options: {group_size: 8}}
reward:
  - {name: pickscore, weight: 2}
""")
    cfg = load_config(path, ["train.steps=200", "roles.critic.lr=3e-5", "roles.generator.lora_targets=[to_q, to_v]",
                             "eval.max_prompts=null", "algo.options.clip=0.2", "run.name=2024"])
    assert cfg.run.name == "2024"  # string fields keep the text as typed
    assert cfg.run.seed == 3
    assert cfg.train.steps == 200
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert cfg.roles == {"critic": {"lr": pytest.approx(3e-5)}, "generator": {"lora_targets": ["to_q", "to_v"]}}
    assert cfg.eval.max_prompts is None
    assert cfg.algo.options == {"group_size": 8, "clip": 0.2}
    assert cfg.reward == [RewardSpec(name="pickscore", weight=2.0)]
    assert isinstance(cfg.reward[0].weight, float)  # ints are accepted for floats


def test_unknown_key_names_dotted_key_and_allowed_keys():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.stpes=10"])
    message = str(err.value)
    assert "'train.stpes'" in message and "did you mean 'steps'" in message
    assert "steps, prompts_per_step, group_size" in message

    with pytest.raises(ConfigError, match=r"unknown key 'trian'.*allowed keys: run, model, generator"):
        load_config(None, ["trian.steps=10"])


def test_unknown_key_in_yaml_nested(tmp_path):
    path = write(tmp_path, "reward:\n  - name: pickscore\n    wieght: 1\n")
    with pytest.raises(ConfigError, match=r"'reward\[0\]\.wieght'.*name, weight, options, runtime_env"):
        load_config(path)


def test_non_numeric_value_names_key_type_and_value():
    with pytest.raises(ConfigError, match=r"train\.steps: expected int, got 'abc' \(str\)"):
        load_config(None, ["train.steps=abc"])
    with pytest.raises(ConfigError, match=r"train\.lr: expected float, got 'fast'"):
        load_config(None, ["train.lr=fast"])
    with pytest.raises(ConfigError, match=r"train\.steps: expected int, got 1\.5"):
        load_config(None, ["train.steps=1.5"])
    with pytest.raises(ConfigError, match=r"train\.steps: expected int, got True"):
        load_config(None, ["train.steps=true"])
    with pytest.raises(ConfigError, match=r"generator\.shift: expected float, got 'x' \(str\) \(or null\)"):
        load_config(None, ["generator.shift=x"])


def test_bad_literal_lists_allowed_values():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.dtype=fp32"])
    assert str(err.value) == "model.dtype: 'fp32' is not allowed; choose one of 'float32', 'bfloat16', 'float16'"
    with pytest.raises(ConfigError, match="'colocated', 'disaggregated'"):
        load_config(None, ["runtime.placement=spread"])


def test_missing_yaml_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=f"config file '{missing}' does not exist"):
        load_config(missing)


def test_yaml_syntax_error_names_line(tmp_path):
    path = write(tmp_path, "train:\n  steps: 10\n  lr: [1e-4\nmodel: {}\n")
    with pytest.raises(ConfigError, match=rf"{path}: line \d+, column \d+: invalid YAML"):
        load_config(path)


def test_top_level_must_be_mapping(tmp_path):
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        load_config(None, ["train.steps"])
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        load_config(None, ["train..steps=3"])


def test_override_into_a_scalar_is_rejected():
    with pytest.raises(ConfigError, match=r"run\.seed: expected int"):
        load_config(None, ["run.seed.x=1"])


def test_round_trip(tmp_path):
    cfg = load_config(None, ["train.lr=1e-10", "reward=pickscore:0.5", "run.name=on", "algo.options.beta=0.1",
                             "generator.shift=3", "model.resolution=256"])
    path = save_config(cfg, tmp_path / "out" / "config.yaml")
    again = load_config(path)
    assert again == cfg
    assert config_from_dict(TrainConfig, config_to_dict(cfg)) == cfg


def test_nothing_written_on_error(tmp_path):
    target = tmp_path / "config.yaml"
    with pytest.raises(ConfigError):
        save_config(load_config(None, ["train.steps=x"]), target)
    assert list(tmp_path.iterdir()) == []


def test_reward_shortcut_parsing():
    assert parse_reward_spec("pickscore:1.0,hpsv2:0.5") == [RewardSpec("pickscore", 1.0), RewardSpec("hpsv2", 0.5)]
    assert parse_reward_spec("world_eval") == [RewardSpec("world_eval")]
    # a module:attr reward keeps its colon; only a trailing number is a weight
    assert [(e.name, e.weight) for e in parse_reward_spec("my_pkg.rewards:score:2, my_pkg.rewards:other")] == [
        ("my_pkg.rewards:score", 2.0), ("my_pkg.rewards:other", 1.0)]
    with pytest.raises(ConfigError, match="empty entry"):
        parse_reward_spec("pickscore,,hpsv2")
    with pytest.raises(ConfigError, match="'jpeg' appears twice"):
        parse_reward_spec("jpeg,jpeg:2")
    cfg = load_config(None, ["reward=pickscore:1.0,hpsv2:0.5"])
    assert cfg.reward == [RewardSpec("pickscore", 1.0), RewardSpec("hpsv2", 0.5)]


def test_reward_shortcut_in_yaml(tmp_path):
    cfg = load_config(write(tmp_path, "reward: 'clip:2'\n"))
    assert cfg.reward == [RewardSpec("clip", 2.0)]


def test_moved_keys_say_where_they_live_now():
    for old, new in [("train.batch_size=4", "train.prompts_per_step"), ("train.critic_lr=1e-5", "roles.critic.lr"),
                     ("critic.lora_rank=4", "roles.critic"), ("generator.lora_rank=4", "roles.generator.lora_rank"),
                     ("generator.eta=0.3", "the method's options"), ("model.family=flow", "the pipeline")]:
        with pytest.raises(ConfigError, match=new):
            load_config(None, [old])


def test_train_sizes_are_checked_together():
    with pytest.raises(ConfigError, match="train.micro_batch_size"):
        load_config(None, ["train.group_size=4", "train.micro_batch_size=6"])
    with pytest.raises(ConfigError, match="runtime.num_learners=2"):
        load_config(None, ["train.prompts_per_step=3", "runtime.num_learners=2"])
    with pytest.raises(ConfigError, match="train.keep_checkpoints"):
        load_config(None, ["train.keep_checkpoints=0"])
    cfg = load_config(None, ["train.group_size=4", "train.micro_batch_size=8", "train.prompts_per_step=4",
                             "runtime.num_learners=2"])
    assert cfg.train.micro_batch_size == 8


@dataclass
class _ToyOptions:
    group_size: int = 4
    reg: Literal["dmd", "kl", "none"] = "dmd"
    clip_range: float = 0.2
    windows: list[int] = field(default_factory=lambda: [0, 1])


@pytest.fixture
def toy_algo(monkeypatch):
    """A method registered for this test only (the registry is restored afterwards)."""
    monkeypatch.setattr(method_module, "METHODS", {})
    monkeypatch.setattr(method_module, "available_methods", lambda: sorted(method_module.METHODS))

    @register_method
    class Toy(Method):
        name, Options = "toy", _ToyOptions

    return Toy


def test_algo_options_registry(toy_algo):
    cfg = load_config(None, ["algo.name=toy", "algo.options.group_size=8", "algo.options.reg=kl"])
    assert resolve_algo_options(cfg) == _ToyOptions(group_size=8, reg="kl")
    assert resolve_algo_options(load_config(None, ["algo.name=toy"])) == _ToyOptions()

    with pytest.raises(ConfigError, match=r"unknown key 'algo\.options\.group'.*group_size, reg, clip_range, windows"):
        resolve_algo_options(load_config(None, ["algo.name=toy", "algo.options.group=8"]))
    with pytest.raises(ConfigError, match=r"algo\.options\.reg: 'l2' is not allowed; choose one of 'dmd', 'kl', 'none'"):
        resolve_algo_options(load_config(None, ["algo.name=toy", "algo.options.reg=l2"]))
    with pytest.raises(ConfigError, match=r"algo\.options\.windows\[1\]: expected int"):
        resolve_algo_options(load_config(None, ["algo.name=toy", "algo.options.windows=[0, x]"]))


def test_unknown_algo_lists_registered(toy_algo):
    with pytest.raises(ConfigError, match=r"algo\.name: unknown method 'nosuchmethod'; allowed: toy"):
        resolve_algo_options(load_config(None, ["algo.name=nosuchmethod"]))


def test_register_rejects_conflicts(toy_algo):
    register_method(toy_algo)  # re-registering the same class (module reload) is fine

    class Other(Method):
        name, Options = "toy", _ToyOptions

    with pytest.raises(ValueError, match="is taken by"):
        register_method(Other)
    Other.name, Other.Options = "other", dict
    with pytest.raises(TypeError, match="must be a dataclass"):
        register_method(Other)


def test_every_method_is_listed_once():
    assert {"dmd", "dmdr"} <= set(method_module.available_methods())


def parse(argv):
    return add_config_arguments(argparse.ArgumentParser()).parse_args(argv)


def test_cli_arguments(tmp_path):
    path = write(tmp_path, "algo: {name: dmd, options: {guidance_only: true}}\ntrain: {steps: 10}\n")
    cfg = config_from_args(parse([str(path), "train.lr=1e-3", "run.seed=7", "--set", "train.steps=20",
                                  "--reward", "pickscore:1,hpsv2:0.5"]))
    assert cfg.train.steps == 20 and cfg.train.lr == pytest.approx(1e-3) and cfg.run.seed == 7
    assert [(r.name, r.weight) for r in cfg.reward] == [("pickscore", 1.0), ("hpsv2", 0.5)]
    assert cfg.algo.options == {"guidance_only": True}

    # --algo switching method drops the recipe's options, which belong to the other method
    switched = config_from_args(parse([str(path), "--algo", "grpo"]))
    assert switched.algo.name == "grpo" and switched.algo.options == {}
    # explicit overrides win over the shortcuts
    cfg = config_from_args(parse(["--algo", "grpo", "--set", "algo.name=dmdr", "train.steps=3"]))
    assert cfg.algo.name == "dmdr" and cfg.train.steps == 3


def test_cli_rejects_two_config_paths(tmp_path):
    with pytest.raises(ConfigError, match="more than one config file"):
        config_from_args(parse(["a.yaml", "b.yaml"]))
