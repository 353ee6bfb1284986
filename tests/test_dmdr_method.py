"""DMDR through real roles on tiny "sd" (SD-Turbo-shaped ε UNet) and "sd3" (flow) pipelines with a tiny PickScore,
LoRA generator and LoRA critic, built by `build_method` and rolled out by `rollout_batch` as a learner does: finite
losses, the reward term only after the cold start, which parameters move when, the schedules against their closed
forms, the VP first-step input, a bit-exact resume across the stage switch, and the construction errors."""

import math

import pytest
import torch

from rlfew.algos.dmdr import DMDR
from rlfew.checkpoint import load_checkpoint, save_checkpoint
from rlfew.config import load_config
from rlfew.errors import ConfigError
from rlfew.method import build_method, resolve_method
from rlfew.rewards.tiny import build_tiny_clip
from rlfew.testing import rollout_batch

PROMPTS = ["a red circle", "two blue squares"]
SWITCHES = [(True, True), (True, False), (False, True), (False, False)]  # (dynadg, dynars)


@pytest.fixture(scope="module")
def tiny_pickscore(tmp_path_factory) -> str:
    clip = build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))
    return f"reward=[{{name: pickscore, options: {{model: '{clip}', processor: '{clip}'}}}}]"


def dmdr(tiny_config, family: str, reward: str, *options: str, overrides: tuple[str, ...] = ()) -> DMDR:
    """DMDR with TTUR 2, a cold start of 1 generator turn, λ = 1 and K_dyn = 4 unless `options` say otherwise."""
    algo = ", ".join(["ttur: 2", "cold_start_steps: 1", "reward_weight: 1.0", "dynamic_steps: 4", *options])
    return build_method(tiny_config(family, "algo.name=dmdr", "roles.generator.lora_rank=4",
                                    "roles.critic.lora_rank=4", "train.warmup_steps=2", reward,
                                    f"algo.options={{{algo}}}", *overrides))


def params(method, role: str):
    return method.optimizers[role].params


def snapshot(tensors) -> list[torch.Tensor]:
    return [t.detach().clone() for t in tensors]


def moved(before, tensors) -> bool:
    return any(not torch.equal(b, t) for b, t in zip(before, tensors))


def cosine(start: float, end: float, turn: int, total: int) -> float:
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(turn / total, 1.0)))


@pytest.mark.parametrize("dynadg,dynars", SWITCHES)
@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_reward_joins_after_the_cold_start_and_every_role_moves_on_its_turns(tiny_config, tiny_pickscore, family,
                                                                            dynadg, dynars):
    """TTUR 2, cold start 1 generator turn: iteration 0 is pure DMD, iteration 2 adds the reward; the schedules
    follow their closed forms in generator turns (0, 1, 1, 2 before iterations 0..3)."""
    method = dmdr(tiny_config, family, tiny_pickscore, f"dynadg: {str(dynadg).lower()}",
                  f"dynars: {str(dynars).lower()}")
    teacher = [p for n, p in method.roles["teacher"].net.named_parameters() if ".lora_" not in n]
    teacher_before = snapshot(teacher)
    for step, turn in zip(range(4), (0, 1, 1, 2)):
        generator_before, critic_before = snapshot(params(method, "generator")), snapshot(params(method, "critic"))
        result = method.train_step(rollout_batch(method, step, PROMPTS))
        metrics = result.metrics
        assert not result.skipped and all(math.isfinite(value) for value in metrics.values()), metrics
        generator_turn = step % 2 == 0
        assert metrics["updated/generator"] == float(generator_turn) and ("loss/dmd" in metrics) == generator_turn
        assert moved(generator_before, params(method, "generator")) == generator_turn
        assert moved(critic_before, params(method, "critic"))
        assert ("reward/pickscore" in metrics) == ("loss/reward" in metrics) == (step == 2)
        assert metrics["schedule/dynadg_real_lora_scale"] == pytest.approx(cosine(0.75, 0.0, turn, 4) if dynadg else 0)
        if dynars:
            a, b = cosine(4.0, 1.0, turn, 4), cosine(1.5, 1.0, turn, 4)
            assert metrics["schedule/dynars_mean_noise_fraction"] == pytest.approx(a / (a + b))
    assert not moved(teacher_before, teacher)
    assert {name: opt.steps for name, opt in method.optimizers.items()} == {"generator": 2, "critic": 4}


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_rollout_state_input_and_a_multi_reward_train_too(tiny_config, tiny_pickscore, family):
    clip = tiny_pickscore.split("model: '")[1].split("'")[0]
    rewards = (f"reward=[{{name: pickscore, options: {{model: '{clip}', processor: '{clip}'}}}}, "
               f"{{name: clipscore, weight: 0.5, options: {{model: '{clip}'}}}}]")
    method = dmdr(tiny_config, family, rewards, "generator_input: rollout_state", "cold_start_steps: 0",
                  "decode_checkpointed: true")
    metrics = method.train_step(rollout_batch(method, 0, PROMPTS)).metrics
    assert metrics["schedule/reward_active"] == 1.0 and metrics["updated/generator"] == 1.0
    assert {"reward/pickscore", "reward/clipscore"} <= set(metrics)
    assert all(math.isfinite(value) for value in metrics.values()), metrics


def test_vp_first_step_input_is_the_prior_sample_not_renoised_x0(tiny_config, tiny_pickscore):
    """H4: at k = 0 (σ_max = 0.936 on VP models) re-noising the rollout's x̂0 kept 6.4% of it in what must be pure
    noise; DMDR's input at k = 0 is the rollout's prior sample itself, for either generator_input."""
    method = dmdr(tiny_config, "sd", tiny_pickscore, "reward_weight: 0.0")
    batch = rollout_batch(method, 0, PROMPTS)
    trajectory = batch.trajectory
    for seed in range(40):  # find a shared stream that draws k = 0
        batch.shared_rng.manual_seed(seed)
        k, x_in, sigma = method.generator_input(trajectory, batch)
        if k == 0:
            break
    assert k == 0 and sigma == pytest.approx(method.roles.adapter.sigma_max)
    assert torch.equal(x_in, trajectory.states[:, 0])
    batch.shared_rng.manual_seed(seed + 1)
    later_k, later_input, _ = method.generator_input(trajectory, batch)
    if later_k > 0:  # other steps re-noise the rollout's own x̂0 at step k with fresh noise (§2.4)
        assert not torch.equal(later_input, trajectory.states[:, later_k])


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_resume_across_the_cold_start_is_bit_exact(tiny_config, tiny_pickscore, tmp_path, family):
    """Checkpoint after 2 iterations (safetensors + JSON), load into a fresh method, run iterations 2 (the first
    with the reward) and 3 on both: metrics and parameters identical."""
    original = dmdr(tiny_config, family, tiny_pickscore)
    for step in range(2):
        original.train_step(rollout_batch(original, step, PROMPTS))
    state = original.state_dict()
    checkpoint = load_checkpoint(save_checkpoint(tmp_path, 2, state["tensors"], state["state"]))
    resumed = dmdr(tiny_config, family, tiny_pickscore)
    assert moved(snapshot(params(original, "generator")), params(resumed, "generator"))
    resumed.load_state_dict({"tensors": checkpoint.tensors, "state": checkpoint.state})
    for step in (2, 3):
        assert resumed.train_step(rollout_batch(resumed, step, PROMPTS)) == \
            original.train_step(rollout_batch(original, step, PROMPTS))
    for role in ("generator", "critic"):
        assert all(torch.equal(a, b) for a, b in zip(params(original, role), params(resumed, role)))


def test_non_finite_generator_output_skips_the_step_without_scoring(tiny_config, tiny_pickscore):
    """NaN samples make the DM loss NaN: reported and skipped before the reward sees them (it would raise)."""
    method = dmdr(tiny_config, "sd3", tiny_pickscore, "cold_start_steps: 0")
    with torch.no_grad():
        params(method, "generator")[0].fill_(float("nan"))
    result = method.train_step(rollout_batch(method, 0, PROMPTS))
    assert result.skipped and math.isnan(result.metrics["loss/generator"]) and "reward/pickscore" not in result.metrics
    assert {name: opt.steps for name, opt in method.optimizers.items()} == {"generator": 0, "critic": 0}


def test_the_critic_is_a_lora_at_the_fake_scale_without_weight_decay(tiny_config, tiny_pickscore):
    """DynaDG's Ψ: a LoRA on the teacher's network at s_f = 2, with weight decay 0 as DMDR's §2.5 (the generator
    keeps train.weight_decay); the old code decayed Ψ too."""
    method = dmdr(tiny_config, "sd3", tiny_pickscore)
    critic = method.roles["critic"]
    assert critic.lora == "critic" and critic.lora_scale == 2.0 and critic.net is method.roles["teacher"].net
    assert method.optimizers["critic"].settings.weight_decay == 0.0
    assert method.optimizers["generator"].settings.weight_decay == 0.01


@pytest.mark.parametrize("overrides,named", [(("roles.critic.lora_rank=0",), "roles.critic"),
                                             (("roles.critic.own_network=true",), "roles.critic")])
def test_dynadg_needs_a_lora_critic_on_the_teachers_network(overrides, named):
    cfg = load_config(None, ["algo.name=dmdr", *overrides])
    with pytest.raises(ConfigError, match=named):
        resolve_method(cfg)
    resolve_method(load_config(None, ["algo.name=dmdr", "algo.options={dynadg: false}", *overrides]))


def test_construction_rejects_a_missing_or_non_differentiable_reward(tiny_config, tiny_pickscore):
    with pytest.raises(ConfigError, match="'jpeg' is not differentiable"):
        dmdr(tiny_config, "sd3", "reward=jpeg")
    clip = tiny_pickscore.split("model: '")[1].split("'")[0]
    with pytest.raises(ConfigError, match="'jpeg' is not differentiable"):
        dmdr(tiny_config, "sd3", f"reward=[{{name: pickscore, options: {{model: '{clip}', processor: '{clip}'}}}}, "
                                 f"{{name: jpeg, weight: 0.5}}]")
    with pytest.raises(ConfigError, match="needs a differentiable reward"):
        dmdr(tiny_config, "sd3", "reward=[]")
    assert dmdr(tiny_config, "sd3", "reward=[]", "reward_weight: 0.0").reward is None  # DynaDG / DynaRS DMD only


@pytest.mark.parametrize("bad,named", [({"ttur": 0}, "ttur"), ({"cold_start_steps": -1}, "cold_start_steps"),
                                       ({"dynars_start": [4.0]}, "dynars_start"),
                                       ({"dm_sigma_range": [0.5, 0.2]}, "dm_sigma_range")])
def test_bad_options_name_the_key(bad, named):
    with pytest.raises(ConfigError, match=named):
        DMDR.Options(**bad)


def test_a_moved_option_says_where_it_lives_now():
    with pytest.raises(ConfigError, match="'algo.options.fake_lora_scale' has moved: use roles.critic.lora_scale"):
        resolve_method(load_config(None, ["algo.name=dmdr", "algo.options={fake_lora_scale: 2.0}"]))


def test_distillation_weight_zero_is_reward_only_fine_tuning(tiny_config, tiny_pickscore):
    """The reward-hacking baseline: with L_DMD weighted 0 the generator's step ignores the critic entirely, so a
    randomised critic LoRA leaves it unchanged; with the DM term on, it does not."""
    steps = {}
    for distillation in (0.0, 1.0):
        for randomise in (False, True):
            method = dmdr(tiny_config, "sd3", tiny_pickscore, "cold_start_steps: 0",
                          f"distillation_weight: {distillation}")
            if randomise:
                with torch.no_grad():
                    for param in params(method, "critic"):
                        param.add_(0.5 * torch.randn(param.shape, generator=torch.Generator().manual_seed(1)))
            method.train_step(rollout_batch(method, 0, PROMPTS))
            steps[distillation, randomise] = snapshot(params(method, "generator"))
    assert not moved(steps[0.0, False], steps[0.0, True])
    assert moved(steps[1.0, False], steps[1.0, True])
