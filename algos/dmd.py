"""DMD2 (Yin et al., NeurIPS'24): distribution matching distillation with a two-time-scale critic and backward
simulation; ALGORITHMS.md §1, one iteration as in §1.7.

Roles: teacher (frozen, real score with CFG w), generator (trainable; the student), critic (trainable fake
score, from the teacher). Per iteration (N = ttur), on this learner's shard, accumulated over micro-batches:
    k, x_k, σ_k = backward simulation on the CPS(η=1) rollout           # shared stream: one k on every learner
    if step % N == 0:                                                    # generator turn
        x = G(x_k, σ_k)                                                  # the only call WITH grad
        σ ~ U[0.02, 0.98]; x_σ = add_noise(sg(x), ε, σ)                  # no_grad ...
        g = (F(x_σ) − T_cfg(x_σ; w_real)) / mean|x − T_cfg(x_σ)|         # ... to here
        step G on ½·mse(x, sg(x − g)) [+ λ_G·GAN_G(x)]
    else:
        x = the rollout's x̂0 at step k                                  # already computed without grad
    step F on its denoising loss at σ' ~ U[0, 1] on sg(x) [+ λ_D·GAN_D(sg(x), x_real)]   # every iteration

Deviations from DMD2 (each says why):
  * The GAN head (algos/gan.py, off unless gan_generator_weight > 0) reads the critic's bottleneck on its own
    forward, stopped there, rather than sharing one UNet call with classification as DMD2's classify mode does.
  * The GAN head has its own optimiser (the "discriminator", with the critic's settings) and is clipped on its
    own; DMD2 steps and clips it inside the critic's optimiser. Its own state lets a run distilled without the
    head resume with a fresh one (DMD2's SD1.5 protocol) without editing the critic's optimiser state.
  * Noise levels are continuous fractions of the training-time axis (algos/distribution_matching.py), not
    integer t.
  * The critic may be a LoRA on the teacher (DMDR-style, roles.critic.lora_rank > 0; the default) as well as a
    full copy (lora_rank 0, DMD2's choice).
  * backward_simulation=False trains the first step only (k = 0, the prior sample at σ_max): DMD2 would instead
    noise real or ODE images, which rlfew's Batch does not carry.
  * A non-finite direction is zeroed instead of becoming the largest float (see `dmd_direction`).
Rollouts may be one update stale (runtime.max_staleness=1): DMD2's critic already lags the generator by one
update, and every sample here is drawn by the generator itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rlfew.algos.distribution_matching import (backward_simulation_input, check_fraction_ranges, critic_turn,
                                               distribution_matching_loss, standard_normal, uniform_sigma_sampler)
from rlfew.algos.gan import GANHead, GANOptions, check_real_images
from rlfew.config import TrainConfig
from rlfew.errors import ConfigError
from rlfew.method import Batch, Method, MethodSpec, RolloutSpec, StepResult, optimizer_settings, register_method
from rlfew.models import Roles, RoleSpec
from rlfew.optim import backward
from rlfew.sampling import CPS


@dataclass
class DMDOptions(GANOptions):
    ttur: int = 5  # critic updates per generator update (DMD2: 10 for SD1.5, 5 for SDXL)
    real_guidance: float | None = None  # CFG scale of the real score; None: teacher.guidance
    dm_sigma_range: list[float] = field(default_factory=lambda: [0.02, 0.98])  # fractions, see distribution_matching
    critic_sigma_range: list[float] = field(default_factory=lambda: [0.0, 1.0])
    normalise: bool = True  # divide g by mean|x − x̂0_real| per sample
    normaliser_eps: float = 0.0  # added to that mean (DMDR: 1e-8)
    backward_simulation: bool = True  # train a random step k of the K-step generator (False: k = 0)

    def __post_init__(self):
        if self.ttur < 1:
            raise ConfigError(f"algo.options.ttur: must be >= 1, got {self.ttur}")
        check_fraction_ranges(self, "dm_sigma_range", "critic_sigma_range")
        self.check_gan_options()


@register_method
class DMD(Method):
    name = "dmd"
    Options = DMDOptions

    @classmethod
    def spec(cls, cfg: TrainConfig, options: DMDOptions) -> MethodSpec:
        return MethodSpec(
            roles={"teacher": RoleSpec(init="teacher"),
                   "generator": RoleSpec(init="student", lora_rank=16, trainable=True),
                   "critic": RoleSpec(init="teacher", lora_rank=16, trainable=True)},
            # DMD2's multi-step sampler: x̂0 re-noised with fresh noise; backward simulation reads its states.
            rollout=lambda step: RolloutSpec(sampler=CPS(eta=1.0)),
            max_staleness=1)

    @classmethod
    def check_inputs(cls, cfg: TrainConfig, options: DMDOptions) -> None:
        check_real_images(cfg, options)

    def __init__(self, roles: Roles, options: DMDOptions, cfg: TrainConfig, reward=None):
        super().__init__(roles, options, cfg, reward)
        adapter = roles.adapter
        resolution = cfg.model.resolution or adapter.default_resolution
        self.real_guidance = cfg.teacher.guidance if options.real_guidance is None else options.real_guidance
        self.dm_sigmas = uniform_sigma_sampler(adapter, *options.dm_sigma_range, resolution=resolution)
        self.critic_sigmas = uniform_sigma_sampler(adapter, *options.critic_sigma_range, resolution=resolution)
        self.gan = None
        if options.gan_generator_weight > 0:
            self.gan = GANHead(roles["critic"], options, adapter.latent_shape(resolution))
            self.add_module("discriminator", self.gan.head, optimizer_settings(roles.specs["critic"], cfg.train))

    def real_x0(self, x_noisy: torch.Tensor, sigma: torch.Tensor, cond) -> torch.Tensor:
        """The real score: the teacher with CFG w."""
        return self.roles["teacher"].predict(x_noisy, sigma, cond, guidance=self.real_guidance).x0

    # ------------------------------------------------------------------------------------ one iteration
    def train_step(self, batch: Batch) -> StepResult:
        options, trajectory, cond = self.options, batch.trajectory, batch.cond
        generator, critic = self.roles["generator"], self.roles["critic"]
        parts, size = batch.micro_batches(), len(batch)
        if options.backward_simulation:
            k, x_in, sigma_in = backward_simulation_input(trajectory, batch.shared_rng)
        else:
            k, x_in, sigma_in = 0, trajectory.states[:, 0], float(trajectory.sigmas[0])
        metrics = {"schedule/generator_input_step": float(k), "updated/generator": 0.0}
        skipped = False

        if batch.step % options.ttur == 0:  # ---- generator turn
            sigma = self.dm_sigmas(size, batch.rng)
            noise = standard_normal(x_in.shape, batch.rng).to(x_in)
            critic_sample = torch.empty_like(x_in)
            for part in parts:
                share, part_cond = (part.stop - part.start) / size, cond.index(part)
                x = generator.predict(x_in[part], sigma_in, part_cond).x0  # the only call WITH grad
                loss, direction = distribution_matching_loss(x, part_cond, sigma[part], noise[part], self.real_x0,
                                                             critic, options.normalise, options.normaliser_eps)
                terms = {"loss/dmd": float(loss.detach()), "dmd/direction_abs_mean": float(direction.abs().mean())}
                if self.gan is not None:
                    adversarial, gan_metrics = self.gan.generator_term(x, part_cond, batch.rng,
                                                                       options.gan_generator_weight)
                    loss = loss + adversarial
                    terms.update(gan_metrics)
                terms["loss/generator"] = float(loss.detach())
                backward(loss * share, self.optimizers["generator"])
                critic_sample[part] = x.detach()
                for key, value in terms.items():
                    metrics[key] = metrics.get(key, 0.0) + share * value
            metrics["grad_norm/generator"], applied = self.optimizers["generator"].step()
            metrics["updated/generator"] = float(applied)
            skipped = not applied
        else:
            critic_sample = trajectory.x0_preds[:, k]  # the rollout's x̂0 at (x_k, σ_k), computed without grad

        # ---- critic turn, every iteration [+ the GAN head, trained with it]
        critic_metrics, applied = critic_turn(
            self.optimizers["critic"], critic, critic_sample, cond, self.critic_sigmas(size, batch.rng),
            standard_normal(critic_sample.shape, batch.rng).to(critic_sample), parts,
            extra=self.gan.critic_term(batch.rng, options.gan_critic_weight) if self.gan is not None else None,
            extra_optimizers=(self.optimizers["discriminator"],) if self.gan is not None else ())
        metrics.update(critic_metrics)
        return StepResult(metrics, skipped=skipped or not applied)
