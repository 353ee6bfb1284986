"""DMD through real roles on tiny "sd3" (flow) and "sd" (ε UNet) pipelines, built and rolled out exactly as the
trainer does: which parameters move on which iteration, finite losses, and a bit-exact checkpoint resume."""

import math

import pytest
import torch

from rlfew.algos.dmd import DMD
from rlfew.checkpoint import load_checkpoint, save_checkpoint
from rlfew.config import TrainConfig
from rlfew.method import Batch, get_method
from rlfew.models import build_roles
from rlfew.sampling import sample

PROMPTS = ["a red circle", "two blue squares"]
ROLE_SETUPS = [  # (family, generator LoRA rank, critic LoRA rank); rank 0 = full weights
    ("sd3", 4, 0), ("sd3", 0, 4), ("sd3", 4, 4), ("sd3", 0, 0), ("sd", 4, 0), ("sd", 0, 4), ("sd", 4, 4), ("sd", 0, 0),
]


def build_method(source: str, generator_lora_rank: int, critic_lora_rank: int) -> DMD:
    cfg = TrainConfig()
    cfg.model.source = source
    cfg.generator.lora_rank, cfg.critic.lora_rank = generator_lora_rank, critic_lora_rank
    cfg.generator.steps = 2
    cfg.train.lr = cfg.train.critic_lr = 1e-3
    cfg.train.warmup_steps = 3
    method_cls = get_method("dmd")
    options = method_cls.Options(ttur=2)  # real guidance: teacher.guidance (4.5), so the CFG path runs
    roles = build_roles(cfg.model.source, generator_source=cfg.generator.source,
                        generator_lora_rank=cfg.generator.lora_rank, lora_alpha=cfg.generator.lora_alpha,
                        lora_targets=cfg.generator.lora_targets, dtype=cfg.model.dtype,
                        **method_cls.role_spec(cfg, options))
    return method_cls(roles, options, cfg)


def run_iteration(method: DMD, step: int, rng: torch.Generator) -> dict[str, float]:
    cfg, adapter = method.cfg, method.roles.adapter
    cond = adapter.encode_prompts(PROMPTS)
    with torch.no_grad():
        trajectory = sample(method.roles.generator, cond, adapter.sigma_grid(cfg.generator.steps, cfg.generator.shift),
                            DMD.rollout_sampler(cfg, method.options), prompts=PROMPTS, generator=rng, guidance=1.0,
                            decode=False)
    return method.train_step(Batch(step, trajectory, cond, rng))


def teacher_parameters(method: DMD) -> dict[str, torch.Tensor]:
    """The teacher's own weights (LoRA adapters that other roles hang on its network excluded)."""
    return {name: p for name, p in method.roles.teacher.net.named_parameters()
            if ".generator." not in name and ".critic." not in name}


def snapshot(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def moved(before, params) -> bool:
    return any(not torch.equal(b, p) for b, p in zip(before, params))


def test_role_spec_asks_for_a_full_or_lora_critic():
    cfg = TrainConfig()
    cfg.critic.lora_rank = 0
    assert DMD.role_spec(cfg, DMD.Options())["critic"] == "full"
    cfg.critic.lora_rank, cfg.critic.lora_alpha = 8, 4.0
    assert DMD.role_spec(cfg, DMD.Options()) == {"critic": "lora", "critic_lora_rank": 8, "critic_lora_alpha": 4.0}


@pytest.mark.parametrize("family,generator_rank,critic_rank", ROLE_SETUPS)
def test_train_step_moves_generator_on_its_turns_critic_always_teacher_never(tiny_pipeline_dir, family,
                                                                            generator_rank, critic_rank):
    method = build_method(tiny_pipeline_dir(family), generator_rank, critic_rank)
    teacher = teacher_parameters(method)
    teacher_before = snapshot(teacher.values())
    rng = torch.Generator().manual_seed(0)
    for step in range(4):
        generator_before, critic_before = snapshot(method.generator_params), snapshot(method.critic_params)
        metrics = run_iteration(method, step, rng)
        assert all(math.isfinite(value) for value in metrics.values()), metrics
        generator_turn = step % 2 == 0
        assert bool(metrics["generator_step"]) == generator_turn == ("dmd_loss" in metrics)
        assert moved(generator_before, method.generator_params) == generator_turn
        assert moved(critic_before, method.critic_params)
    assert not moved(teacher_before, teacher.values())
    assert method.updates == {"generator": 2, "critic": 4}


@pytest.mark.parametrize("family,generator_rank,critic_rank", ROLE_SETUPS)
def test_resume_from_a_checkpoint_is_bit_exact(tiny_pipeline_dir, tmp_path, family, generator_rank, critic_rank):
    """Train 3 iterations, checkpoint (safetensors + JSON), load into a freshly built method, then run the next
    two iterations (a critic-only one and a generator one) on both: parameters and metrics must be identical."""
    source = tiny_pipeline_dir(family)
    original = build_method(source, generator_rank, critic_rank)
    rng = torch.Generator().manual_seed(0)
    for step in range(3):
        run_iteration(original, step, rng)
    state = original.state_dict()
    checkpoint = load_checkpoint(save_checkpoint(tmp_path, 3, state["tensors"], state["state"], rng=False))
    resumed = build_method(source, generator_rank, critic_rank)
    assert moved(snapshot(original.generator_params), resumed.generator_params)  # the fresh one really differs
    resumed.load_state_dict({"tensors": checkpoint.tensors, "state": checkpoint.state})
    resumed_rng = torch.Generator().manual_seed(0)
    resumed_rng.set_state(rng.get_state())
    for step in (3, 4):
        assert run_iteration(resumed, step, resumed_rng) == run_iteration(original, step, rng)
    for mine, theirs in ((original.generator_params, resumed.generator_params),
                         (original.critic_params, resumed.critic_params)):
        assert all(torch.equal(a, b) for a, b in zip(mine, theirs))
    assert resumed.updates == original.updates == {"generator": 3, "critic": 5}


def test_non_finite_dmd_loss_skips_every_optimiser_step(tiny_pipeline_dir):
    """A NaN generator output makes the DMD loss NaN: it is reported, and neither optimiser steps."""
    method = build_method(tiny_pipeline_dir("sd3"), 4, 4)
    with torch.no_grad():
        method.generator_params[0].fill_(float("nan"))
    metrics = run_iteration(method, 0, torch.Generator().manual_seed(0))
    assert math.isnan(metrics["dmd_loss"]) and metrics["generator_step"] == 0.0 and "critic_loss" not in metrics
    assert not method.generator_optimizer.state and not method.critic_optimizer.state  # no step was taken
    assert method.updates == {"generator": 0, "critic": 0}
    assert all(p.grad is None for p in method.generator_params + method.critic_params)
