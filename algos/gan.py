"""DMD2's optional GAN head (ALGORITHMS.md §1.4): a small conv discriminator on the critic's bottleneck features,
trained together with the critic against real images; the only part of DMD2 that needs data.

    x̃ = add_noise(x, ε, σ), σ ~ U(gan_sigma_range) for real and fake latents alike ("diffusion GAN")
    D(x̃) = head(critic bottleneck features of x̃), one logit per feature-map patch
    generator turn:  L_G += λ_G · softplus(−D(x̃_fake))                    (gradient through the critic's features)
    critic turn:     L_F += λ_D · [softplus(D(x̃_fake)) + softplus(−D(x̃_real))]   (head: the "discriminator")

The critic forward stops at its bottleneck (DMD2's classify mode): a forward hook raises once the block has run.
Real images are conditioned on their own captions and fake ones on the batch's prompts; a source without captions
(an uncaptioned image folder) puts both through the empty prompt, so the head cannot tell them apart by text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rlfew.algos.distribution_matching import check_fraction_ranges, standard_normal, uniform_sigma_sampler
from rlfew.errors import ConfigError, UsageError
from rlfew.models import Conditioning, Role
from rlfew.real_images import load_real_images


@dataclass
class GANOptions:
    gan_generator_weight: float = 0.0  # λ_G; 0 turns the GAN head off (DMD2: 1e-3 SD1.5, 5e-3 SDXL)
    gan_critic_weight: float = 1e-2  # λ_D (DMD2: 1e-2)
    gan_real_images: str = "world:train"  # world:train renders, or a folder of images (captions from <stem>.txt)
    gan_sigma_range: list[float] = field(default_factory=lambda: [0.0, 1.0])  # noise fractions, real and fake
    gan_head_downsamples: int = 2  # strided convs in the head (DMD2: 2 for SD1.5, 4 for SDXL)

    def check_gan_options(self) -> None:
        for name in ("gan_generator_weight", "gan_critic_weight"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"algo.options.{name}: must be >= 0, got {getattr(self, name)}")
        if self.gan_head_downsamples < 0:
            raise ConfigError(f"algo.options.gan_head_downsamples: must be >= 0, got {self.gan_head_downsamples}")
        check_fraction_ranges(self, "gan_sigma_range")


def check_real_images(cfg, options: GANOptions) -> None:
    """With the GAN head on, the real-image source must load (checked once, before the run starts); a folder
    path becomes absolute so that workers with another working directory find it."""
    if options.gan_generator_weight <= 0:
        return
    try:
        load_real_images(options.gan_real_images)
    except UsageError as err:
        raise ConfigError(f"algo.options.gan_real_images: {err}") from err
    if not options.gan_real_images.startswith("world:"):
        cfg.algo.options["gan_real_images"] = str(Path(options.gan_real_images).resolve())


def generator_adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss, mean softplus(−D(fake))."""
    return F.softplus(-fake_logits).mean()


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Logistic discriminator loss, mean softplus(D(fake)) + mean softplus(−D(real))."""
    return F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()


class _BottleneckReached(Exception):
    def __init__(self, output):
        self.output = output


def bottleneck_features(role: Role, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """`role`'s bottleneck feature map (B, C, h, w) at (x, σ), without running the layers after it."""
    def stop(module, args, output):
        raise _BottleneckReached(output)

    handle = role.adapter.bottleneck(role.net).register_forward_hook(stop)
    try:
        role.predict(x, sigma, cond)
    except _BottleneckReached as reached:
        return role.adapter.bottleneck_map(reached.output, x).float()
    finally:
        handle.remove()
    raise RuntimeError(f"the {role.name} network never ran its bottleneck block")


def _groups(channels: int) -> int:
    """GroupNorm groups: up to 32 (DMD2), with at least 4 channels each, so that a 1x1 map still normalises over
    several values instead of to a constant."""
    return max((g for g in (32, 16, 8, 4, 2) if channels % g == 0 and channels // g >= 4), default=1)


class DiscriminatorHead(nn.Module):
    """Strided 4x4 convs with GroupNorm + SiLU (DMD2: 2 for SD1.5, 4 for SDXL), then a 1x1 conv to one logit per
    patch; the number of downsamplings is capped so that at least a 1x1 map remains."""

    def __init__(self, channels: int, spatial: int, max_downsamples: int = 2):
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(min(max_downsamples, int(math.log2(max(1, spatial))))):
            layers += [nn.Conv2d(channels, channels, 4, stride=2, padding=1),
                       nn.GroupNorm(_groups(channels), channels), nn.SiLU()]
        layers.append(nn.Conv2d(channels, 1, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


class GANHead:
    """The discriminator, its real-image source and its two loss terms for one method's critic. Its noise levels,
    noise and real images are drawn per call, i.e. per micro-batch: train.micro_batch_size changes those draws
    (not their distribution), unlike the DM and critic terms, which draw for the whole shard first."""

    def __init__(self, critic: Role, options: GANOptions, latent_shape: tuple[int, int, int]):
        self.critic, self.adapter = critic, critic.adapter
        self.real_images = load_real_images(options.gan_real_images)
        self.resolution = latent_shape[-1] * self.adapter.vae_scale_factor
        self.sigmas = uniform_sigma_sampler(self.adapter, *options.gan_sigma_range, resolution=self.resolution)
        with torch.no_grad():  # one probe call sizes the head for this network and resolution
            probe = torch.zeros(1, *latent_shape, device=self.adapter.device)
            features = bottleneck_features(critic, probe, torch.full((1,), 0.5), self.adapter.unconditional(1))
        self.head = DiscriminatorHead(features.shape[1], min(features.shape[-2:]),
                                      options.gan_head_downsamples).to(self.adapter.device)

    def logits(self, latents: torch.Tensor, cond: Conditioning, rng: torch.Generator) -> torch.Tensor:
        """D at freshly noised `latents` (gradients flow into `latents` when they carry any)."""
        sigma = self.sigmas(latents.shape[0], rng)
        noise = standard_normal(latents.shape, rng).to(device=latents.device, dtype=latents.dtype)
        noisy = self.adapter.add_noise(latents, noise, sigma)
        return self.head(bottleneck_features(self.critic, noisy, sigma, cond))

    def generator_loss(self, fake: torch.Tensor, cond: Conditioning, rng: torch.Generator) -> torch.Tensor:
        return generator_adversarial_loss(self.logits(fake, self._fake_cond(cond), rng))

    def generator_term(self, fake: torch.Tensor, cond: Conditioning, rng: torch.Generator,
                       weight: float) -> tuple[torch.Tensor, dict[str, float]]:
        """λ_G·GAN_G(x) for the generator turn, and its metric."""
        adversarial = self.generator_loss(fake, cond, rng)
        return weight * adversarial, {"loss/gan_generator": float(adversarial.detach())}

    def critic_loss(self, fake: torch.Tensor, cond: Conditioning, rng: torch.Generator
                    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The discriminator loss on detached `fake` and as many real images, drawn with `rng` (a learner's own
        stream, so several learners see different real images)."""
        images, captions = self.real_images.sample(fake.shape[0], self.resolution, rng)
        real = self.adapter.encode_images(images.to(self.adapter.device), generator=rng).to(fake.dtype)
        real_cond = (self.adapter.encode_prompts(captions, cache=False) if captions is not None
                     else self._fake_cond(cond))
        both = Conditioning.cat([self._fake_cond(cond), real_cond.to(device=fake.device)])
        fake_logits, real_logits = self.logits(torch.cat([fake.detach(), real]), both, rng).chunk(2)  # one call
        metrics = {"gan/real_logit": float(real_logits.detach().mean()),
                   "gan/fake_logit": float(fake_logits.detach().mean())}
        return discriminator_loss(real_logits, fake_logits), metrics

    def critic_term(self, rng: torch.Generator, weight: float):
        """λ_D·GAN_D as an extra loss of the critic turn (`critic_turn(extra=...)`)."""
        def term(fake: torch.Tensor, cond: Conditioning) -> tuple[torch.Tensor, dict[str, float]]:
            adversarial, metrics = self.critic_loss(fake, cond, rng)
            return weight * adversarial, {**metrics, "loss/gan_critic": float(adversarial.detach())}
        return term

    def _fake_cond(self, cond: Conditioning) -> Conditioning:
        return cond if self.real_images.captioned else self.adapter.unconditional(len(cond))
