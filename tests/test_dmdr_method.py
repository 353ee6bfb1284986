"""DMDR through real roles on tiny "sd" (SD-Turbo-shaped ε UNet) and "sd3" (flow) pipelines with a tiny PickScore,
LoRA generator and LoRA critic, rolled out as the trainer does: finite losses, the reward term only after the cold
start, which parameters move when, a bit-exact resume across the stage switch, and the construction errors."""

import math

import pytest
import torch

from rlfew.algos.dmdr import DMDR
from rlfew.checkpoint import load_checkpoint, save_checkpoint
from rlfew.config import TrainConfig
from rlfew.errors import ConfigError
from rlfew.method import Batch, get_method
from rlfew.models import build_roles
from rlfew.rewards import load
from rlfew.rewards.tiny import build_tiny_clip
from rlfew.sampling import sample

PROMPTS = ["a red circle", "two blue squares"]
SWITCHES = [(True, True), (True, False), (False, True), (False, False)]  # (dynadg, dynars)


@pytest.fixture(scope="module")
def tiny_pickscore(tmp_path_factory):
    clip = build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))
    return {"name": "pickscore", "weight": 1.0, "options": {"model": str(clip), "processor": str(clip)}}


def make_cfg(source: str, critic_lora_rank: int = 4) -> TrainConfig:
    cfg = TrainConfig()
    cfg.model.source = source
    cfg.generator.lora_rank, cfg.critic.lora_rank = 4, critic_lora_rank
    cfg.generator.steps = 2
    cfg.train.lr = cfg.train.critic_lr = 1e-3
    cfg.train.warmup_steps = 2
    return cfg


def build_method(source: str, reward_entries: list[dict], **options) -> DMDR:
    """As the Learner builds it: seeded LoRA init, the reward from `rlfew.rewards.load`."""
    cfg = make_cfg(source)
    method_cls = get_method("dmdr")
    options = method_cls.Options(**{"ttur": 2, "cold_start_steps": 1, "reward_weight": 1.0, "dynamic_steps": 4,
                                    **options})
    torch.manual_seed(0)
    roles = build_roles(cfg.model.source, generator_lora_rank=cfg.generator.lora_rank,
                        lora_alpha=cfg.generator.lora_alpha, **method_cls.role_spec(cfg, options))
    return method_cls(roles, options, cfg, load(reward_entries))


def run_iteration(method: DMDR, step: int, rng: torch.Generator) -> dict[str, float]:
    adapter = method.roles.adapter
    cond = adapter.encode_prompts(PROMPTS)
    with torch.no_grad():
        trajectory = sample(method.roles.generator, cond, adapter.sigma_grid(method.cfg.generator.steps),
                            DMDR.rollout_sampler(method.cfg, method.options), prompts=PROMPTS, generator=rng,
                            decode=False)
    return method.train_step(Batch(step, trajectory, cond, rng))


def snapshot(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def moved(before, params) -> bool:
    return any(not torch.equal(b, p) for b, p in zip(before, params))


def teacher_parameters(method: DMDR) -> list[torch.Tensor]:
    return [p for name, p in method.roles.teacher.net.named_parameters()
            if ".generator." not in name and ".critic." not in name]


@pytest.mark.parametrize("dynadg,dynars", SWITCHES)
@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_reward_joins_after_the_cold_start_and_every_role_moves_on_its_turns(tiny_pipeline_dir, tiny_pickscore,
                                                                            family, dynadg, dynars):
    """ttur 2, cold start 1 generator turn: iteration 0 is pure DMD, iteration 2 adds the reward."""
    method = build_method(tiny_pipeline_dir(family), [tiny_pickscore], dynadg=dynadg, dynars=dynars)
    teacher_before = snapshot(teacher_parameters(method))
    rng = torch.Generator().manual_seed(0)
    for step in range(4):
        generator_before, critic_before = snapshot(method.generator_params), snapshot(method.critic_params)
        metrics = run_iteration(method, step, rng)
        assert all(math.isfinite(value) for value in metrics.values()), metrics
        generator_turn = step % 2 == 0
        assert bool(metrics["generator_step"]) == generator_turn == ("dmd_loss" in metrics)
        assert moved(generator_before, method.generator_params) == generator_turn
        assert moved(critic_before, method.critic_params)
        reward_term = step == 2
        assert ("reward" in metrics) == reward_term and metrics.get("reward_active") == (
            float(reward_term) if generator_turn else None)
        if reward_term:
            assert metrics["reward_loss"] == -metrics["reward"]
            assert metrics["generator_loss"] == pytest.approx(metrics["dmd_loss"] + metrics["reward_loss"])
        elif generator_turn:
            assert metrics["generator_loss"] == metrics["dmd_loss"]
        k = method.schedule_step(step)
        assert metrics["dynadg_real_lora_scale"] == (0.75 * 0.5 * (1 + math.cos(math.pi * k / 4)) if dynadg else 0)
        assert metrics["dynars_mean"] == pytest.approx(
            method.mean_noise_fraction(k, method.options.dm_sigma_range) if dynars else 0.5)
    assert not moved(teacher_before, teacher_parameters(method))
    assert method.updates == {"generator": 2, "critic": 4}


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_rollout_state_input_and_a_multi_reward_train_too(tiny_pipeline_dir, tiny_pickscore, family):
    second = {"name": "clipscore", "weight": 0.5, "options": {"model": tiny_pickscore["options"]["model"]}}
    method = build_method(tiny_pipeline_dir(family), [tiny_pickscore, second], generator_input="rollout_state",
                          cold_start_steps=0, decode_checkpointed=True)
    metrics = run_iteration(method, 0, torch.Generator().manual_seed(0))
    assert metrics["reward_active"] == 1.0 and metrics["generator_step"] == 1.0
    assert all(math.isfinite(value) for value in metrics.values()), metrics


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_resume_across_the_cold_start_is_bit_exact(tiny_pipeline_dir, tiny_pickscore, tmp_path, family):
    """Checkpoint after 2 iterations (safetensors + JSON), load into a fresh method, run iterations 2 (the first
    with the reward) and 3 on both: metrics and parameters identical."""
    source = tiny_pipeline_dir(family)
    original = build_method(source, [tiny_pickscore])
    rng = torch.Generator().manual_seed(0)
    for step in range(2):
        run_iteration(original, step, rng)
    state = original.state_dict()
    checkpoint = load_checkpoint(save_checkpoint(tmp_path, 2, state["tensors"], state["state"], rng=False))
    resumed = build_method(source, [tiny_pickscore])
    assert moved(snapshot(original.generator_params), resumed.generator_params)
    resumed.load_state_dict({"tensors": checkpoint.tensors, "state": checkpoint.state})
    resumed_rng = torch.Generator().manual_seed(0)
    resumed_rng.set_state(rng.get_state())
    for step in (2, 3):
        assert run_iteration(resumed, step, resumed_rng) == run_iteration(original, step, rng)
    for mine, theirs in ((original.generator_params, resumed.generator_params),
                         (original.critic_params, resumed.critic_params)):
        assert all(torch.equal(a, b) for a, b in zip(mine, theirs))
    assert resumed.updates == original.updates == {"generator": 2, "critic": 4}


def test_non_finite_generator_output_skips_the_step_without_scoring(tiny_pipeline_dir, tiny_pickscore):
    """NaN samples make the DMD loss NaN: reported and skipped before the reward sees them (it would raise)."""
    method = build_method(tiny_pipeline_dir("sd3"), [tiny_pickscore], cold_start_steps=0)
    with torch.no_grad():
        method.generator_params[0].fill_(float("nan"))
    metrics = run_iteration(method, 0, torch.Generator().manual_seed(0))
    assert math.isnan(metrics["generator_loss"]) and metrics["generator_step"] == 0.0 and "reward" not in metrics
    assert "critic_loss" not in metrics and method.updates == {"generator": 0, "critic": 0}
    assert all(p.grad is None for p in method.generator_params + method.critic_params)


def test_role_spec_puts_the_critic_lora_at_the_fake_scale_under_dynadg():
    cfg = make_cfg("unused")
    assert DMDR.role_spec(cfg, DMDR.Options()) == {"critic": "lora", "critic_lora_rank": 4,
                                                   "critic_lora_alpha": 16.0, "critic_lora_scale": 2.0}
    cfg.critic.lora_rank = 0
    assert DMDR.role_spec(cfg, DMDR.Options(dynadg=False))["critic"] == "full"
    with pytest.raises(ConfigError, match="critic.lora_rank"):
        DMDR.role_spec(cfg, DMDR.Options())


def test_construction_rejects_a_missing_or_non_differentiable_reward(tiny_pipeline_dir, tiny_pickscore):
    with pytest.raises(ConfigError, match="'jpeg' is not differentiable"):
        build_method(tiny_pipeline_dir("sd3"), [{"name": "jpeg"}])
    with pytest.raises(ConfigError, match="'jpeg' is not differentiable"):
        build_method(tiny_pipeline_dir("sd3"), [tiny_pickscore, {"name": "jpeg", "weight": 0.5}])
    cfg = make_cfg(tiny_pipeline_dir("sd3"))
    options = DMDR.Options()
    roles = build_roles(cfg.model.source, generator_lora_rank=4, **DMDR.role_spec(cfg, options))
    with pytest.raises(ConfigError, match="needs a differentiable reward"):
        DMDR(roles, options, cfg, reward=None)
    DMDR(roles, DMDR.Options(reward_weight=0.0), cfg, reward=None)  # DMD with DynaDG / DynaRS only


@pytest.mark.parametrize("bad,named", [({"ttur": 0}, "ttur"), ({"cold_start_steps": -1}, "cold_start_steps"),
                                       ({"dynars_start": [4.0]}, "dynars_start"),
                                       ({"dm_sigma_range": [0.5, 0.2]}, "dm_sigma_range")])
def test_bad_options_name_the_key(bad, named):
    with pytest.raises(ConfigError, match=named):
        DMDR.Options(**bad)


def test_distillation_weight_zero_is_reward_only_fine_tuning(tiny_pipeline_dir, tiny_pickscore):
    """The reward-hacking baseline: with L_DMD weighted 0 the generator loss is λ·L_reward alone."""
    method = build_method(tiny_pipeline_dir("sd3"), [tiny_pickscore], distillation_weight=0.0, reward_weight=0.3)
    adapter = method.roles.adapter
    x = torch.randn(len(PROMPTS), *adapter.latent_shape(64), generator=torch.Generator().manual_seed(0))
    direction = torch.randn_like(x)
    total, metrics = method.generator_loss(x, direction, PROMPTS, with_reward=True)
    assert metrics["dmd_loss"] > 0
    assert float(total) == pytest.approx(0.3 * metrics["reward_loss"], rel=1e-6)
