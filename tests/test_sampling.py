"""Samplers: closed forms from ALGORITHMS.md §5.6 / §5.8 and equivalences on tiny real pipelines."""

import math

import pytest
import torch
from scipy.stats import norm

from rlfew.errors import UsageError
from rlfew.models import Prediction, RoleSpec, build_roles
from rlfew.sampling import CPS, DanceGRPOSDE, Deterministic, FlowGRPOSDE, gaussian_log_prob, make_sampler, sample

PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture(scope="module", params=["sd3", "sd"])
def generator(request, tiny_pipeline_dir):
    return build_roles(tiny_pipeline_dir(request.param), {"generator": RoleSpec(init="student")})["generator"]


def _rollout(generator, sampler, seed=0, **kwargs):
    adapter = generator.adapter
    with torch.no_grad():
        return sample(generator, adapter.encode_prompts(PROMPTS), adapter.sigma_grid(4), sampler, prompts=PROMPTS,
                      generator=torch.Generator().manual_seed(seed), **kwargs)


def test_cps_eta_zero_is_the_deterministic_sampler(generator):
    deterministic = _rollout(generator, Deterministic(), guidance=2.0)
    cps = _rollout(generator, CPS(eta=0.0), guidance=2.0)
    torch.testing.assert_close(cps.final_latents, deterministic.final_latents, atol=1e-6, rtol=1e-6)
    assert not cps.stochastic.any() and torch.isnan(cps.log_probs).all()


def test_cps_eta_one_renoises_x0_with_fresh_noise():
    x, x0, eps, xi = (torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(i)) for i in range(4))
    prediction = Prediction(x0=x0, eps=eps, native=eps - x0)
    out = CPS(eta=1.0).step(prediction, x, 0.75, 0.5, noise=xi)
    torch.testing.assert_close(out.x_next, 0.5 * x0 + 0.5 * xi, atol=1e-6, rtol=1e-6)
    assert float(out.std) == pytest.approx(0.5)


@pytest.mark.parametrize("eta", [0.0, 0.3, 0.9, 1.0])
def test_cps_with_oracle_predictions_preserves_the_forward_marginal(eta):
    """x0 ~ N(0, 0.5²): with (x̂0, ε̂) = (x0, ε) the next state has the exact forward variance at σ'."""
    gen = torch.Generator().manual_seed(0)
    x0, eps = 0.5 * torch.randn(400_000, 1, generator=gen), torch.randn(400_000, 1, generator=gen)
    sigma, sigma_next = 0.8, 0.5
    x = (1 - sigma) * x0 + sigma * eps
    out = CPS(eta).step(Prediction(x0=x0, eps=eps, native=eps - x0), x, sigma, sigma_next, generator=gen)
    expected = (1 - sigma_next) ** 2 * 0.25 + sigma_next**2
    assert float(out.x_next.var()) == pytest.approx(expected, rel=0.01)


def test_log_prob_matches_scipy_and_its_gradient():
    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 2, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 2, 4, 4, generator=gen, dtype=torch.float64)
    std = torch.tensor(0.37, dtype=torch.float64)
    log_prob = gaussian_log_prob(x, mean, std)
    reference = norm.logpdf(x.numpy(), mean.detach().numpy(), 0.37).reshape(3, -1).mean(1)
    torch.testing.assert_close(log_prob, torch.from_numpy(reference))
    log_prob.sum().backward()
    dims = x[0].numel()
    torch.testing.assert_close(mean.grad, (x - mean.detach()) / 0.37**2 / dims)


def test_log_prob_is_refused_for_deterministic_steps():
    with pytest.raises(ValueError, match="std = 0"):
        gaussian_log_prob(torch.zeros(2, 3), torch.zeros(2, 3), 0.0)
    x0, eps = torch.randn(2, 3), torch.randn(2, 3)
    final = CPS(0.9).step(Prediction(x0=x0, eps=eps, native=eps - x0), torch.randn(2, 3), 0.25, 0.0)
    assert final.log_prob is None and float(final.std) == 0.0  # the last CPS step lands on x̂0


@pytest.mark.parametrize("sampler", [CPS(0.9), FlowGRPOSDE(0.7), DanceGRPOSDE(0.3)], ids=lambda s: s.name)
def test_stochastic_rollout_log_probs_equal_the_gaussian_density(generator, sampler):
    trajectory = _rollout(generator, sampler)
    for k in range(len(trajectory.sigmas) - 1):
        if not trajectory.stochastic[k]:
            assert torch.isnan(trajectory.log_probs[:, k]).all()
            continue
        expected = norm.logpdf(trajectory.states[:, k + 1].double().numpy(), trajectory.means[:, k].double().numpy(),
                               float(trajectory.stds[k])).reshape(len(PROMPTS), -1).mean(1)
        torch.testing.assert_close(trajectory.log_probs[:, k].double(), torch.from_numpy(expected), atol=1e-4, rtol=1e-4)
    assert trajectory.stochastic.sum() >= 2


def test_stochastic_steps_subset_and_reproducibility(generator):
    partial = _rollout(generator, CPS(0.9), stochastic_steps=[0])
    assert partial.stochastic.tolist() == [True, False, False, False]
    assert (partial.stds[1:] == 0).all() and torch.isnan(partial.log_probs[:, 1:]).all()
    again = _rollout(generator, CPS(0.9), stochastic_steps=[0])
    torch.testing.assert_close(partial.states, again.states, atol=0, rtol=0)
    other_seed = _rollout(generator, CPS(0.9), seed=1, stochastic_steps=[0])
    assert (other_seed.final_latents - partial.final_latents).abs().max() > 1e-3
    assert partial.images.shape == (2, 3, 64, 64)


def _analytic_velocity(m: float, s: float):
    """E[ε − x0 | x_σ] for data N(m, s²) under x_σ = (1−σ)x0 + σε."""

    def velocity(x, sigma):
        var = (1 - sigma) ** 2 * s**2 + sigma**2
        centred = x - (1 - sigma) * m
        x0 = m + (1 - sigma) * s**2 / var * centred
        eps = sigma / var * centred
        return Prediction(x0=x0, eps=eps, native=eps - x0)

    return velocity


@pytest.mark.parametrize("sampler", [FlowGRPOSDE(0.0), FlowGRPOSDE(0.3), FlowGRPOSDE(0.7), FlowGRPOSDE(1.0),
                                     DanceGRPOSDE(0.3), DanceGRPOSDE(1.0)], ids=lambda s: f"{s.name}")
def test_sde_kernels_preserve_the_marginals(sampler):
    """ALGORITHMS.md §5.8 test 2: data N(2, 0.5²), analytic velocity, from σ=0.99 in 200 steps."""
    m, s, start = 2.0, 0.5, 0.99
    predict = _analytic_velocity(m, s)
    gen = torch.Generator().manual_seed(0)
    sigmas = torch.linspace(start, 0.0, 201, dtype=torch.float64)
    kernel = sampler.for_grid(sigmas)
    var0 = (1 - start) ** 2 * s**2 + start**2
    x = (1 - start) * m + math.sqrt(var0) * torch.randn(200_000, 1, generator=gen, dtype=torch.float64)
    for k in range(200):
        sigma, sigma_next = float(sigmas[k]), float(sigmas[k + 1])
        x = kernel.step(predict(x, sigma), x, sigma, sigma_next, generator=gen).x_next
    assert float(x.mean()) == pytest.approx(m, rel=0.01)
    assert float(x.std()) == pytest.approx(s, rel=0.01)


def test_flow_grpo_on_a_one_step_grid_uses_the_grids_second_sigma():
    """M2: on a 1-step grid [1, 0] flow_grpo's σ = 1 substitute is sigmas[1] = 0, so s_σ = a and Σ = a·√1 = 0.7;
    the old kernel took sigmas[0] = 1 there, 1 − 1 was clamped to 1e-12, and Σ came out as 7·10⁵."""
    kernel = FlowGRPOSDE(0.7).for_grid(torch.tensor([1.0, 0.0], dtype=torch.float64))
    x0, eps = torch.randn(2, 3), torch.randn(2, 3)
    _, std = kernel.mean_std(Prediction(x0=x0, eps=eps, native=eps - x0), eps, 1.0, 0.0)
    assert float(std) == pytest.approx(0.7)
    with pytest.raises(UsageError, match="for_grid"):  # an unconfigured kernel cannot silently guess at σ = 1
        FlowGRPOSDE(0.7).mean_std(Prediction(x0=x0, eps=eps, native=eps - x0), eps, 1.0, 0.5)


def test_the_trajectory_stores_its_grid_configured_kernel(generator):
    """A log-prob recomputed in training must use the rollout's own kernel: the trajectory carries it."""
    trajectory = _rollout(generator, FlowGRPOSDE(0.7), decode=False)
    assert isinstance(trajectory.kernel, FlowGRPOSDE) and trajectory.kernel.sigma_cap == float(trajectory.sigmas[1])
    k = 1
    with torch.no_grad():
        prediction = generator.predict(trajectory.states[:, k].double(), float(trajectory.sigmas[k]),
                                       generator.adapter.encode_prompts(PROMPTS))
    mean, std = trajectory.kernel.mean_std(prediction, trajectory.states[:, k].double(), float(trajectory.sigmas[k]),
                                           float(trajectory.sigmas[k + 1]))
    recomputed = gaussian_log_prob(trajectory.states[:, k + 1].double(), mean, std)
    torch.testing.assert_close(recomputed.float(), trajectory.log_probs[:, k], atol=1e-4, rtol=1e-4)


def test_each_sampler_keeps_its_own_default_noise():
    """M1: CPS's angle η and DanceGRPO's diffusion η are different quantities with different defaults."""
    assert make_sampler("cps").eta == 0.9 and make_sampler("dance_grpo").eta == 0.3
    assert make_sampler("flow_grpo").noise_level == 0.7


def test_unknown_sampler_name_lists_the_allowed_ones():
    with pytest.raises(UsageError, match="allowed: deterministic, cps, flow_grpo, dance_grpo"):
        make_sampler("ddpm")
    with pytest.raises(UsageError, match="eta"):
        make_sampler("cps", eta=1.5)
