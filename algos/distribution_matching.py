"""The turns every DMD-family method is made of (DMD2, DMDR, Flash-DMD, DMD-regularised GRPO), as functions a
method's `train_step` calls in its own order: the distribution-matching generator loss on an x̂0 the caller
computed (so GRPO can reuse its own forward pass), and the critic turn (loopable N times per rollout); plus the
direction and its stop-gradient loss, noise-level samplers, backward simulation and DMDR's dynamic schedules.
ALGORITHMS.md §0–§2 is the spec; tests/test_dmd_math.py checks each piece against its closed form.

Noise levels are drawn as *fractions u ∈ [0, 1] of the training-time axis* and mapped to the canonical σ by
`fraction_to_sigma`, so one range means the same thing for every family:
  * VP UNets: u is t/T of the DDPM table (T = 1000): u ∈ [0.02, 0.98] is DMD2's t ∈ [20, 980] (continuous here,
    integer in DMD2), u = 1 is t = 999 = σ_max.
  * Flow models: u is warped exactly as `sigma_grid` places the few-step grid (`FlowAdapter.warp`): by the
    scheduler's shift, σ = s·u / (1 + (s − 1)·u), or FLUX's resolution-dependent dynamic shift. With shift 1
    (SiT, DMDR's ImageNet demo) σ = u.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import betaincinv

from rlfew.models import Conditioning, FamilyAdapter, Role, add_noise
from rlfew.optim import RoleOptimizer, backward
from rlfew.sampling import Trajectory

# (batch, rng) -> canonical σ of shape (batch,)
SigmaSampler = Callable[[int, torch.Generator], torch.Tensor]
# (x_σ, σ, cond) -> the real score's x̂0 (the teacher with CFG, or DMDR's DynaDG mixture)
RealScore = Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]
# (critic sample, cond) -> (an extra critic-turn loss term, its metrics), e.g. DMD2's GAN discriminator loss
CriticExtra = Callable[[torch.Tensor, Conditioning], tuple[torch.Tensor, dict[str, float]]]


# ------------------------------------------------------------------------------ distribution matching

def dmd_direction(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor, normalise: bool = True,
                  eps: float = 0.0) -> torch.Tensor:
    """The per-sample DMD update direction in x̂0 form (ALGORITHMS.md §1.1):

        g = (x̂0_fake − x̂0_real) / (mean_{C,H,W} |x − x̂0_real| + eps)      (normalise=False: no denominator)

    Moving x along −g lowers the reverse KL. The difference and the normaliser are formed in float64, as DMD2 does
    for SD (the x̂0 predictions themselves come from the adapter in float32). eps: 0 in DMD2, 1e-8 in DMDR. Where the direction is undefined (x = x̂0_real exactly, denominator 0) it is set to 0 rather than to
    torch's default nan_to_num of ±inf (the largest float, which would blow up the step); deviation from DMD2.
    """
    x, x0_real, x0_fake = x.detach().double(), x0_real.detach().double(), x0_fake.detach().double()
    direction = x0_fake - x0_real
    if normalise:
        scale = (x - x0_real).abs().flatten(1).mean(1) + eps
        direction = direction / scale.reshape(-1, *([1] * (x.ndim - 1)))
    return torch.nan_to_num(direction, nan=0.0, posinf=0.0, neginf=0.0)


def dmd_loss(x: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """½·mse(x, sg(x − g)): its gradient w.r.t. x is g / x.numel() (§0 stop-gradient trick), so the generator's
    parameters receive g pulled back through x = G(·) and nothing else."""
    work = torch.promote_types(x.dtype, torch.float32)
    target = (x.detach().to(direction.dtype) - direction).to(work)
    return 0.5 * F.mse_loss(x.to(work), target)


def distribution_matching_loss(x: torch.Tensor, cond: Conditioning, sigma: torch.Tensor, noise: torch.Tensor,
                               real_x0: RealScore, fake: Role, normalise: bool = True,
                               eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The DM generator loss (§1.7, generator turn) on an x̂0 `x` the caller computed with grad:

        x_σ = add_noise(sg(x), ε, σ);  g = dmd_direction(x, real_x0(x_σ), fake(x_σ));  L = ½·mse(x, sg(x − g))

    Everything but the final MSE runs without grad. Returns (L, g)."""
    with torch.no_grad():
        x_noisy = add_noise(x.detach(), noise, sigma)
        x0_real = real_x0(x_noisy, sigma, cond)
        x0_fake = fake.predict(x_noisy, sigma, cond).x0
        direction = dmd_direction(x, x0_real, x0_fake, normalise, eps)
    return dmd_loss(x, direction), direction


def critic_denoising_loss(critic: Role, x0: torch.Tensor, cond: Conditioning, sigma: torch.Tensor,
                          noise: torch.Tensor) -> torch.Tensor:
    """The fake score's loss on detached generator samples (§1.2): noise sg(x0) at σ with ε and regress the
    network's native output (v for flow models, ε or VP-v for UNets), unweighted, no CFG."""
    x0 = x0.detach()
    prediction = critic.predict(add_noise(x0, noise, sigma), sigma, cond)
    return critic.adapter.denoising_loss(prediction, x0, noise, sigma).mean()


def critic_turn(optimizer: RoleOptimizer, critic: Role, samples: torch.Tensor, cond: Conditioning,
                sigma: torch.Tensor, noise: torch.Tensor, micro_batches: list[slice],
                extra: CriticExtra | None = None, extra_optimizers: tuple[RoleOptimizer, ...] = ()
                ) -> tuple[dict[str, float], bool]:
    """One critic update on detached `samples` (§1.7, every iteration; call it N times for N updates per rollout):
    the denoising loss [+ `extra`, e.g. λ_D·GAN_D, stepping `extra_optimizers` too], accumulated over micro-batches
    (each weighted by its share of the batch), then one step. Returns (metrics, whether every step was applied)."""
    totals: dict[str, float] = {}
    for part in micro_batches:
        share = (part.stop - part.start) / len(samples)
        part_cond = cond.index(part)
        loss = critic_denoising_loss(critic, samples[part], part_cond, sigma[part], noise[part])
        terms = {"loss/critic_denoising": float(loss.detach())}
        if extra is not None:
            extra_loss, extra_metrics = extra(samples[part], part_cond)
            loss = loss + extra_loss
            terms.update(extra_metrics)
        terms["loss/critic"] = float(loss.detach())
        backward(loss * share, optimizer, *extra_optimizers)
        for key, value in terms.items():
            totals[key] = totals.get(key, 0.0) + share * value
    grad_norm, applied = optimizer.step()
    totals["grad_norm/critic"] = grad_norm
    for extra_optimizer in extra_optimizers:
        extra_norm, extra_applied = extra_optimizer.step()
        totals[f"grad_norm/{extra_optimizer.name}"] = extra_norm
        applied = applied and extra_applied
    return totals, applied


def standard_normal(shape, rng: torch.Generator) -> torch.Tensor:
    """N(0, I) drawn on the generator's own device, so a CPU generator drives a GPU learner reproducibly."""
    return torch.randn(shape, generator=rng, device=rng.device)


# ---------------------------------------------------------------------------------------- noise levels

def fraction_to_sigma(adapter: FamilyAdapter, fractions: torch.Tensor, shift: float | None = None,
                      resolution: int | None = None) -> torch.Tensor:
    """Canonical σ (float64, on the adapter's device) of fractions u of the training-time axis (module docstring).

    shift: flow models only; None: the scheduler's own (FLUX: its dynamic shift at `resolution`).
    """
    u = fractions.double().cpu()
    if adapter.family == "vp":
        alphas_cumprod = adapter.pipeline.scheduler.alphas_cumprod.double()
        table = (1 - alphas_cumprod).sqrt() / (alphas_cumprod.sqrt() + (1 - alphas_cumprod).sqrt())
        timesteps = (u * len(table)).clamp(0, len(table) - 1)
        sigma = torch.from_numpy(np.interp(timesteps.numpy(), np.arange(len(table)), table.numpy()))
    else:
        sigma = adapter.warp(u, shift, resolution)
    return sigma.to(adapter.device)


def uniform_fractions(batch: int, rng: torch.Generator, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(batch, generator=rng, device=rng.device, dtype=torch.float64).cpu()


def uniform_sigma_sampler(adapter: FamilyAdapter, low: float, high: float,
                          resolution: int | None = None) -> SigmaSampler:
    """σ of u ~ U[low, high] (DMD2: [0.02, 0.98] for the DM loss, [0, 1] for the critic)."""
    return lambda batch, rng: fraction_to_sigma(adapter, uniform_fractions(batch, rng, low, high),
                                                resolution=resolution)


def cosine_anneal(start: float, end: float, step: int, total_steps: int) -> float:
    """start at step 0 → end at total_steps (and after), along ½(1 + cos(π·min(step/total, 1)))."""
    progress = min(step / total_steps, 1.0) if total_steps > 0 else 1.0
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


def dynars_beta(step: int, anneal_steps: int = 10_000, start: tuple[float, float] = (4.0, 1.5),
                end: tuple[float, float] = (1.0, 1.0)) -> tuple[float, float]:
    """DMDR's DynaRS Beta(a_k, b_k) parameters (§2.3): cosine-annealed from (4, 1.5) to uniform (1, 1)."""
    return (cosine_anneal(start[0], end[0], step, anneal_steps), cosine_anneal(start[1], end[1], step, anneal_steps))


def dynars_fractions(batch: int, rng: torch.Generator, step: int, anneal_steps: int = 10_000,
                     start: tuple[float, float] = (4.0, 1.5), end: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
    """u ~ Beta(a_k, b_k) with u = 1 pure noise (DMDR's SiT convention). Drawn by inverting the Beta CDF on
    uniforms from `rng` (torch's Beta sampler takes no generator, and every rank must draw the same way)."""
    a, b = dynars_beta(step, anneal_steps, start, end)
    uniforms = torch.rand(batch, generator=rng, device=rng.device, dtype=torch.float64).cpu()
    return torch.from_numpy(betaincinv(a, b, uniforms.numpy()))


def dynadg_real_lora_scale(step: int, initial: float = 0.75, anneal_steps: int = 10_000) -> float:
    """DMDR's DynaDG (§2.2): the critic-LoRA scale mixed into the real score, 0.75·½(1 + cos(π·k/K)) → 0."""
    return cosine_anneal(initial, 0.0, step, anneal_steps)


# ---------------------------------------------------------------------------------- generator input

def backward_simulation_input(trajectory: Trajectory, rng: torch.Generator) -> tuple[int, torch.Tensor, float]:
    """DMD2's backward simulation (§1.5) read off a CPS(η=1) rollout: k ~ U{0..K−1}, one k for the whole batch.

    A CPS(η=1) state x_k is (1 − σ_k)·x̂0^(k−1) + σ_k·ξ with fresh ξ, i.e. the previous step's x̂0 re-noised to
    σ_k, and x_0 is the prior sample (pure noise); the rollout already ran under no_grad with the current
    generator, so no extra simulation pass is needed. k comes from `rng`: with several learners every rank
    seeds it identically, so all ranks train the same step (DMD2 broadcasts k). Returns (k, x_k, σ_k).
    """
    steps = trajectory.x0_preds.shape[1]
    k = int(torch.randint(steps, (1,), generator=rng, device=rng.device))
    return k, trajectory.states[:, k], float(trajectory.sigmas[k])


def check_fraction_ranges(options, *names: str) -> None:
    """Validate `[low, high]` noise-level fraction options, naming the offending key."""
    from rlfew.errors import ConfigError

    for name in names:
        low_high = getattr(options, name)
        if len(low_high) != 2 or not 0.0 <= low_high[0] < low_high[1] <= 1.0:
            raise ConfigError(f"algo.options.{name}: expected [low, high] with 0 <= low < high <= 1, got {low_high}")
