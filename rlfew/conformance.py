"""The policy conformance kit: what a model family must satisfy before GRPO can train it, automating flow_grpo's
"how to support another model" checklist. Any adapter's test calls `check_policy_conformance(generator)`:

  1. η = 0 sampling equals the deterministic sampler (CPS at η = 0 is Euler/DDIM on this family's grid);
  2. for every kernel, log π recomputed from the stored states equals the rollout's exactly, so PPO's ratio is
     exactly 1 on the first inner step;
  3. outputs are batch-size invariant: log π recomputed on half the batch (micro-batches) equals the full
     batch's, up to `batch_atol` (a rollout's kernel noise is drawn for the whole batch, so rollouts themselves
     are compared at equal batch size only);
  4. log π is the analytic Gaussian: mean over dims of scipy's N(x'; μ, Σ²) log-density, μ and Σ from the kernel.

It raises `ConformanceError` naming the check, the kernel and the numbers; it returns the measured deviations.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from scipy.stats import norm

from rlfew.sampling import CPS, Deterministic, Trajectory, make_sampler, sample, step_log_prob

KIT_KERNELS = ("cps", "flow_grpo", "dance_grpo")


class ConformanceError(AssertionError):
    """A family fails a check; an AssertionError, so a test that calls the kit fails with its message."""


def _rollout(generator, prompts: list[str], steps: int, sampler, noise: torch.Tensor, seed: int,
             stochastic_steps: list[int] | None) -> Trajectory:
    adapter = generator.adapter
    with torch.no_grad():
        return sample(generator, adapter.encode_prompts(prompts), adapter.sigma_grid(steps), sampler, prompts=prompts,
                      noise=noise, generator=torch.Generator(adapter.device).manual_seed(seed),
                      stochastic_steps=stochastic_steps, decode=False)


def check_policy_conformance(generator, prompts: Sequence[str] = ("a red circle", "two blue squares",
                                                                   "a green triangle", "a purple square"),
                             steps: int = 4, seed: int = 0, deterministic_atol: float = 1e-5,
                             batch_atol: float = 1e-5, kernels: Sequence[str] = KIT_KERNELS) -> dict[str, float]:
    """Run the four checks (module docstring) on `generator` (a Role, or anything with `predict` and `adapter`)."""
    prompts = list(prompts)
    if len(prompts) < 2 or len(prompts) % 2:
        raise ValueError("the conformance kit needs an even number (>= 2) of prompts, to halve the batch")
    adapter = generator.adapter
    shape = adapter.latent_shape(adapter.default_resolution)
    noise = torch.randn((len(prompts), *shape), generator=torch.Generator().manual_seed(seed)).to(adapter.device)
    trained = list(range(steps - 1))  # every step but the deterministic final one
    report: dict[str, float] = {}

    deterministic = _rollout(generator, prompts, steps, Deterministic(), noise, seed, None)
    cps_zero = _rollout(generator, prompts, steps, CPS(eta=0.0), noise, seed, None)
    gap = float((cps_zero.states - deterministic.states).abs().max())
    report["eta0_vs_deterministic"] = gap
    if gap > deterministic_atol * max(1.0, float(deterministic.states.abs().max())):
        raise ConformanceError(f"CPS at eta 0 differs from the deterministic sampler by {gap:.3g} (atol "
                               f"{deterministic_atol}): the family's x̂0/ε̂ and its velocity disagree")

    half = len(prompts) // 2
    for name in kernels:
        kernel = make_sampler(name)
        trajectory = _rollout(generator, prompts, steps, kernel, noise, seed, trained)
        cond = adapter.encode_prompts(prompts)
        for k in trained:
            with torch.no_grad():
                _, mean, std, log_prob = step_log_prob(generator, trajectory, k, cond)
                _, _, _, half_log_prob = step_log_prob(generator, trajectory, k, cond.index(slice(0, half)),
                                                       slice(0, half))
            if not torch.equal(log_prob, trajectory.log_probs[:, k]):
                difference = float((log_prob - trajectory.log_probs[:, k]).abs().max())
                raise ConformanceError(f"{name}, step {k}: log π recomputed from the stored states differs from the "
                                       f"rollout's by {difference:.3g}, so PPO's first ratio is not exactly 1")
            log_prob_gap = float((half_log_prob - log_prob[:half]).abs().max())
            report[f"{name}/step{k}/log_prob_batch_gap"] = log_prob_gap
            if log_prob_gap > batch_atol:
                raise ConformanceError(f"{name}, step {k}: log π on half the batch differs by {log_prob_gap:.3g}")
            analytic = torch.from_numpy(norm.logpdf(trajectory.states[:, k + 1].double().cpu().numpy(),
                                                    mean.double().cpu().numpy(), float(std))).flatten(1).mean(1)
            analytic_gap = float((analytic.float() - log_prob.cpu()).abs().max())
            report[f"{name}/step{k}/analytic_gap"] = analytic_gap
            if analytic_gap > 1e-5 * max(1.0, float(analytic.abs().max())):
                raise ConformanceError(f"{name}, step {k}: log π differs from the analytic Gaussian by "
                                       f"{analytic_gap:.3g}")
    return report
