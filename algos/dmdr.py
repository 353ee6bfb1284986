"""DMDR (Jiang et al., arXiv 2511.13649): distribution matching distillation with a differentiable reward in the
generator loss, L_G = L_DMD + λ·L_reward; ALGORITHMS.md §2, one iteration as in §2.4.

Per iteration (N = ttur; k = generator turns before this iteration, the clock of every DMDR schedule):
    j ~ U{0..K−1}; c = x̂0 of the rollout at step j                       # no_grad (the CPS(η=1) rollout)
    x_in = (1 − σ_j)·c + σ_j·ε'  (fresh ε')   or the rollout state x_j    # generator_input
    if step % N == 0:                                                     # generator turn
        x = G(x_in, σ_j)                                                  # the only call WITH grad
        σ ~ DynaRS Beta(a_k, b_k); x_σ = add_noise(sg(x), ε, σ)            # no_grad ...
        x̂0_fake = Ψ(x_σ; s_f);  x̂0_real = Ψ_cfg(x_σ; s_r(k), w_real)       # Ψ = teacher + critic LoRA (DynaDG)
        g = (x̂0_fake − x̂0_real) / (mean|x − x̂0_real| + 1e-8)              # ... to here
        L_G = ½·mse(x, sg(x − g)) − λ·mean r(decode(x))   (reward term only once k ≥ cold_start_steps)
        step G
    step Ψ on its denoising loss (at scale s_f) on sg(c), σ' ~ DynaRS        # critic turn, every iteration

DynaDG (§2.2): the critic is a LoRA on the teacher's own network, trained and queried at scale s_f; the real score
is the same network at s_r(k) = s_r,0·½(1 + cos(πk/K_dyn)), then 0 (the pure teacher), with real CFG w applied to
it. DynaRS (§2.3): the noise level of the DMD re-noising and of the critic loss is u ~ Beta(a_k, b_k), annealed
from (4, 1.5) to (1, 1), with u the flow σ itself (shift 1, as DMDR's code; for VP UNets u = t/T). Both are
switchable; without DynaDG the critic is a full copy or a LoRA at scale 1 (critic.lora_rank) as in DMD2, and
without DynaRS the noise levels are uniform fractions as in DMD2 (algos/common.py).

Cold start: the reward term joins once k ≥ cold_start_steps, k counted in generator turns (DMDR's global_step),
so the stage switch is a function of the iteration alone, equal on every rank and after a resume. Before it the
reward is not evaluated at all and L_G is exactly DMD's loss.

Deviations from DMDR's code (each says why):
  * The critic is updated after the generator within one iteration (DMD2's order, as algos/dmd.py), not before:
    the generator's fake score therefore lags the critic by one update, as in DMD2.
  * L_reward is −mean(score) over the (weighted, for several rewards) reward, not the T2I code's hinge
    relu(0.7 − score): the hinge margin is specific to raw CLIP/HPS cosines; ALGORITHMS.md §2.4 specifies ReFL.
  * The generator step j is drawn once per batch (as DMD2's backward simulation), not per sample.
  * Continuous noise levels, zeroed non-finite directions, and DMD2's optional GAN head (off by default; DMDR
    uses none): as algos/dmd.py.
Not implemented (§6): reward-weighted DMD (Re-DMD) and the decoupled CFG-augmentation / distribution-matching
split. Both need their own re-noising and teacher calls, and the split conflicts with DynaDG's single real score.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from rlfew.algos.common import (backward_simulation_input, check_fraction_ranges, critic_denoising_loss,
                                dmd_direction, dmd_loss,
                                dynadg_real_lora_scale, dynars_beta, dynars_fractions, fraction_to_sigma,
                                standard_normal, uniform_fractions)
from rlfew.algos.dmd import DMD
from rlfew.algos.gan import GANOptions
from rlfew.rewards.multi import MultiReward
from rlfew.config import TrainConfig
from rlfew.errors import ConfigError
from rlfew.method import Batch, all_ranks_finite, register_method
from rlfew.models import Conditioning, ModelRoles


@dataclass
class DMDROptions(GANOptions):
    ttur: int = 5  # critic updates per generator update (DMDR: 5)
    real_guidance: float | None = None  # CFG scale of the real score; None: teacher.guidance
    reward_weight: float = 0.05  # λ (DMDR ImageNet: 0.05 on a cross-entropy; T2I: 0.1 per reward)
    distillation_weight: float = 1.0  # weight of L_DMD; 0 is reward-only fine-tuning (the ReFL baseline)
    cold_start_steps: int = 0  # generator turns of pure DMD before the reward term joins
    decode_checkpointed: bool = False  # recompute the VAE decoder in backward (memory for compute)
    generator_input: Literal["renoised_x0", "rollout_state"] = "renoised_x0"  # DMDR's quirk / DMD2's state
    dynadg: bool = True  # real score = teacher + critic LoRA at a decaying scale (needs critic.lora_rank > 0)
    fake_lora_scale: float = 2.0  # s_f: the critic LoRA's scale, trained and queried (with DynaDG)
    real_lora_scale: float = 0.75  # s_r,0: the critic LoRA's scale in the real score at k = 0 (T2I code: 0.5)
    dynars: bool = True  # noise levels ~ annealed Beta instead of uniform
    dynars_start: list[float] = field(default_factory=lambda: [4.0, 1.5])  # Beta (a, b) at k = 0
    dynars_end: list[float] = field(default_factory=lambda: [1.0, 1.0])  # ... at k ≥ dynamic_steps
    dynamic_steps: int = 10_000  # K_dyn: generator turns over which DynaDG and DynaRS anneal
    dm_sigma_range: list[float] = field(default_factory=lambda: [0.02, 0.98])  # without DynaRS (fractions)
    critic_sigma_range: list[float] = field(default_factory=lambda: [0.0, 1.0])  # without DynaRS
    normalise: bool = True  # divide g by mean|x − x̂0_real| per sample
    normaliser_eps: float = 1e-8  # added to that mean (DMDR)

    def __post_init__(self):
        if self.ttur < 1:
            raise ConfigError(f"algo.options.ttur: must be >= 1, got {self.ttur}")
        for name in ("reward_weight", "distillation_weight", "cold_start_steps", "fake_lora_scale",
                     "real_lora_scale", "dynamic_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"algo.options.{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("dynars_start", "dynars_end"):
            a_b = getattr(self, name)
            if len(a_b) != 2 or min(a_b) <= 0:
                raise ConfigError(f"algo.options.{name}: expected Beta parameters [a, b] > 0, got {a_b}")
        check_fraction_ranges(self, "dm_sigma_range", "critic_sigma_range")
        self.check_gan_options()


@register_method
class DMDR(DMD):
    """DMD2's roles, optimisers, TTUR update and checkpoints (algos/dmd.py), with DMDR's generator loss,
    generator input, DynaDG real score and DynaRS noise levels."""

    name = "dmdr"
    Options = DMDROptions
    reward_in_learner = True

    @classmethod
    def role_spec(cls, cfg: TrainConfig, options: DMDROptions) -> dict:
        rank, alpha = cfg.critic.lora_rank, cfg.critic.lora_alpha
        if not options.dynadg:
            return {"critic": "full" if rank == 0 else "lora", "critic_lora_rank": rank, "critic_lora_alpha": alpha}
        if rank == 0:
            raise ConfigError("algo.options.dynadg: DynaDG reads the real score off the critic's LoRA on the teacher, "
                              "so it needs a LoRA critic; set critic.lora_rank > 0, or algo.options.dynadg=false")
        return {"critic": "lora", "critic_lora_rank": rank, "critic_lora_alpha": alpha,
                "critic_lora_scale": options.fake_lora_scale}

    def __init__(self, roles: ModelRoles, options: DMDROptions, cfg: TrainConfig, reward=None):
        if options.reward_weight > 0:
            if reward is None:
                raise ConfigError("reward: DMDR needs a differentiable reward (e.g. --reward pickscore), or "
                                  "algo.options.reward_weight=0 for DMD with DynaDG/DynaRS only")
            if not reward.differentiable:
                parts = getattr(reward, "parts", [(reward, 1.0)])
                names = ", ".join(repr(r.name) for r, _ in parts if not r.differentiable)
                raise ConfigError(f"reward: {names} is not differentiable; DMDR back-propagates the reward through "
                                  f"the decoded image, so it needs a differentiable one (e.g. pickscore, hpsv2, "
                                  f"imagereward, world-clip); use a policy-gradient method for this reward")
        super().__init__(roles, options, cfg, reward)

    # ---------------------------------------------------------------------------------------- schedules
    def schedule_step(self, step: int) -> int:
        """k: generator turns before iteration `step` (DMDR's global_step), the clock of every schedule."""
        return -(-step // self.options.ttur)

    def real_lora_scale(self, k: int) -> float:
        """DynaDG's s_r(k); 0 (the pure teacher) without DynaDG."""
        options = self.options
        return dynadg_real_lora_scale(k, options.real_lora_scale, options.dynamic_steps) if options.dynadg else 0.0

    def reward_active(self, k: int) -> bool:
        return self.reward is not None and self.options.reward_weight > 0 and k >= self.options.cold_start_steps

    def noise_levels(self, batch: int, rng: torch.Generator, k: int, sigma_range: list[float]) -> torch.Tensor:
        """σ for the DMD re-noising or the critic loss: DynaRS Beta(a_k, b_k) (shift 1), else uniform fractions."""
        options, adapter = self.options, self.roles.adapter
        if options.dynars:
            fractions = dynars_fractions(batch, rng, k, options.dynamic_steps, tuple(options.dynars_start),
                                         tuple(options.dynars_end))
            return fraction_to_sigma(adapter, fractions, shift=1.0)
        return fraction_to_sigma(adapter, uniform_fractions(batch, rng, *sigma_range))

    def mean_noise_fraction(self, k: int, sigma_range: list[float]) -> float:
        """The mean fraction u of `noise_levels` at k (Beta: a/(a + b)), for the logs."""
        if self.options.dynars:
            a, b = dynars_beta(k, self.options.dynamic_steps, tuple(self.options.dynars_start),
                               tuple(self.options.dynars_end))
            return a / (a + b)
        return 0.5 * (sigma_range[0] + sigma_range[1])

    # ------------------------------------------------------------------------------------ one iteration
    def train_step(self, batch: Batch) -> dict[str, float]:
        roles, rng, cond, trajectory, options = self.roles, batch.rng, batch.cond, batch.trajectory, self.options
        k = self.schedule_step(batch.step)
        step_index, x_in, sigma_in = self.generator_input(trajectory, rng)
        real_scale, with_reward = self.real_lora_scale(k), self.reward_active(k)
        metrics = {"generator_input_step": float(step_index), "generator_step": 0.0,
                   "dynadg_real_lora_scale": real_scale,
                   "dynars_mean": self.mean_noise_fraction(k, options.dm_sigma_range)}

        if batch.step % options.ttur == 0:  # ---- generator turn
            x = roles.generator.predict(x_in, sigma_in, cond).x0  # the only call WITH grad
            with torch.no_grad():
                sigma = self.noise_levels(x.shape[0], rng, k, options.dm_sigma_range)
                noise = standard_normal(x.shape, rng).to(device=x.device, dtype=x.dtype)
                x_noisy = roles.adapter.add_noise(x.detach(), noise, sigma)
                x0_real = self.real_x0(x_noisy, sigma, cond, real_scale)
                x0_fake = roles.critic.predict(x_noisy, sigma, cond).x0  # at s_f (the role's scale)
                direction = dmd_direction(x, x0_real, x0_fake, options.normalise, options.normaliser_eps)
            generator_loss, loss_metrics = self.generator_loss(x, direction, trajectory.prompts, with_reward)
            metrics.update(loss_metrics, reward_active=float(with_reward))
            if self.gan is not None:
                generator_loss = self._add_gan_generator_term(generator_loss, x, cond, rng, metrics)
                metrics["generator_loss"] = float(generator_loss.detach())
            metrics["dmd_direction_abs_mean"] = float(direction.abs().mean())
            if not all_ranks_finite(metrics["generator_loss"]):
                self._zero_grads()
                return metrics  # no optimiser steps; the trainer counts non-finite losses and aborts after N
            metrics["generator_grad_norm"] = self._update(generator_loss, "generator")
            metrics["generator_step"] = float(math.isfinite(metrics["generator_grad_norm"]))

        # ---- critic turn, every iteration, on the rollout's x̂0 at step j (DMDR's sample; DMD2's up to rounding)
        critic_sample = trajectory.x0_preds[:, step_index]
        critic_sigmas = functools.partial(self.noise_levels, k=k, sigma_range=options.critic_sigma_range)
        critic_loss = critic_denoising_loss(roles.critic, critic_sample, cond, critic_sigmas, rng)
        critic_loss = self._add_gan_critic_term(critic_loss, critic_sample, cond, rng, metrics)
        metrics["critic_loss"] = float(critic_loss.detach())
        if all_ranks_finite(metrics["critic_loss"]):
            metrics["critic_grad_norm"] = self._update(critic_loss, "critic")
        return metrics

    def generator_input(self, trajectory, rng: torch.Generator) -> tuple[int, torch.Tensor, float]:
        """(j, x_in, σ_j). renoised_x0: the rollout's x̂0 *at* step j re-noised to σ_j with fresh noise (§2.4);
        rollout_state: the CPS(η=1) state x_j, i.e. step j−1's x̂0 re-noised (DMD2's backward simulation)."""
        step_index, x_state, sigma = backward_simulation_input(trajectory, rng)
        if self.options.generator_input == "rollout_state":
            return step_index, x_state, sigma
        x0 = trajectory.x0_preds[:, step_index]
        noise = standard_normal(x0.shape, rng).to(device=x0.device, dtype=x0.dtype)
        return step_index, self.roles.adapter.add_noise(x0, noise, sigma), sigma

    def real_x0(self, x_noisy: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, lora_scale: float):
        """The real score's x̂0 with CFG w: teacher + critic LoRA at `lora_scale` (DynaDG), the teacher at 0."""
        if lora_scale > 0:
            return self.roles.critic.predict(x_noisy, sigma, cond, guidance=self.real_guidance,
                                             lora_scale=lora_scale).x0
        return self.roles.teacher.predict(x_noisy, sigma, cond, guidance=self.real_guidance).x0

    def generator_loss(self, x: torch.Tensor, direction: torch.Tensor, prompts: list[str],
                       with_reward: bool) -> tuple[torch.Tensor, dict[str, float]]:
        """L_G = L_DMD + λ·L_reward with L_reward = −mean r(decode(x)), the reward differentiated through the
        VAE decoder into x. Without the reward term (cold start) L_G is DMD's loss itself, so its gradient is
        DMD's bit for bit. A non-finite DMD loss returns before the reward sees non-finite images."""
        distribution_matching = dmd_loss(x, direction)
        metrics = {"dmd_loss": float(distribution_matching.detach())}
        if not with_reward or not math.isfinite(metrics["dmd_loss"]):
            metrics["generator_loss"] = metrics["dmd_loss"]
            return distribution_matching, metrics
        images = self.roles.adapter.decode(x, checkpointed=self.options.decode_checkpointed)
        if isinstance(self.reward, MultiReward):  # log each reward, optimise their weighted sum
            by_name = self.reward.score_each(images, prompts)
            scores = self.reward.weighted_sum(by_name)
        else:
            scores = self.reward.score(images, prompts)
            by_name = {self.reward.name: scores}
        metrics.update({f"reward/{name}": float(value.detach().mean()) for name, value in by_name.items()})
        reward_loss = -scores.mean()
        total = self.options.distillation_weight * distribution_matching + self.options.reward_weight * reward_loss
        metrics.update(reward=float(scores.detach().mean()), reward_loss=float(reward_loss.detach()),
                       generator_loss=float(total.detach()))
        return total, metrics
