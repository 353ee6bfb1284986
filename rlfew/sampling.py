"""Few-step samplers over any family adapter, and the Trajectory every rollout returns.

Each step maps (x at σ, prediction) to x' at σ' as a Gaussian policy N(μ, Σ²·I). log π is the *mean* over
dimensions of the elementwise Gaussian log-density, as in every flow-GRPO codebase (ALGORITHMS.md §5.1), so
their clip ranges carry over. Deterministic steps have Σ = 0 and refuse to give a log π.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field, fields, replace

import torch

from rlfew.errors import UsageError
from rlfew.models.base import Conditioning, Prediction


@dataclass
class StepOutput:
    x_next: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor  # scalar: one Σ for the whole batch at this step
    log_prob: torch.Tensor | None  # (B,), None for deterministic steps


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    """Per-sample log N(x; mean, std²) averaged over all non-batch dimensions."""
    std = torch.as_tensor(std, dtype=mean.dtype, device=mean.device)
    if bool((std <= 0).any()):
        raise ValueError("log-probability is undefined for a deterministic step (std = 0)")
    log_density = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return log_density.flatten(1).mean(1)


class Sampler(abc.ABC):
    """A transition kernel: `mean_std` gives N(μ, Σ²) of x' given the prediction at (x, σ). Σ depends on the σ
    grid alone (`std`), so a schedule can weight steps by their noise before any rollout (TempFlow-GRPO)."""

    name = ""

    @abc.abstractmethod
    def std(self, sigma: float, sigma_next: float) -> float:
        """Σ of the transition σ → σ_next (0 for a deterministic one)."""

    @abc.abstractmethod
    def mean(self, prediction: Prediction, x: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
        """μ of the transition σ → σ_next."""

    def mean_std(self, prediction: Prediction, x: torch.Tensor, sigma: float,
                 sigma_next: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and (scalar) std of the Gaussian transition to σ_next."""
        std = self.std(sigma, sigma_next)
        return self.mean(prediction, x, sigma, sigma_next), torch.tensor(std if std > 1e-12 else 0.0, dtype=x.dtype)

    def for_grid(self, sigmas: torch.Tensor) -> "Sampler":
        """The kernel configured for a σ grid (Flow-GRPO's SDE needs the grid's second value)."""
        return self

    def step(self, prediction: Prediction, x: torch.Tensor, sigma: float, sigma_next: float,
             noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> StepOutput:
        mean, std = self.mean_std(prediction, x, sigma, sigma_next)
        if float(std) == 0.0:
            return StepOutput(x_next=mean, mean=mean, std=std, log_prob=None)
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x_next = mean + std * noise
        return StepOutput(x_next=x_next, mean=mean, std=std, log_prob=gaussian_log_prob(x_next, mean, std))


class Deterministic(Sampler):
    """Euler on the probability-flow ODE; for VP models this is exactly DDIM (and diffusers' Euler)."""

    name = "deterministic"

    def std(self, sigma, sigma_next):
        return 0.0

    def mean(self, prediction, x, sigma, sigma_next):
        return x + (sigma_next - sigma) * prediction.velocity


class CPS(Sampler):
    """Coefficients-preserving sampling: x' = (1−σ')x̂0 + σ'cos(ηπ/2)ε̂ + σ'sin(ηπ/2)ξ.

    η = 0 is the deterministic sampler; η = 1 re-noises x̂0 with fresh noise (DMD2's multi-step sampler).
    """

    name = "cps"

    def __init__(self, eta: float = 0.9):
        if not 0.0 <= eta <= 1.0:
            raise UsageError(f"cps eta must be in [0, 1], got {eta}")
        self.eta = eta

    def std(self, sigma, sigma_next):
        return sigma_next * math.sin(self.eta * math.pi / 2)

    def mean(self, prediction, x, sigma, sigma_next):
        return (1 - sigma_next) * prediction.x0 + sigma_next * math.cos(self.eta * math.pi / 2) * prediction.eps


class FlowGRPOSDE(Sampler):
    """Flow-GRPO's ODE→SDE kernel with the marginals of the ODE: s_σ = a·√(σ/(1−σ)),
    μ = x + [v̂ + s_σ²/(2σ)·(x + (1−σ)v̂)]·Δ, Σ = s_σ·√(−Δ); σ = 1 inside the root is replaced by the grid's
    second value σ_1, as the reference code does (`sigma_cap`, set by `for_grid`; a rollout stores the configured
    kernel in its Trajectory so a log-prob recomputed in training uses the same one)."""

    name = "flow_grpo"

    def __init__(self, noise_level: float = 0.7, sigma_cap: float | None = None):
        if noise_level < 0:
            raise UsageError(f"flow_grpo noise_level must be >= 0, got {noise_level}")
        self.noise_level = noise_level
        self.sigma_cap = sigma_cap

    def for_grid(self, sigmas):
        return FlowGRPOSDE(self.noise_level, float(sigmas[1]))

    def diffusion(self, sigma: float) -> float:
        """s_σ = a·√(σ/(1−σ)), σ = 1 replaced by σ_1 in the denominator."""
        if sigma >= 1.0 and self.sigma_cap is None:
            raise UsageError("flow_grpo at σ = 1 needs the grid's σ_1: use the kernel returned by for_grid(sigmas)")
        denominator_sigma = self.sigma_cap if sigma >= 1.0 else sigma
        return self.noise_level * math.sqrt(sigma / (1 - denominator_sigma))

    def std(self, sigma, sigma_next):
        return self.diffusion(sigma) * math.sqrt(sigma - sigma_next)

    def mean(self, prediction, x, sigma, sigma_next):
        diffusion, v = self.diffusion(sigma), prediction.velocity
        return x + (v + diffusion**2 / (2 * sigma) * (x + (1 - sigma) * v)) * (sigma_next - sigma)


class DanceGRPOSDE(Sampler):
    """DanceGRPO's kernel with constant diffusion η: μ = x + Δ(v̂ − ½η²ŝ), ŝ = −(x − (1−σ)x̂0)/σ²,
    Σ = η·√(σ − σ')."""

    name = "dance_grpo"

    def __init__(self, eta: float = 0.3):
        if eta < 0:
            raise UsageError(f"dance_grpo eta must be >= 0, got {eta}")
        self.eta = eta

    def std(self, sigma, sigma_next):
        return self.eta * math.sqrt(sigma - sigma_next)

    def mean(self, prediction, x, sigma, sigma_next):
        score = -(x - (1 - sigma) * prediction.x0) / sigma**2
        return x + (sigma_next - sigma) * (prediction.velocity - 0.5 * self.eta**2 * score)


SAMPLERS = {cls.name: cls for cls in (Deterministic, CPS, FlowGRPOSDE, DanceGRPOSDE)}


def make_sampler(name: str, eta: float | None = None, noise_level: float | None = None) -> Sampler:
    """Build a sampler by name with its own defaults: `eta` is CPS's angle η (0.9) for cps and the constant
    diffusion η (0.3) for dance_grpo, two different quantities; `noise_level` is flow_grpo's a (0.7)."""
    if name not in SAMPLERS:
        raise UsageError(f"unknown sampler {name!r}; allowed: {', '.join(SAMPLERS)}")
    if name == "cps":
        return CPS(0.9 if eta is None else eta)
    if name == "dance_grpo":
        return DanceGRPOSDE(0.3 if eta is None else eta)
    if name == "flow_grpo":
        return FlowGRPOSDE(0.7 if noise_level is None else noise_level)
    return Deterministic()


@dataclass
class Trajectory:
    """One batch of rollouts. Per-step tensors are indexed (batch, step).

    `log_probs[:, k]` is NaN where step k was deterministic (`stochastic[k]` False): using it is a bug, and NaN
    makes that loud. Group ids are explicit (never regroup by prompt text). `kernel` is the grid-configured
    sampler of the stochastic steps, so a log-prob recomputed in training uses exactly the rollout's kernel.
    """

    prompts: list[str]
    group_ids: torch.Tensor  # (B,) long
    sigmas: torch.Tensor  # (K+1,)
    states: torch.Tensor  # (B, K+1, C, h, w): x at each σ, states[:, -1] the final latents
    x0_preds: torch.Tensor  # (B, K, C, h, w): the generator's x̂0 at each step
    means: torch.Tensor  # (B, K, C, h, w)
    stds: torch.Tensor  # (K,)
    log_probs: torch.Tensor  # (B, K)
    stochastic: torch.Tensor  # (K,) bool
    kernel: Sampler | None = None  # the stochastic steps' kernel, configured for `sigmas`
    weights_version: int = 0  # updates the generator had taken when it drew this rollout
    images: torch.Tensor | None = None  # (B, 3, H, W) in [0, 1]
    scores: dict[str, torch.Tensor] = field(default_factory=dict)  # each reward's scores, (B,) each
    rewards: torch.Tensor | None = None  # (B,) the weighted sum of `scores`
    advantages: torch.Tensor | None = None  # (B,) group-normalised, computed on the whole batch
    advantage_valid: torch.Tensor | None = None  # (B,) bool: False for samples of zero-variance groups

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def final_latents(self) -> torch.Tensor:
        return self.states[:, -1]

    def to(self, device) -> "Trajectory":
        updates = {f.name: getattr(self, f.name).to(device) for f in fields(self)
                   if isinstance(getattr(self, f.name), torch.Tensor)}
        updates["scores"] = {k: v.to(device) for k, v in self.scores.items()}
        return replace(self, **updates)


def sample(model, cond: Conditioning, sigmas: torch.Tensor, sampler: Sampler, *, prompts: list[str],
           noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
           latent_shape: tuple[int, int, int] | None = None, guidance: float = 1.0,
           uncond: Conditioning | None = None, stochastic_steps: list[int] | None = None,
           group_ids: torch.Tensor | None = None, decode: bool = True, weights_version: int = 0) -> Trajectory:
    """Roll out `model` (a Role or anything with `predict(x, σ, cond, guidance, uncond)` and `adapter`) over
    the σ grid. Runs under the caller's grad mode: wrap in `torch.no_grad()` for rollouts.

    stochastic_steps: indices of steps that use `sampler`; the others are deterministic (MixGRPO windows,
    TDM-R1 / RTDMD step selection). Default: every step. Noise is drawn from `generator` in a fixed order
    (initial noise first, then one draw per stochastic step), so equal seeds give equal rollouts.
    """
    batch = len(prompts)
    adapter = model.adapter
    if noise is None:
        shape = latent_shape or adapter.latent_shape(adapter.default_resolution)
        noise = torch.randn((batch, *shape), generator=generator, device=adapter.device)
    sigmas = sigmas.double().cpu()
    steps = len(sigmas) - 1
    kernel = sampler.for_grid(sigmas)
    deterministic = Deterministic()
    chosen = set(range(steps)) if stochastic_steps is None else set(stochastic_steps)
    # The state is integrated in float64 (networks still run in their own dtype) so that algebraically equal
    # kernels (CPS at η=0 and Euler) agree to 1e-6 over a whole rollout; each state is rounded to the float32 the
    # trajectory stores *before* it is used, and log π is taken at the rounded state, so a log-prob recomputed in
    # training from the stored states equals the rollout's exactly (PPO's ratio is 1 on the first inner step).
    x = adapter.prior_sample(noise.double()).float().double()
    states, x0_preds, means, stds, log_probs, stochastic = [x], [], [], [], [], []
    for k in range(steps):
        sigma, sigma_next = float(sigmas[k]), float(sigmas[k + 1])
        prediction = model.predict(x, sigma, cond, guidance=guidance, uncond=uncond)
        step_kernel = kernel if k in chosen else deterministic
        out = step_kernel.step(prediction, x, sigma, sigma_next, generator=generator)
        x = out.x_next.float().double()
        states.append(x)
        x0_preds.append(prediction.x0)
        means.append(out.mean)
        stds.append(out.std.reshape(()))
        stochastic.append(out.log_prob is not None)
        log_probs.append(gaussian_log_prob(x, out.mean, out.std) if out.log_prob is not None
                         else torch.full((batch,), float("nan")))
    trajectory = Trajectory(
        prompts=list(prompts),
        group_ids=torch.arange(batch) if group_ids is None else torch.as_tensor(group_ids, dtype=torch.long),
        sigmas=sigmas,
        states=torch.stack(states, 1).float(),
        x0_preds=torch.stack(x0_preds, 1).float(),
        means=torch.stack(means, 1).float(),
        stds=torch.stack([s.float().cpu() for s in stds]),
        log_probs=torch.stack([lp.float().to(x.device) for lp in log_probs], 1),
        stochastic=torch.tensor(stochastic),
        kernel=kernel,
        weights_version=weights_version,
    )
    if decode:
        trajectory.images = adapter.decode(trajectory.final_latents)
    return trajectory


def step_log_prob(model, trajectory: Trajectory, k: int, cond: Conditioning, rows: slice = slice(None),
                  guidance: float = 1.0) -> tuple[Prediction, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Recompute step k of a rollout for `rows` under the caller's grad mode: the model's prediction at the stored
    state x_k, the kernel's (μ, Σ) and log π(x_{k+1} | x_k) (mean over dims, float32 like `log_probs`). Equal to the
    rollout's own log π when the model has not changed (the states are stored as they were used)."""
    if not bool(trajectory.stochastic[k]):
        raise ValueError(f"step {k} of this rollout was deterministic: it has no log-probability")
    sigma, sigma_next = float(trajectory.sigmas[k]), float(trajectory.sigmas[k + 1])
    x = trajectory.states[rows, k].double()
    prediction = model.predict(x, sigma, cond, guidance=guidance)
    mean, std = trajectory.kernel.mean_std(prediction, x, sigma, sigma_next)
    log_prob = gaussian_log_prob(trajectory.states[rows, k + 1].double(), mean, std).float()
    return prediction, mean, std, log_prob
