"""DMD through real roles on tiny "sd3" (flow) and "sd" (ε UNet) pipelines, built by `build_method` and rolled out by
`rollout_batch` exactly as a learner does: which parameters move on which iteration, finite losses, a bit-exact
checkpoint resume, gradient accumulation over micro-batches, per-rank noise, and skipped non-finite updates."""

import math

import pytest
import torch

from rlfew.checkpoint import load_checkpoint, save_checkpoint
from rlfew.method import build_method
from rlfew.testing import rollout_batch

PROMPTS = ["a red circle", "two blue squares"]
ROLE_SETUPS = [  # (family, generator LoRA rank, critic LoRA rank); rank 0 = full weights
    ("sd3", 4, 0), ("sd3", 0, 4), ("sd3", 4, 4), ("sd3", 0, 0), ("sd", 4, 0), ("sd", 0, 4), ("sd", 4, 4), ("sd", 0, 0),
]


def dmd(tiny_config, family: str, generator_rank: int, critic_rank: int, *overrides: str):
    """DMD with TTUR 2, a 3-step warm-up and real guidance teacher.guidance (4.5, so the CFG path runs)."""
    cfg = tiny_config(family, f"roles.generator.lora_rank={generator_rank}", f"roles.critic.lora_rank={critic_rank}",
                      "train.warmup_steps=3", "algo.options={ttur: 2}", *overrides)
    return build_method(cfg)


def teacher_weights(method) -> dict[str, torch.Tensor]:
    """The teacher's own weights (without the LoRA adapters other roles hang on its network)."""
    return {name: p for name, p in method.roles["teacher"].net.named_parameters() if ".lora_" not in name}


def snapshot(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def moved(before, params) -> bool:
    return any(not torch.equal(b, p) for b, p in zip(before, params))


def params(method, role: str) -> list[torch.nn.Parameter]:
    return method.optimizers[role].params


@pytest.mark.parametrize("family,generator_rank,critic_rank", ROLE_SETUPS)
def test_train_step_moves_generator_on_its_turns_critic_always_teacher_never(tiny_config, family, generator_rank,
                                                                            critic_rank):
    method = dmd(tiny_config, family, generator_rank, critic_rank)
    teacher = teacher_weights(method)
    teacher_before = snapshot(teacher.values())
    for step in range(4):
        generator_before, critic_before = snapshot(params(method, "generator")), snapshot(params(method, "critic"))
        result = method.train_step(rollout_batch(method, step, PROMPTS))
        assert all(math.isfinite(value) for value in result.metrics.values()), result.metrics
        assert not result.skipped
        generator_turn = step % 2 == 0
        assert result.metrics["updated/generator"] == float(generator_turn) and ("loss/dmd" in result.metrics) == \
            generator_turn
        assert moved(generator_before, params(method, "generator")) == generator_turn
        assert moved(critic_before, params(method, "critic"))
        assert all(p.grad is None for name in ("generator", "critic") for p in params(method, name))
    assert not moved(teacher_before, teacher.values())
    assert {name: opt.steps for name, opt in method.optimizers.items()} == {"generator": 2, "critic": 4}


@pytest.mark.parametrize("family,generator_rank,critic_rank", ROLE_SETUPS)
def test_resume_from_a_checkpoint_is_bit_exact(tiny_config, tmp_path, family, generator_rank, critic_rank):
    """Train 3 iterations, checkpoint (safetensors + JSON), load into a freshly built method, then run the next two
    iterations (a critic-only one and a generator one) on both: parameters and metrics must be identical."""
    original = dmd(tiny_config, family, generator_rank, critic_rank)
    for step in range(3):
        original.train_step(rollout_batch(original, step, PROMPTS))
    state = original.state_dict()
    checkpoint = load_checkpoint(save_checkpoint(tmp_path, 3, state["tensors"], state["state"]))
    resumed = dmd(tiny_config, family, generator_rank, critic_rank)
    assert moved(snapshot(params(original, "generator")), params(resumed, "generator"))  # really a fresh one
    resumed.load_state_dict({"tensors": checkpoint.tensors, "state": checkpoint.state})
    for step in (3, 4):
        assert resumed.train_step(rollout_batch(resumed, step, PROMPTS)) == \
            original.train_step(rollout_batch(original, step, PROMPTS))
    for role in ("generator", "critic"):
        assert all(torch.equal(a, b) for a, b in zip(params(original, role), params(resumed, role)))
        assert resumed.optimizers[role].steps == original.optimizers[role].steps
    assert original.optimizers["generator"].steps == 3 and original.optimizers["critic"].steps == 5


@pytest.mark.parametrize("family", ["sd3", "sd"])
def test_micro_batches_accumulate_to_the_whole_batch_gradient(tiny_config, family):
    """train.micro_batch_size=2 over 4 images takes the same step as the whole batch at once (the noise of the
    step is drawn for the whole shard first), up to float summation order."""
    prompts = ["a red circle", "two blue squares", "a green triangle", "a purple square"]
    whole = dmd(tiny_config, family, 4, 4, "train.warmup_steps=0")
    parts = dmd(tiny_config, family, 4, 4, "train.warmup_steps=0", "train.micro_batch_size=2")
    whole_result = whole.train_step(rollout_batch(whole, 0, prompts))
    parts_result = parts.train_step(rollout_batch(parts, 0, prompts))
    for key in ("loss/dmd", "loss/critic", "grad_norm/generator", "grad_norm/critic"):
        assert parts_result.metrics[key] == pytest.approx(whole_result.metrics[key], rel=1e-5), key
    for role in ("generator", "critic"):
        # After one AdamW step the first moment is (1 − β1)·(clipped gradient): the gradients themselves. (The
        # parameters are no fair comparison: Adam's first step ≈ lr·g/|g| magnifies rounding where g ≈ 0.)
        whole_state, parts_state = whole.optimizers[role].optimizer.state, parts.optimizers[role].optimizer.state
        for a, b in zip(params(whole, role), params(parts, role)):
            torch.testing.assert_close(parts_state[b]["exp_avg"], whole_state[a]["exp_avg"], rtol=1e-4, atol=1e-9)


def test_noise_levels_differ_per_rank_while_the_trained_step_is_shared(tiny_config):
    """M3: two learners draw the same backward-simulation step k (the shared stream) but their own DM and critic
    noise (the per-rank stream); one learner's batch at rank 0 and rank 1 shows both."""
    method = dmd(tiny_config, "sd3", 4, 4)
    rank0, rank1 = rollout_batch(method, 0, PROMPTS, rank=0), rollout_batch(method, 0, PROMPTS, rank=1)
    assert torch.equal(torch.randint(99, (4,), generator=rank0.shared_rng),
                       torch.randint(99, (4,), generator=rank1.shared_rng))
    assert not torch.equal(torch.randn(4, generator=rank0.rng), torch.randn(4, generator=rank1.rng))
    # and the rollout of shard 1 starts from other noise than shard 0 (H2)
    assert not torch.equal(rank0.trajectory.states[:, 0], rank1.trajectory.states[:, 0])


def test_non_finite_dmd_loss_skips_every_optimiser_step(tiny_config):
    """A NaN generator output makes the DM loss NaN: the step result says the update was skipped, and neither
    optimiser stepped (the critic's sample is that NaN output)."""
    method = dmd(tiny_config, "sd3", 4, 4)
    with torch.no_grad():
        params(method, "generator")[0].fill_(float("nan"))
    result = method.train_step(rollout_batch(method, 0, PROMPTS))
    assert result.skipped and math.isnan(result.metrics["loss/dmd"]) and result.metrics["updated/generator"] == 0.0
    assert math.isnan(result.metrics["grad_norm/critic"])
    assert not method.optimizers["generator"].optimizer.state and not method.optimizers["critic"].optimizer.state
    assert {name: opt.steps for name, opt in method.optimizers.items()} == {"generator": 0, "critic": 0}
    assert all(p.grad is None for name in ("generator", "critic") for p in params(method, name))
