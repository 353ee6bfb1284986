"""DMDR math against closed forms (ALGORITHMS.md §2.6): the DynaDG scale schedule and its endpoints through real
roles, the DynaRS mean at the start and end of the annealing, the reward-tilted fixed point on a 1-D Gaussian,
and the cold-start switch (DMD's gradient bit for bit before it, a finite-difference-checked reward path after)."""

import math

import numpy as np
import pytest
import torch

from rlfew import optim
from rlfew.algos.distribution_matching import dmd_direction, dmd_loss
from rlfew.algos.dmdr import DMDR
from rlfew.config import TrainConfig
from rlfew.method import build_method
from rlfew.rewards import CallableReward
from rlfew.rewards.tiny import build_tiny_clip
from rlfew.testing import rollout_batch, vector_roles

PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture(scope="module")
def tiny_pickscore(tmp_path_factory) -> str:
    clip = build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))
    return f"reward=[{{name: pickscore, options: {{model: '{clip}', processor: '{clip}'}}}}]"


def build(tiny_config, family: str, algo: str, *overrides: str):
    """A method on a LoRA generator and a LoRA critic (rank 4, α 4), built as every learner builds it."""
    return build_method(tiny_config(family, f"algo.name={algo}", "roles.generator.lora_rank=4",
                                    "roles.critic.lora_rank=4", "roles.critic.lora_alpha=4", *overrides))


def randomise_critic_lora(method, seed: int = 1):
    """The critic LoRA's B starts at zero (Ψ = teacher at every scale); give it weights so scales differ."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in method.roles["critic"].net.named_parameters():
            if ".critic." in name and "lora_B" in name:
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))


# ------------------------------------------------------------------------------------------------- DynaDG

def test_dynadg_schedule_follows_the_generator_turns_and_ends_at_the_pure_teacher(tiny_config):
    method = build(tiny_config, "sd3", "dmdr", "algo.options={ttur: 5, dynamic_steps: 100, reward_weight: 0}")
    # turn counts generator turns before the iteration: turns are iterations 0, 5, 10, ...
    assert [method.generator_turns_before(step) for step in (0, 1, 5, 6, 10, 11)] == [0, 1, 1, 2, 2, 3]
    assert method.real_lora_scale(0) == 0.75
    assert method.real_lora_scale(50) == pytest.approx(0.375, abs=1e-12)
    assert method.real_lora_scale(25) == pytest.approx(0.75 * 0.5 * (1 + math.cos(math.pi / 4)), abs=1e-12)
    assert method.real_lora_scale(100) == 0.0 and method.real_lora_scale(10_000) == 0.0
    method.options.dynadg = False
    assert method.real_lora_scale(0) == 0.0


@pytest.mark.parametrize("family", ["sd3", "sd"])
def test_real_score_is_the_teacher_at_scale_zero_and_the_fake_at_the_fake_scale(tiny_config, family):
    method = build(tiny_config, family, "dmdr", "algo.options={reward_weight: 0}")
    randomise_critic_lora(method)
    roles = method.roles
    teacher_role, critic = roles["teacher"], roles["critic"]
    assert critic.lora_scale == 2.0
    x_noisy, sigma = torch.randn(2, *roles.adapter.latent_shape(64)), torch.tensor([0.3, 0.8], dtype=torch.float64)
    cond = roles.adapter.encode_prompts(PROMPTS)
    with torch.no_grad():
        teacher = teacher_role.predict(x_noisy, sigma, cond, guidance=4.5).x0
        psi_at_zero = critic.predict(x_noisy, sigma, cond, guidance=4.5, lora_scale=0.0).x0
        fake = critic.predict(x_noisy, sigma, cond).x0
        method.real_guidance = 1.0  # the fake score has no CFG; compare like with like
        real_at_fake_scale = method.real_x0(x_noisy, sigma, cond, lora_scale=2.0)
        real_half_way = method.real_x0(x_noisy, sigma, cond, lora_scale=1.0)
        method.real_guidance = 4.5
        real_at_zero = method.real_x0(x_noisy, sigma, cond, lora_scale=0.0)
    assert torch.equal(psi_at_zero, teacher) and torch.equal(real_at_zero, teacher)
    assert torch.equal(real_at_fake_scale, fake)
    assert not torch.allclose(real_half_way, fake) and not torch.allclose(fake, teacher)  # the LoRA matters


# ------------------------------------------------------------------------------------------------- DynaRS

def test_dynars_mean_is_4_over_5p5_at_the_start_and_one_half_after_the_annealing(tiny_config):
    """On a flow model DynaRS draws σ itself (shift 1), so the σ mean is the Beta mean a/(a + b)."""
    method = build(tiny_config, "sd3", "dmdr", "algo.options={dynamic_steps: 100, reward_weight: 0}")
    rng = torch.Generator().manual_seed(0)
    for turn, expected in ((0, 4 / 5.5), (100, 0.5), (400, 0.5)):
        sigmas = method.noise_levels(200_000, rng, turn, method.options.dm_sigma_range)
        assert float(sigmas.mean()) == pytest.approx(expected, abs=3e-3)
    assert float(method.noise_levels(200_000, rng, 50, method.options.dm_sigma_range).mean()) < 4 / 5.5 - 0.05


# ------------------------------------------------------------------------------------ tilted fixed point

def test_dmdr_generator_loss_with_a_linear_reward_converges_to_the_reward_tilted_gaussian():
    """§2.6: teacher N(0, 1), generator x = μ + z (3 independent dims), reward r(x) = a·mean(x), one noise level σ,
    exact fake score, no normaliser. DMDR's own generator loss L_DMD + β·(−mean r) is minimised by gradient
    descent on μ: the score-form DMD gradient is (α²/σ²)·(x̂0_fake − x̂0_real) = (1−σ)²/v·μ with v = (1−σ)² + σ², so
    it stops at μ* = β·a·v/(1−σ)², the tilted target N(β·a, 1) up to O(σ²). A sign error in the reward term would
    send μ to −β·a."""
    a, beta, sigma = 1.5, 0.4, 0.01
    variance = (1 - sigma) ** 2 + sigma**2
    linear = CallableReward(lambda images, prompts: a * images.flatten(1).mean(1), "linear", differentiable=True)
    cfg = TrainConfig()
    method = DMDR(vector_roles(3, torch.nn.Identity(), generator=torch.nn.Linear(1, 1), critic=torch.nn.Linear(1, 1)),
                  DMDR.Options(reward_weight=beta, distillation_weight=1.0), cfg, reward=linear)
    mu = torch.full((3,), -1.0, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.SGD([mu], lr=0.5)
    rng = torch.Generator().manual_seed(0)
    prompts = [""] * 4096
    for _ in range(200):
        x = mu + torch.randn(4096, 3, generator=rng, dtype=torch.float64)
        x_noisy = (1 - sigma) * x.detach() + sigma * torch.randn(4096, 3, generator=rng, dtype=torch.float64)
        posterior_gain = (1 - sigma) / variance
        x0_real = posterior_gain * x_noisy  # posterior mean under N(0, 1)
        x0_fake = mu.detach() + posterior_gain * (x_noisy - (1 - sigma) * mu.detach())  # under N(μ, 1)
        direction = dmd_direction(x, x0_real, x0_fake, normalise=False) * (1 - sigma) ** 2 / sigma**2
        loss, metrics = method.generator_loss(x, dmd_loss(x, direction), prompts, with_reward=True)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    fixed_point = beta * a * variance / (1 - sigma) ** 2
    assert "reward/linear" in metrics
    torch.testing.assert_close(mu.detach(), torch.full((3,), fixed_point, dtype=torch.float64), rtol=0, atol=1e-9)
    assert abs(fixed_point - beta * a) < 2 * sigma**2 * beta * a  # 0.600060 vs the tilted mean 0.6


# ------------------------------------------------------------------------------------------- cold start

def record_gradients(monkeypatch) -> list[tuple[str, list[torch.Tensor]]]:
    """Copies of the gradients each optimiser step is about to apply (read where a RoleOptimizer averages them
    across learners, right after the backward passes and before clipping and the step)."""
    recorded = []
    original = optim.all_reduce_mean

    def record(params):
        recorded.append([p.grad.detach().clone() for p in params])
        original(params)

    monkeypatch.setattr(optim, "all_reduce_mean", record)
    return recorded


def test_before_the_cold_start_the_generator_gradient_is_dmds_bit_for_bit(tiny_config, tiny_pickscore, monkeypatch):
    """DMDR with DMD2's choices (rollout-state input, uniform σ, teacher real score, no ε, a critic with weight decay
    as DMD's) inside its cold start must produce DMD2's generator gradient exactly, and never evaluate the
    reward."""
    dmdr = build(tiny_config, "sd", "dmdr", tiny_pickscore, "roles.critic.lora_scale=1.0",
                 "algo.options={ttur: 2, cold_start_steps: 1, reward_weight: 10.0, dynadg: false, dynars: false, "
                 "generator_input: rollout_state, normaliser_eps: 0.0}")
    calls = []
    original_score = dmdr.reward.score
    dmdr.reward.score = lambda images, prompts: calls.append(len(prompts)) or original_score(images, prompts)
    dmd = build(tiny_config, "sd", "dmd", "algo.options={ttur: 2}")
    recorded = record_gradients(monkeypatch)
    for method in (dmdr, dmd):
        metrics = method.train_step(rollout_batch(method, 0, PROMPTS)).metrics
        assert metrics["updated/generator"] == 1.0 and "reward/pickscore" not in metrics
    (dmdr_generator, _), (dmd_generator, _) = recorded[:2], recorded[2:]  # (generator, critic) steps each
    assert dmdr.reward_active(0) is False and calls == []
    assert len(dmdr_generator) == len(dmdr.optimizers["generator"].params) > 0
    assert all(torch.equal(a, b) for a, b in zip(dmdr_generator, dmd_generator))
    assert any(float(g.abs().max()) > 0 for g in dmdr_generator)
    assert dmdr.reward_active(1) is True


def sensitive_tiny_pickscore(folder) -> str:
    """A tiny PickScore whose random weights are 10x the default init, so its score moves measurably with the
    image (at the default init a directional derivative drowns in the float32 rounding of the scores)."""
    from transformers import CLIPModel

    from rlfew.rewards.tiny import build_clip_tokenizer, tiny_clip_config

    torch.manual_seed(0)
    tokenizer = build_clip_tokenizer()
    config = tiny_clip_config(len(tokenizer))
    for part in (config, config.text_config, config.vision_config):
        part.initializer_factor = 10.0
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return f"reward=[{{name: pickscore, options: {{model: '{folder}', processor: '{folder}'}}}}]"


def test_after_the_cold_start_the_reward_path_is_in_the_gradient(tiny_config, tmp_path):
    """Directional derivative of L_G = ½‖x − T‖²/D + λ·L_reward (T = sg(x − g), held fixed) along the gradient:
    autograd through G, the VAE decoder and a tiny PickScore against finite differences. Networks run in float64
    (the decoder's and PickScore's outputs are float32). The DMD-only derivative falls short of the total by the
    reward path."""
    method = build(tiny_config, "sd", "dmdr", sensitive_tiny_pickscore(tmp_path / "clip"),
                   "algo.options={cold_start_steps: 0, reward_weight: 1.0}")
    roles, reward = method.roles, method.reward
    generator_role, critic = roles["generator"], roles["critic"]
    randomise_critic_lora(method)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in generator_role.net.named_parameters():  # a trained generator's LoRA, not B = 0
            if ".generator." in name and "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
        decoder_out = roles.adapter.vae.decoder.conv_out  # keep images inside [0, 1]: no clamp kinks
        decoder_out.weight.mul_(0.3)
        decoder_out.bias.mul_(0.3)
    for module in (generator_role.net, roles.adapter.vae, reward.model):
        module.double()
    batch = rollout_batch(method, 0, PROMPTS)
    cond = batch.cond.to(dtype=torch.float64)
    _, x_in, sigma_in = method.generator_input(batch.trajectory, batch)
    x_in = x_in.double()
    params = method.optimizers["generator"].params

    x = generator_role.predict(x_in, sigma_in, cond).x0
    with torch.no_grad():
        rng = torch.Generator().manual_seed(3)
        sigma = method.noise_levels(2, rng, 0, method.options.dm_sigma_range)
        x_noisy = roles.adapter.add_noise(x, torch.randn(x.shape, generator=rng, dtype=x.dtype), sigma)
        g = dmd_direction(x, method.real_x0(x_noisy, sigma, cond, 0.5), critic.predict(x_noisy, sigma, cond).x0)
    target = x.detach() - g

    def gradient(with_reward: bool) -> list[torch.Tensor]:
        x = generator_role.predict(x_in, sigma_in, cond).x0
        loss, _ = method.generator_loss(x, dmd_loss(x, x.detach() - target), PROMPTS, with_reward)
        return list(torch.autograd.grad(loss, params))

    # Along the gradient itself the derivative is largest, so the finite differences resolve it best; a wrong
    # gradient still shows, since then the true slope along it differs from its norm.
    total_gradient, dmd_gradient = gradient(True), gradient(False)
    norm = math.sqrt(sum(float(grad.pow(2).sum()) for grad in total_gradient))
    direction_in_params = [grad / norm for grad in total_gradient]
    total = sum(float((grad * d).sum()) for grad, d in zip(total_gradient, direction_in_params))
    dmd_only = sum(float((grad * d).sum()) for grad, d in zip(dmd_gradient, direction_in_params))

    def loss_at(offset: float) -> float:
        with torch.no_grad():
            for p, d in zip(params, direction_in_params):
                p.add_(offset * d)
            x = generator_role.predict(x_in, sigma_in, cond).x0
            loss, metrics = method.generator_loss(x, dmd_loss(x, x - target), PROMPTS, True)  # the same fixed T
            for p, d in zip(params, direction_in_params):
                p.sub_(offset * d)
        assert "reward/pickscore" in metrics
        return float(loss)

    # Slope at 0 of a least-squares cubic through 11 losses on [−0.1, 0.1]: wide enough that the float32 rounding
    # of the decoded images and scores is small against the loss differences (seen on [−0.01, 0.01]: 0.6% off).
    # What is left of that rounding moves the fitted slope by up to ~6e-4 relative between equally valid inputs
    # (rollout states rounded to float32 or not; ±0.1 vs ±0.3), hence rel 1e-3: a gradient missing the reward
    # path is 76% off, one missing the DMD path 24%.
    offsets = np.linspace(-0.1, 0.1, 11)
    finite_difference = float(np.polyfit(offsets, [loss_at(float(t)) for t in offsets], 3)[-2])
    print(f"directional derivative: autograd {total:.9g}, finite difference {finite_difference:.9g}, "
          f"DMD part {dmd_only:.9g}")
    assert total == pytest.approx(finite_difference, rel=1e-3)
    assert abs(total - dmd_only) > 0.1 * abs(total)  # the reward path carries a sizeable share
