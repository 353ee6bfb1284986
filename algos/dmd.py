"""DMD2 (Yin et al., NeurIPS'24): distribution matching distillation with a two-time-scale critic and backward
simulation; ALGORITHMS.md §1, one iteration as in §1.7.

Per iteration (N = ttur):
    k, x_k, σ_k = backward simulation on the CPS(η=1) rollout            # no_grad (the rollout)
    if step % N == 0:                                                     # generator turn
        x = G(x_k, σ_k)                                                   # the only call WITH grad
        σ ~ U[0.02, 0.98]; x_σ = add_noise(sg(x), ε, σ)                   # no_grad ...
        g = (F(x_σ) − T_cfg(x_σ; w_real)) / mean|x − T_cfg(x_σ)|          # ... to here
        step G on ½·mse(x, sg(x − g)) [+ λ_G·GAN_G(x)]
    else:
        x = the rollout's x̂0 at step k                                   # already computed without grad
    step F on its denoising loss at σ' ~ U[0, 1] on sg(x) [+ λ_D·GAN_D(sg(x), x_real)]   # every iteration

Deviations from DMD2 (each says why):
  * The GAN head (algos/gan.py, off unless gan_generator_weight > 0) reads the critic's bottleneck on its own
    forward, stopped there, rather than sharing one UNet call with classification as DMD2's classify mode does.
  * Noise levels are continuous fractions of the training-time axis (algos/common.py), not integer t.
  * The critic may be a LoRA on the teacher (DMDR-style, cfg.critic.lora_rank > 0) as well as a full copy.
  * backward_simulation=False trains the first step only (k = 0, the prior sample at σ_max): DMD2 would instead
    noise real or ODE images, which rlfew's Batch does not carry.
  * A non-finite direction is zeroed instead of becoming the largest float (see `dmd_direction`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from rlfew.algos.common import (backward_simulation_input, check_fraction_ranges, critic_denoising_loss,
                                dmd_direction, dmd_loss,
                                standard_normal, uniform_sigma_sampler)
from rlfew.config import TrainConfig
from rlfew.algos.gan import GANHead, GANOptions, check_real_images
from rlfew.errors import ConfigError, UsageError
from rlfew.method import Batch, all_ranks_finite, average_gradients, Method, register_method
from rlfew.models import ModelRoles
from rlfew.sampling import CPS, Sampler


@dataclass
class DMDOptions(GANOptions):
    ttur: int = 5  # critic updates per generator update (DMD2: 10 for SD1.5, 5 for SDXL)
    real_guidance: float | None = None  # CFG scale of the real score; None: teacher.guidance
    dm_sigma_range: list[float] = field(default_factory=lambda: [0.02, 0.98])  # fractions, see algos/common.py
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
    def role_spec(cls, cfg: TrainConfig, options: DMDOptions) -> dict:
        return {"critic": "full" if cfg.critic.lora_rank == 0 else "lora", "critic_lora_rank": cfg.critic.lora_rank,
                "critic_lora_alpha": cfg.critic.lora_alpha}

    def __init__(self, roles: ModelRoles, options: DMDOptions, cfg: TrainConfig, reward=None):
        super().__init__(roles, options, cfg, reward)
        train = cfg.train
        self.real_guidance = cfg.teacher.guidance if options.real_guidance is None else options.real_guidance
        self.generator_params = roles.generator.trainable_parameters()
        self.gan = None
        if options.gan_generator_weight > 0:
            resolution = cfg.model.resolution or roles.adapter.default_resolution
            self.gan = GANHead(roles.critic, options, roles.adapter.latent_shape(resolution))
        critic_groups = [{"params": roles.critic.trainable_parameters()}]
        if self.gan is not None:  # its own group, so a checkpoint from before the head can be resumed with it
            critic_groups.append({"params": self.gan.parameters()})
        self.critic_params = [p for group in critic_groups for p in group["params"]]
        self.generator_optimizer = torch.optim.AdamW(self.generator_params, lr=train.lr, betas=(0.9, 0.999),
                                                     weight_decay=train.weight_decay)
        self.critic_optimizer = torch.optim.AdamW(critic_groups, lr=train.critic_lr, betas=(0.9, 0.999),
                                                  weight_decay=train.weight_decay)
        self.dm_sigmas = uniform_sigma_sampler(roles.adapter, *options.dm_sigma_range)
        self.critic_sigmas = uniform_sigma_sampler(roles.adapter, *options.critic_sigma_range)
        self.updates = {"generator": 0, "critic": 0}  # optimiser steps taken (warmup counts these)

    @classmethod
    def check_inputs(cls, cfg: TrainConfig, options: DMDOptions) -> None:
        check_real_images(cfg, options)

    @classmethod
    def rollout_sampler(cls, cfg: TrainConfig, options: DMDOptions) -> Sampler:
        return CPS(eta=1.0)  # DMD2's sampler: x̂0 re-noised with fresh noise; backward simulation reads it

    # ------------------------------------------------------------------------------------ one iteration
    def train_step(self, batch: Batch) -> dict[str, float]:
        roles, rng, cond, trajectory = self.roles, batch.rng, batch.cond, batch.trajectory
        if self.options.backward_simulation:
            k, x_in, sigma_in = backward_simulation_input(trajectory, rng)
        else:
            k, x_in, sigma_in = 0, trajectory.states[:, 0], float(trajectory.sigmas[0])
        metrics = {"generator_input_step": float(k), "generator_step": 0.0}

        if batch.step % self.options.ttur == 0:  # ---- generator turn
            x = roles.generator.predict(x_in, sigma_in, cond).x0  # the only call WITH grad
            with torch.no_grad():
                sigma = self.dm_sigmas(x.shape[0], rng)
                noise = standard_normal(x.shape, rng).to(device=x.device, dtype=x.dtype)
                x_noisy = roles.adapter.add_noise(x.detach(), noise, sigma)
                x0_real = roles.teacher.predict(x_noisy, sigma, cond, guidance=self.real_guidance).x0
                x0_fake = roles.critic.predict(x_noisy, sigma, cond).x0
                direction = dmd_direction(x, x0_real, x0_fake, self.options.normalise, self.options.normaliser_eps)
            generator_loss = dmd_loss(x, direction)
            metrics["dmd_loss"] = float(generator_loss.detach())
            metrics["dmd_direction_abs_mean"] = float(direction.abs().mean())
            if self.gan is not None:
                generator_loss = self._add_gan_generator_term(generator_loss, x, cond, rng, metrics)
            metrics["generator_loss"] = float(generator_loss.detach())
            if not all_ranks_finite(metrics["generator_loss"]):
                self._zero_grads()
                return metrics  # no optimiser steps; the trainer counts non-finite losses and aborts after N
            metrics["generator_grad_norm"] = self._update(generator_loss, "generator")
            metrics["generator_step"] = float(math.isfinite(metrics["generator_grad_norm"]))
            critic_sample = x.detach()
        else:
            critic_sample = trajectory.x0_preds[:, k]  # the rollout's x̂0 at (x_k, σ_k), computed without grad

        # ---- critic turn, every iteration
        critic_loss = critic_denoising_loss(roles.critic, critic_sample, cond, self.critic_sigmas, rng)
        critic_loss = self._add_gan_critic_term(critic_loss, critic_sample, cond, rng, metrics)
        metrics["critic_loss"] = float(critic_loss.detach())
        if all_ranks_finite(metrics["critic_loss"]):
            metrics["critic_grad_norm"] = self._update(critic_loss, "critic")
        return metrics

    def _add_gan_generator_term(self, loss: torch.Tensor, x: torch.Tensor, cond, rng,
                                metrics: dict[str, float]) -> torch.Tensor:
        adversarial = self.gan.generator_loss(x, cond, rng)
        metrics["gan_generator_loss"] = float(adversarial.detach())
        return loss + self.options.gan_generator_weight * adversarial

    def _add_gan_critic_term(self, loss: torch.Tensor, fake: torch.Tensor, cond, rng,
                             metrics: dict[str, float]) -> torch.Tensor:
        """The critic loss plus λ_D·GAN_D (logging its parts into `metrics`); unchanged without a GAN head."""
        if self.gan is None:
            return loss
        metrics["critic_denoising_loss"] = float(loss.detach())
        adversarial, gan_metrics = self.gan.critic_loss(fake, cond, rng)
        metrics.update(gan_metrics, gan_critic_loss=float(adversarial.detach()))
        return loss + self.options.gan_critic_weight * adversarial

    def _update(self, loss: torch.Tensor, role: str) -> float:
        """Backward, clip and step one role (skipping the step when the gradient is not finite), then zero *both*
        roles' grads as DMD2 does after each phase. Returns the pre-clip gradient norm."""
        optimizer = self.generator_optimizer if role == "generator" else self.critic_optimizer
        params = self.generator_params if role == "generator" else self.critic_params
        base_lr = self.cfg.train.lr if role == "generator" else self.cfg.train.critic_lr
        loss.backward(inputs=params)  # not into the other role (the GAN term runs through the critic)
        average_gradients(params)
        if role == "critic":
            assert all(p.grad is None for p in self.generator_params), "the critic loss wrote generator gradients"
        clip = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        if math.isfinite(grad_norm):
            warmup, done = self.cfg.train.warmup_steps, self.updates[role]
            for group in optimizer.param_groups:  # linear warmup over this role's own optimiser steps
                group["lr"] = base_lr * min(1.0, (done + 1) / warmup) if warmup > 0 else base_lr
            optimizer.step()
            self.updates[role] += 1
        self._zero_grads()
        return grad_norm

    def _zero_grads(self) -> None:
        self.generator_optimizer.zero_grad(set_to_none=True)
        self.critic_optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """Role weights, optimiser states and update counters. Tensors are references (as torch's state_dict);
        a checkpoint writes them out at once."""
        tensors = {"generator": self.roles.generator.trainable_state_dict(),
                   "critic": self.roles.critic.trainable_state_dict()}
        if self.gan is not None:
            tensors["gan_head"] = {k: v.detach() for k, v in self.gan.head.state_dict().items()}
        return {
            "tensors": tensors,
            "state": {"generator_optimizer": self.generator_optimizer.state_dict(),
                      "critic_optimizer": self.critic_optimizer.state_dict(),
                      "updates": dict(self.updates)},
        }

    def load_state_dict(self, state: dict) -> None:
        self.roles.generator.load_trainable_state_dict(state["tensors"]["generator"])
        self.roles.critic.load_trainable_state_dict(state["tensors"]["critic"])
        critic_optimizer = state["state"]["critic_optimizer"]
        if "gan_head" in state["tensors"] and self.gan is None:
            raise UsageError("the checkpoint has a GAN head (algo.options.gan_generator_weight > 0); resume it with "
                             "the head on")
        if self.gan is not None and "gan_head" in state["tensors"]:
            self.gan.head.load_state_dict(state["tensors"]["gan_head"])
        elif self.gan is not None:  # DMD2's SD1.5 protocol: distil without the head, then resume with a fresh one
            head_group = self.critic_optimizer.state_dict()["param_groups"][1]
            critic_optimizer = {**critic_optimizer, "param_groups": [*critic_optimizer["param_groups"], head_group]}
        self.generator_optimizer.load_state_dict(state["state"]["generator_optimizer"])
        self.critic_optimizer.load_state_dict(critic_optimizer)
        self.updates = {role: int(count) for role, count in state["state"]["updates"].items()}
