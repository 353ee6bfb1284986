"""GRPO for few-step generators, with the DMD loss as the regulariser (ALGORITHMS.md §5; the rlfew recipe of §5.7).

Roles: generator (trainable); with reg=dmd the teacher (frozen, the real score) and the critic (the fake score,
trainable); with reg=kl the reference (the student network itself, frozen: the generator with its LoRA off, or the
initial weights of a full fine-tune). Rewards come from reward workers and need not be differentiable.

One iteration (S = the rollout's stochastic steps, E = inner_epochs, N = critic_turns):
    rollout (runtime): G images per prompt; `kernel` (CPS η / Flow-GRPO SDE / DanceGRPO SDE) on the steps S,
        deterministic elsewhere (always on the final step, where Σ = 0 for CPS); stored: the states x_k as used and
        log π_old(x_{k+1} | x_k) = mean_dims log N(x_{k+1}; μ_old, Σ_k²) for k ∈ S
    scores (reward workers) -> A_i: per-reward z-score within the prompt's group (or over the batch), weighted,
        clipped to ±advantage_clip; zero-variance groups get A = 0 (masked, counted)
    σ_dm, ε_dm ~ U[dm_sigma_range] per trained step                       # reg dmd; fixed over the inner epochs
    for epoch in 1..E:                                                    # one optimiser step per epoch
        for each micro-batch (whole groups), for k ∈ S:
            pred = G(x_k, σ_k)                                           # the only generator forward, with grad
            μ, Σ = kernel(pred, x_k);  log π = mean_dims log N(x_{k+1}; μ, Σ²)
            ρ = exp(log π − log π_old)                                   # exactly 1 in epoch 1 (stored states)
            L += w_k · mean_i −min(ρ_i·A_i, clip(ρ_i, 1 − ε, 1 + ε)·A_i) / |S|
            reg dmd: L += λ · L_DM(pred.x0; σ_dm, ε_dm, teacher CFG, critic) / |S|   # same forward, no rollout
            reg kl:  L += β · mean_i ‖μ − μ_ref‖²/(2Σ²)_dims / |S|         # μ_ref: the reference's mean at x_k
        step G (its EMA copies follow)
    reg dmd: N times: k ~ S; step the critic on its denoising loss at sg(x̂0_k of the rollout)
w_k = 1, or with noise_aware_weights Σ_k / mean_j Σ_j over the steps a window can pick (TempFlow-GRPO).
S per iteration: train_steps, or MixGRPO's sliding window (progressive / random) over steps 0..K−2, or
TempFlow-GRPO's branching (a window of one step, the group sharing its initial noise, so branches share x_k).

Deviations (each says why):
  * log π is recomputed from the stored float32 states and the rollout takes log π at those same states (not at its
    float64 ones), so ρ = 1 exactly on the first inner epoch; flow_grpo's ratio there is 1 only up to rounding.
  * reg kl is the true closed-form KL of the two equal-variance Gaussians, ‖Δμ‖²/(2Σ²); flow_grpo divides by
    2·s_σ² instead of 2·s_σ²·|Δ| (its β is ours × |Δ|). The true KL is kernel-independent, and CPS has no s_σ.
  * The DM regulariser acts on the x̂0 of every trained step (DMD2 trains every step's x̂0 by backward simulation),
    and its critic models the mixture of those x̂0 (a step drawn per critic turn), as DMD2's does. The final,
    deterministic step gets no gradient from GRPO (Σ = 0); the reward back-propagation through it (§5.7 recipe 3)
    is not implemented.
  * Zero-variance groups stay in the batch with A = 0 (they add nothing to the policy loss but still to the
    regularisers), and the loss divides by the shard size, so every learner's gradient is on one scale.
  * One optimiser step per inner epoch over the whole shard (flow_grpo takes 2 per epoch by splitting the batch):
    the shard is already what fits, and micro-batches accumulate within it.
Rollouts may be one update stale (runtime.max_staleness=1): ρ then corrects for the lag, as in PPO.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from rlfew.algos.advantages import AdvantageSpec
from rlfew.algos.distribution_matching import (check_fraction_ranges, critic_turn, distribution_matching_loss,
                                               fraction_to_sigma, standard_normal, uniform_fractions)
from rlfew.config import TrainConfig
from rlfew.errors import ConfigError, UsageError
from rlfew.method import Batch, Method, MethodSpec, RolloutSpec, StepResult, register_method
from rlfew.models import Roles, RoleSpec
from rlfew.optim import backward
from rlfew.runtime.seeds import WINDOW_STREAM, step_seed
from rlfew.sampling import Trajectory, make_sampler, step_log_prob

KERNELS = ("cps", "flow_grpo", "dance_grpo")
REGULARISERS = ("dmd", "kl", "none")
WINDOWS = ("none", "progressive", "random")


@dataclass
class GRPOOptions:
    kernel: Literal["cps", "flow_grpo", "dance_grpo"] = "cps"  # CPS: the few-step students' kernel (§5.6)
    eta: float | None = None  # cps: the angle η (0.9, RTDMD); dance_grpo: the constant diffusion η (0.3)
    noise_level: float | None = None  # flow_grpo: a (0.7 for SD3.5-M)
    train_steps: list[int] | None = None  # stochastic (trained) steps; None: every step but the final one
    shared_noise: bool = False  # one initial noise per group (DanceGRPO, MixGRPO)
    window: Literal["none", "progressive", "random"] = "none"  # MixGRPO's sliding SDE window
    window_size: int = 1  # w: steps in the window
    window_every: int = 25  # τ: iterations before a progressive window moves (MixGRPO: 25, Flash: 20)
    window_stride: int = 1  # s: steps a progressive window moves (MixGRPO's prog_overlap_step)
    branching: bool = False  # TempFlow-GRPO: one stochastic step (the window's), groups share the initial noise
    noise_aware_weights: bool = False  # TempFlow-GRPO: per-step loss × Σ_k / mean Σ
    clip_range: float = 1e-4  # PPO ε_c on the mean-over-dims ratio (flow_grpo, DanceGRPO, MixGRPO: 1e-4)
    inner_epochs: int = 1  # optimiser steps per rollout, each over the whole shard
    advantage_std: Literal["group", "global"] = "group"  # flow_grpo: global
    advantage_clip: float = 5.0
    reg: Literal["dmd", "kl", "none"] = "dmd"
    reg_weight: float = 1.0  # λ_DMD for dmd, β for kl
    real_guidance: float | None = None  # CFG of the real score (reg dmd); None: teacher.guidance
    critic_turns: int = 5  # N: critic updates per rollout (reg dmd; DMD2's TTUR 5)
    dm_sigma_range: list[float] = field(default_factory=lambda: [0.02, 0.98])  # DM re-noising fractions (§5.7)
    critic_sigma_range: list[float] = field(default_factory=lambda: [0.0, 1.0])
    normalise: bool = True  # DMD's per-sample normaliser mean|x − x̂0_real|

    def __post_init__(self):
        for name, allowed in (("kernel", KERNELS), ("reg", REGULARISERS), ("window", WINDOWS),
                              ("advantage_std", ("group", "global"))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"algo.options.{name}: {getattr(self, name)!r} is not allowed; choose one of "
                                  f"{', '.join(allowed)}")
        for name in ("window_size", "window_every", "window_stride", "inner_epochs", "critic_turns"):
            if getattr(self, name) < 1:
                raise ConfigError(f"algo.options.{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("clip_range", "advantage_clip"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"algo.options.{name}: must be > 0, got {getattr(self, name)}")
        if not (self.reg_weight >= 0 and math.isfinite(self.reg_weight)):
            raise ConfigError(f"algo.options.reg_weight: must be a finite number >= 0, got {self.reg_weight}")
        if self.eta is not None and self.kernel not in ("cps", "dance_grpo"):
            raise ConfigError(f"algo.options.eta: only the cps and dance_grpo kernels take eta; {self.kernel} takes "
                              f"noise_level")
        if self.noise_level is not None and self.kernel != "flow_grpo":
            raise ConfigError(f"algo.options.noise_level: only the flow_grpo kernel takes noise_level; {self.kernel} "
                              f"takes eta")
        if self.train_steps is not None and self.window != "none":
            raise ConfigError("algo.options.train_steps: a sliding window chooses the trained steps; set one of "
                              "train_steps and window")
        if self.branching and self.window == "none":
            raise ConfigError("algo.options.branching: the branch step moves with a window; set algo.options.window "
                              "to progressive or random")
        if self.branching and self.window_size != 1:
            raise ConfigError(f"algo.options.window_size: branching injects noise at one step, so the window is 1 "
                              f"step, got {self.window_size}")
        check_fraction_ranges(self, "dm_sigma_range", "critic_sigma_range")
        try:
            make_sampler(self.kernel, eta=self.eta, noise_level=self.noise_level)
        except UsageError as err:
            key = "noise_level" if self.kernel == "flow_grpo" else "eta"
            raise ConfigError(f"algo.options.{key}: {err}") from None


def window_start(step: int, strategy: str, size: int, candidates: int, every: int = 25, stride: int = 1,
                 seed: int = 0) -> int:
    """The first step of the SDE window at iteration `step` over steps 0..candidates−1 (MixGRPO's
    GRPOTrainingStates, stateless so every actor and a resumed run agree): progressive moves by `stride` every
    `every` iterations and rolls back to 0 once the start passes candidates − 1; random draws the start uniformly
    from 0..candidates − size, from (seed, step)."""
    if strategy == "progressive":
        positions = (candidates - 1) // stride + 1  # starts 0, s, 2s, ... ≤ candidates − 1, then back to 0
        return (step // every) % positions * stride
    if strategy == "random":
        rng = np.random.default_rng(step_seed(seed, step, WINDOW_STREAM))
        return int(rng.integers(0, candidates - size + 1))
    raise ValueError(f"unknown window strategy {strategy!r}")


def ppo_clipped_loss(ratio: torch.Tensor, advantages: torch.Tensor, clip_range: float) -> torch.Tensor:
    """Per-sample −min(ρA, clip(ρ, 1 − ε, 1 + ε)A): at ρ = 1 its gradient is −A·∇log π; zero where the clip binds."""
    return -torch.minimum(ratio * advantages, ratio.clamp(1 - clip_range, 1 + clip_range) * advantages)


def gaussian_kl_same_std(mean: torch.Tensor, reference_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(N(μ, Σ²) ‖ N(μ_ref, Σ²)) averaged over dimensions: mean ‖μ − μ_ref‖²/(2Σ²)."""
    return ((mean - reference_mean) ** 2).flatten(1).mean(1) / (2 * std**2)


@register_method
class GRPO(Method):
    name = "grpo"
    Options = GRPOOptions

    @classmethod
    def spec(cls, cfg: TrainConfig, options: GRPOOptions) -> MethodSpec:
        steps = cfg.generator.steps
        if steps < 2:
            raise ConfigError(f"generator.steps: GRPO needs a stochastic step before the deterministic final one, "
                              f"so at least 2 steps, got {steps}")
        if options.train_steps is not None:
            bad = [k for k in options.train_steps if not 0 <= k <= steps - 2]
            if bad or not options.train_steps:
                raise ConfigError(f"algo.options.train_steps: steps 0..{steps - 2} of a {steps}-step generator can be "
                                  f"trained (the final step is deterministic), got {options.train_steps}")
        if options.window != "none" and options.window_size > steps - 1:
            raise ConfigError(f"algo.options.window_size: at most {steps - 1} for a {steps}-step generator, got "
                              f"{options.window_size}")
        roles = {"generator": RoleSpec(init="student", lora_rank=32, lora_alpha=64, trainable=True)}  # flow_grpo
        if options.reg == "dmd":
            roles["teacher"] = RoleSpec(init="teacher")
            roles["critic"] = RoleSpec(init="teacher", lora_rank=32, lora_alpha=64, trainable=True)  # RTDMD: r32
        elif options.reg == "kl":
            roles["reference"] = RoleSpec(init="student")
        sampler = make_sampler(options.kernel, eta=options.eta, noise_level=options.noise_level)
        shared_noise = options.shared_noise or options.branching

        def rollout(step: int) -> RolloutSpec:
            return RolloutSpec(sampler=sampler, stochastic_steps=cls.trained_steps(step, steps, options, cfg.run.seed),
                               shared_noise_in_group=shared_noise)

        return MethodSpec(roles=roles, rollout=rollout, rewards="workers",
                          advantages=AdvantageSpec(std=options.advantage_std, clip=options.advantage_clip),
                          max_staleness=1)

    @staticmethod
    def trained_steps(step: int, steps: int, options: GRPOOptions, seed: int) -> list[int]:
        """S at iteration `step` of a `steps`-step generator (the module docstring)."""
        candidates = steps - 1  # the final step is deterministic
        if options.window != "none":
            start = window_start(step, options.window, options.window_size, candidates, options.window_every,
                                 options.window_stride, seed)
            return list(range(start, min(start + options.window_size, candidates)))
        return sorted(set(options.train_steps)) if options.train_steps is not None else list(range(candidates))

    def __init__(self, roles: Roles, options: GRPOOptions, cfg: TrainConfig, reward=None):
        super().__init__(roles, options, cfg, reward)
        self.resolution = cfg.model.resolution or roles.adapter.default_resolution
        self.real_guidance = cfg.teacher.guidance if options.real_guidance is None else options.real_guidance

    def step_weights(self, trajectory: Trajectory, steps: list[int]) -> dict[int, float]:
        """w_k: 1, or Σ_k over the mean Σ of the steps a window can pick (mean 1 over them)."""
        if not self.options.noise_aware_weights:
            return {k: 1.0 for k in steps}
        sigmas, kernel = trajectory.sigmas, trajectory.kernel
        stds = [kernel.std(float(sigmas[j]), float(sigmas[j + 1])) for j in range(len(sigmas) - 2)]
        return {k: stds[k] / float(np.mean(stds)) for k in steps}

    # ------------------------------------------------------------------------------------ one iteration
    def train_step(self, batch: Batch) -> StepResult:
        options, trajectory, cond = self.options, batch.trajectory, batch.cond
        generator, optimizer = self.roles["generator"], self.optimizers["generator"]
        parts, size = batch.micro_batches(), len(batch)
        steps = [k for k in range(len(trajectory.stochastic)) if bool(trajectory.stochastic[k])]
        weights = self.step_weights(trajectory, steps)
        advantages = trajectory.advantages.float()
        old_log_probs = trajectory.log_probs
        if options.reg == "dmd":  # the DM re-noising of each trained step, the same in every inner epoch
            dm_sigma = {k: fraction_to_sigma(self.roles.adapter, uniform_fractions(size, batch.rng,
                                                                                 *options.dm_sigma_range),
                                             resolution=self.resolution) for k in steps}
            dm_noise = {k: standard_normal(trajectory.x0_preds[:, k].shape, batch.rng).to(trajectory.x0_preds)
                        for k in steps}
        metrics = {"schedule/first_trained_step": float(steps[0]), "schedule/trained_steps": float(len(steps)),
                   "advantage/valid_fraction": float(trajectory.advantage_valid.float().mean())}
        skipped = False

        for epoch in range(options.inner_epochs):
            totals: dict[str, float] = {}
            for part in parts:
                part_cond, part_advantages = cond.index(part), advantages[part]
                for k in steps:
                    prediction, mean, std, log_prob = step_log_prob(generator, trajectory, k, part_cond, part)
                    ratio = torch.exp(log_prob - old_log_probs[part, k])
                    policy = ppo_clipped_loss(ratio, part_advantages, options.clip_range)
                    loss = weights[k] * policy.sum() / (size * len(steps))
                    terms = {"loss/policy": float(policy.detach().sum()) / (size * len(steps)),
                             "ppo/clip_fraction": float(((ratio - 1).abs() > options.clip_range).float().sum())
                             / (size * len(steps)),
                             "ppo/log_ratio_abs": float((log_prob - old_log_probs[part, k]).abs().sum().detach())
                             / (size * len(steps))}
                    if options.reg == "kl":
                        with torch.no_grad():
                            _, reference_mean, _, _ = step_log_prob(self.roles["reference"], trajectory, k,
                                                                    part_cond, part)
                        kl = gaussian_kl_same_std(mean, reference_mean, std)
                        loss = loss + options.reg_weight * kl.sum() / (size * len(steps))
                        terms["loss/kl"] = float(kl.detach().sum()) / (size * len(steps))
                    elif options.reg == "dmd":
                        share = (part.stop - part.start) / size
                        distribution_matching, direction = distribution_matching_loss(
                            prediction.x0, part_cond, dm_sigma[k][part], dm_noise[k][part], self.real_x0,
                            self.roles["critic"], options.normalise)
                        loss = loss + options.reg_weight * distribution_matching * share / len(steps)
                        terms["loss/dmd"] = float(distribution_matching.detach()) * share / len(steps)
                        terms["dmd/direction_abs_mean"] = float(direction.abs().mean()) * share / len(steps)
                    backward(loss, optimizer)
                    for key, value in terms.items():
                        totals[key] = totals.get(key, 0.0) + value
            grad_norm, applied = optimizer.step()
            skipped = skipped or not applied
            if epoch == 0:  # the first epoch's loss is the rollout's on-policy loss (ρ = 1)
                metrics.update(totals)
                metrics["grad_norm/generator"] = grad_norm
        metrics["updated/generator"] = float(not skipped)
        if options.inner_epochs > 1:
            metrics["ppo/last_epoch_clip_fraction"] = totals["ppo/clip_fraction"]

        if options.reg == "dmd":  # ---- critic turns on the rollout's x̂0 at a trained step (the DMD2 mixture)
            critic = self.roles["critic"]
            for _ in range(options.critic_turns):
                k = steps[int(torch.randint(len(steps), (1,), generator=batch.shared_rng,
                                            device=batch.shared_rng.device))]
                samples = trajectory.x0_preds[:, k]
                sigma = fraction_to_sigma(self.roles.adapter, uniform_fractions(size, batch.rng,
                                                                                *options.critic_sigma_range),
                                          resolution=self.resolution)
                critic_metrics, applied = critic_turn(self.optimizers["critic"], critic, samples, cond, sigma,
                                                      standard_normal(samples.shape, batch.rng).to(samples), parts)
                skipped = skipped or not applied
            metrics.update(critic_metrics)
        return StepResult(metrics, skipped=skipped)

    def real_x0(self, x_noisy: torch.Tensor, sigma: torch.Tensor, cond) -> torch.Tensor:
        return self.roles["teacher"].predict(x_noisy, sigma, cond, guidance=self.real_guidance).x0
