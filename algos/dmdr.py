"""DMDR (Jiang et al., arXiv 2511.13649): distribution matching distillation with a differentiable reward in the
generator loss, L_G = L_DMD + λ·L_reward; ALGORITHMS.md §2, one iteration as in §2.4.

Roles: teacher (frozen), generator (trainable), critic Ψ (trainable; a LoRA on the teacher's network under
DynaDG, wd 0 as §2.5). Per iteration (N = ttur; turn = generator turns before this iteration, the clock of every
DMDR schedule), on this learner's shard, accumulated over micro-batches:
    k ~ U{0..K−1}; c = x̂0 of the rollout at step k                       # shared stream; the CPS(η=1) rollout
    x_in = (1 − σ_k)·c + σ_k·ε'  (fresh ε'; pure noise at k = 0)  or the rollout state x_k   # generator_input
    if step % N == 0:                                                     # generator turn
        x = G(x_in, σ_k)                                                  # the only call WITH grad
        σ ~ DynaRS Beta(a_turn, b_turn); x_σ = add_noise(sg(x), ε, σ)     # no_grad ...
        x̂0_fake = Ψ(x_σ; s_f);  x̂0_real = Ψ_cfg(x_σ; s_r(turn), w_real)    # Ψ = teacher + critic LoRA (DynaDG)
        g = (x̂0_fake − x̂0_real) / (mean|x − x̂0_real| + 1e-8)              # ... to here
        L_G = ½·mse(x, sg(x − g)) − λ·mean r(decode(x))   (reward term only once turn ≥ cold_start_steps)
        step G
    step Ψ on its denoising loss (at scale s_f) on sg(c), σ' ~ DynaRS        # critic turn, every iteration

DynaDG (§2.2): the critic is a LoRA on the teacher's own network, trained and queried at its scale s_f
(roles.critic.lora_scale, 2.0); the real score is the same network at s_r(turn) = s_r,0·½(1 + cos(π·turn/K_dyn)),
then 0 (the pure teacher), with real CFG w applied to it. DynaRS (§2.3): the noise level of the DMD re-noising and
of the critic loss is u ~ Beta(a, b), annealed from (4, 1.5) to (1, 1), with u the flow σ itself (shift 1, as
DMDR's code; for VP UNets u = t/T; on shifted models such as SD3.5 it anneals to *unshifted* uniform σ). Both are
switchable; without DynaDG the critic is a LoRA at scale 1 or a full copy (roles.critic.lora_rank 0) as in DMD2,
and without DynaRS the noise levels are uniform fractions as in DMD2 (algos/distribution_matching.py).

Cold start: the reward term joins once turn ≥ cold_start_steps (DMDR's global_step), so the stage switch is a
function of the iteration alone, equal on every rank and after a resume. Before it the reward is not evaluated at
all and L_G is exactly DMD's loss.

Deviations from DMDR's code (each says why):
  * The first generator turn is iteration 0, not iteration N (§2.4 has `j % ratio == 0 and j > 0`): DMDR then
    keeps DMD2's TTUR clock (algos/dmd.py), so `--algo dmd` and `--algo dmdr` take the same generator turns in the
    same iterations and compare like for like. Its one consequence: that first turn comes before any critic
    update, so with the zero-initialised critic LoRA its direction is exactly the real score's CFG difference.
  * The critic is updated after the generator within one iteration (DMD2's order, as algos/dmd.py), not before:
    the generator's fake score therefore lags the critic by one update, as in DMD2.
  * L_reward is −mean(score) over the (weighted, for several rewards) reward, not the T2I code's hinge
    relu(0.7 − score): the hinge margin is specific to raw CLIP/HPS cosines; ALGORITHMS.md §2.4 specifies ReFL.
  * The generator step k is drawn once per batch (as DMD2's backward simulation), not per sample.
  * Continuous noise levels, zeroed non-finite directions, and DMD2's optional GAN head (off by default; DMDR
    uses none): as algos/dmd.py.
Rollouts may be one update stale (runtime.max_staleness=1), as for DMD.
Not implemented (§6): reward-weighted DMD (Re-DMD) and the decoupled CFG-augmentation / distribution-matching
split. Both need their own re-noising and teacher calls, and the split conflicts with DynaDG's single real score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from rlfew.algos.distribution_matching import (backward_simulation_input, check_fraction_ranges, critic_turn,
                                               distribution_matching_loss, dynadg_real_lora_scale, dynars_beta,
                                               dynars_fractions, fraction_to_sigma, standard_normal,
                                               uniform_fractions)
from rlfew.algos.gan import GANHead, GANOptions, check_real_images
from rlfew.config import TrainConfig
from rlfew.errors import ConfigError
from rlfew.method import Batch, Method, MethodSpec, RolloutSpec, StepResult, optimizer_settings, register_method
from rlfew.models import Conditioning, Roles, RoleSpec
from rlfew.optim import backward
from rlfew.rewards.multi import MultiReward
from rlfew.sampling import CPS


@dataclass
class DMDROptions(GANOptions):
    ttur: int = 5  # critic updates per generator update (DMDR: 5)
    real_guidance: float | None = None  # CFG scale of the real score; None: teacher.guidance
    reward_weight: float = 0.05  # λ (DMDR ImageNet: 0.05 on a cross-entropy; T2I: 0.1 per reward)
    distillation_weight: float = 1.0  # weight of L_DMD; 0 is reward-only fine-tuning (the ReFL baseline)
    cold_start_steps: int = 0  # generator turns of pure DMD (weight 1: the cold start is DMD) before the reward joins
    decode_checkpointed: bool = False  # recompute the VAE decoder in backward (memory for compute)
    generator_input: Literal["renoised_x0", "rollout_state"] = "renoised_x0"  # DMDR's quirk / DMD2's state
    dynadg: bool = True  # real score = teacher + critic LoRA at a decaying scale (needs a LoRA critic)
    real_lora_scale: float = 0.75  # s_r,0: the critic LoRA's scale in the real score at turn 0 (T2I code: 0.5)
    dynars: bool = True  # noise levels ~ annealed Beta instead of uniform
    dynars_start: list[float] = field(default_factory=lambda: [4.0, 1.5])  # Beta (a, b) at turn 0
    dynars_end: list[float] = field(default_factory=lambda: [1.0, 1.0])  # ... at turn ≥ dynamic_steps
    dynamic_steps: int = 10_000  # K_dyn: generator turns over which DynaDG and DynaRS anneal
    dm_sigma_range: list[float] = field(default_factory=lambda: [0.02, 0.98])  # without DynaRS (fractions)
    critic_sigma_range: list[float] = field(default_factory=lambda: [0.0, 1.0])  # without DynaRS
    normalise: bool = True  # divide g by mean|x − x̂0_real| per sample
    normaliser_eps: float = 1e-8  # added to that mean (DMDR)

    def __post_init__(self):
        if self.ttur < 1:
            raise ConfigError(f"algo.options.ttur: must be >= 1, got {self.ttur}")
        for name in ("reward_weight", "distillation_weight", "cold_start_steps", "real_lora_scale", "dynamic_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"algo.options.{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("dynars_start", "dynars_end"):
            a_b = getattr(self, name)
            if len(a_b) != 2 or min(a_b) <= 0:
                raise ConfigError(f"algo.options.{name}: expected Beta parameters [a, b] > 0, got {a_b}")
        check_fraction_ranges(self, "dm_sigma_range", "critic_sigma_range")
        self.check_gan_options()


@register_method
class DMDR(Method):
    name = "dmdr"
    Options = DMDROptions
    moved_options = {"fake_lora_scale": "roles.critic.lora_scale (s_f, the critic LoRA's own scale)"}

    @classmethod
    def spec(cls, cfg: TrainConfig, options: DMDROptions) -> MethodSpec:
        critic = RoleSpec(init="teacher", lora_rank=16, trainable=True, weight_decay=0.0,  # §2.5: wd 0 for Ψ
                          lora_scale=2.0 if options.dynadg else 1.0)  # s_f (DMDR) under DynaDG
        return MethodSpec(
            roles={"teacher": RoleSpec(init="teacher"),
                   "generator": RoleSpec(init="student", lora_rank=16, trainable=True),
                   "critic": critic},
            rollout=lambda step: RolloutSpec(sampler=CPS(eta=1.0)),  # DMD2's sampler, as algos/dmd.py
            rewards="in_learner", max_staleness=1)

    @classmethod
    def check_roles(cls, roles: dict[str, RoleSpec], options: DMDROptions) -> None:
        critic = roles["critic"]
        if options.dynadg and (critic.lora_rank == 0 or critic.init != "teacher" or critic.own_network):
            raise ConfigError("roles.critic: DynaDG reads the real score off the critic's LoRA on the teacher's own "
                              "network, so it needs lora_rank > 0, init teacher and a shared network; or set "
                              "algo.options.dynadg=false")

    @classmethod
    def check_inputs(cls, cfg: TrainConfig, options: DMDROptions) -> None:
        check_real_images(cfg, options)

    def __init__(self, roles: Roles, options: DMDROptions, cfg: TrainConfig, reward=None):
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
        adapter = roles.adapter
        self.resolution = cfg.model.resolution or adapter.default_resolution
        self.real_guidance = cfg.teacher.guidance if options.real_guidance is None else options.real_guidance
        self.gan = None
        if options.gan_generator_weight > 0:
            self.gan = GANHead(roles["critic"], options, adapter.latent_shape(self.resolution))
            self.add_module("discriminator", self.gan.head, optimizer_settings(roles.specs["critic"], cfg.train))

    # ---------------------------------------------------------------------------------------- schedules
    def generator_turns_before(self, step: int) -> int:
        """turn: generator turns before iteration `step` (DMDR's global_step), the clock of every schedule."""
        return -(-step // self.options.ttur)

    def real_lora_scale(self, turn: int) -> float:
        """DynaDG's s_r(turn); 0 (the pure teacher) without DynaDG."""
        options = self.options
        return dynadg_real_lora_scale(turn, options.real_lora_scale, options.dynamic_steps) if options.dynadg else 0.0

    def reward_active(self, turn: int) -> bool:
        return self.reward is not None and self.options.reward_weight > 0 and turn >= self.options.cold_start_steps

    def noise_levels(self, batch: int, rng: torch.Generator, turn: int, sigma_range: list[float]) -> torch.Tensor:
        """σ for the DMD re-noising or the critic loss: DynaRS Beta(a, b) (shift 1), else uniform fractions."""
        options, adapter = self.options, self.roles.adapter
        if options.dynars:
            fractions = dynars_fractions(batch, rng, turn, options.dynamic_steps, tuple(options.dynars_start),
                                         tuple(options.dynars_end))
            return fraction_to_sigma(adapter, fractions, shift=1.0)
        return fraction_to_sigma(adapter, uniform_fractions(batch, rng, *sigma_range), resolution=self.resolution)

    def dynars_mean_noise_fraction(self, turn: int) -> float:
        a, b = dynars_beta(turn, self.options.dynamic_steps, tuple(self.options.dynars_start),
                           tuple(self.options.dynars_end))
        return a / (a + b)

    # ------------------------------------------------------------------------------------ one iteration
    def train_step(self, batch: Batch) -> StepResult:
        options, trajectory, cond = self.options, batch.trajectory, batch.cond
        generator, critic = self.roles["generator"], self.roles["critic"]
        parts, size = batch.micro_batches(), len(batch)
        turn = self.generator_turns_before(batch.step)
        k, x_in, sigma_in = self.generator_input(trajectory, batch)
        real_scale, with_reward = self.real_lora_scale(turn), self.reward_active(turn)
        metrics = {"schedule/generator_input_step": float(k), "schedule/dynadg_real_lora_scale": real_scale,
                   "updated/generator": 0.0}
        if options.dynars:
            metrics["schedule/dynars_mean_noise_fraction"] = self.dynars_mean_noise_fraction(turn)
        skipped = False

        if batch.step % options.ttur == 0:  # ---- generator turn
            metrics["schedule/reward_active"] = float(with_reward)
            sigma = self.noise_levels(size, batch.rng, turn, options.dm_sigma_range)
            noise = standard_normal(x_in.shape, batch.rng).to(x_in)
            real_x0 = lambda x_noisy, s, c: self.real_x0(x_noisy, s, c, real_scale)  # noqa: E731
            for part in parts:
                share, part_cond = (part.stop - part.start) / size, cond.index(part)
                x = generator.predict(x_in[part], sigma_in, part_cond).x0  # the only call WITH grad
                loss, direction = distribution_matching_loss(x, part_cond, sigma[part], noise[part], real_x0,
                                                             critic, options.normalise, options.normaliser_eps)
                loss, terms = self.generator_loss(x, loss, trajectory.prompts[part], with_reward)
                terms["dmd/direction_abs_mean"] = float(direction.abs().mean())
                if self.gan is not None:
                    adversarial, gan_metrics = self.gan.generator_term(x, part_cond, batch.rng,
                                                                       options.gan_generator_weight)
                    loss = loss + adversarial
                    terms.update(gan_metrics, **{"loss/generator": float(loss.detach())})
                backward(loss * share, self.optimizers["generator"])
                for key, value in terms.items():
                    metrics[key] = metrics.get(key, 0.0) + share * value
            metrics["grad_norm/generator"], applied = self.optimizers["generator"].step()
            metrics["updated/generator"] = float(applied)
            skipped = not applied

        # ---- critic turn, every iteration, on the rollout's x̂0 at step k (DMDR's sample; DMD2's up to rounding)
        critic_sample = trajectory.x0_preds[:, k]
        critic_metrics, applied = critic_turn(
            self.optimizers["critic"], critic, critic_sample, cond,
            self.noise_levels(size, batch.rng, turn, options.critic_sigma_range),
            standard_normal(critic_sample.shape, batch.rng).to(critic_sample), parts,
            extra=self.gan.critic_term(batch.rng, options.gan_critic_weight) if self.gan is not None else None,
            extra_optimizers=(self.optimizers["discriminator"],) if self.gan is not None else ())
        metrics.update(critic_metrics)
        return StepResult(metrics, skipped=skipped or not applied)

    def generator_input(self, trajectory, batch: Batch) -> tuple[int, torch.Tensor, float]:
        """(k, x_in, σ_k). renoised_x0: the rollout's x̂0 *at* step k re-noised to σ_k with fresh noise (§2.4);
        at k = 0 that is pure noise (§1.5 step 4), i.e. the prior sample itself: re-noising x̂0 to σ_max would keep
        α_max·x̂0 of it on VP models (6.4% at σ_max = 0.936). rollout_state: the CPS(η=1) state x_k, i.e. step
        k−1's x̂0 re-noised (DMD2's backward simulation)."""
        k, x_state, sigma = backward_simulation_input(trajectory, batch.shared_rng)
        if self.options.generator_input == "rollout_state" or k == 0:
            return k, x_state, sigma
        x0 = trajectory.x0_preds[:, k]
        noise = standard_normal(x0.shape, batch.rng).to(x0)
        return k, self.roles.adapter.add_noise(x0, noise, sigma), sigma

    def real_x0(self, x_noisy: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, lora_scale: float):
        """The real score's x̂0 with CFG w: teacher + critic LoRA at `lora_scale` (DynaDG), the teacher at 0."""
        if lora_scale > 0:
            return self.roles["critic"].predict(x_noisy, sigma, cond, guidance=self.real_guidance,
                                                lora_scale=lora_scale).x0
        return self.roles["teacher"].predict(x_noisy, sigma, cond, guidance=self.real_guidance).x0

    def generator_loss(self, x: torch.Tensor, distribution_matching: torch.Tensor, prompts: list[str],
                       with_reward: bool) -> tuple[torch.Tensor, dict[str, float]]:
        """L_G = w_DM·L_DMD + λ·L_reward with L_reward = −mean r(decode(x)), the reward differentiated through the
        VAE decoder into x. Without the reward term (cold start) L_G is DMD's loss itself, so its gradient is
        DMD's bit for bit. A non-finite DMD loss returns before the reward sees non-finite images."""
        metrics = {"loss/dmd": float(distribution_matching.detach())}
        if not with_reward or not math.isfinite(metrics["loss/dmd"]):
            metrics["loss/generator"] = metrics["loss/dmd"]
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
        metrics.update({"loss/reward": float(reward_loss.detach()), "loss/generator": float(total.detach())})
        return total, metrics
