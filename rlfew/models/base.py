"""The family-adapter protocol: everything a method needs from a diffusion model, in one convention.

Canonical convention (ALGORITHMS.md §0): σ ∈ [0, 1] with σ = 1 pure noise and

    x_σ = (1 − σ)·x0 + σ·ε,     v = ε − x0,     x̂0 = x_σ − σ·v̂,     ε̂ = x_σ + (1 − σ)·v̂.

Flow-matching models live in this convention already. VP models (x_t = α_t·x0 + σ_t·ε) are mapped onto it
exactly by the rescaling x_flow = x_t / (α_t + σ_t), σ_flow = σ_t / (α_t + σ_t), which keeps ε the same, so
samplers and DMD math are written once for both families.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field, fields

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint


@dataclass
class Prediction:
    """A denoiser output at (x, σ) in every parameterisation; `native` is the raw network output
    (velocity, ε or VP-v), the target space of the critic's denoising loss."""

    x0: torch.Tensor
    eps: torch.Tensor
    native: torch.Tensor

    @property
    def velocity(self) -> torch.Tensor:
        return self.eps - self.x0

    @staticmethod
    def from_velocity(x: torch.Tensor, sigma: torch.Tensor, velocity: torch.Tensor) -> "Prediction":
        sigma = _expand_like(sigma, x)
        return Prediction(x0=x - sigma * velocity, eps=x + (1 - sigma) * velocity, native=velocity)


def _expand_like(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """σ as a scalar or per-sample vector, shaped to broadcast against x (B, ...)."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.ndim == 0:
        return sigma
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    """Parameterisation conversions run in float32 at least (float64 when the sampler state is float64)."""
    return torch.promote_types(x.dtype, torch.float32)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """The forward process in the canonical convention (valid for both families)."""
    sigma = _expand_like(sigma, x0)
    return (1 - sigma) * x0 + sigma * noise


@dataclass
class Conditioning:
    """Text conditioning for a batch: token embeddings, optional pooled embeddings, and per-sample extras
    (e.g. SDXL's `time_ids`). Every tensor has the batch as its first dimension."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def _map(self, fn) -> "Conditioning":
        return Conditioning(
            embeds=fn(self.embeds),
            pooled=None if self.pooled is None else fn(self.pooled),
            extra={key: fn(value) for key, value in self.extra.items()},
        )

    def to(self, device=None, dtype=None) -> "Conditioning":
        return self._map(lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None))

    def index(self, index) -> "Conditioning":
        return self._map(lambda t: t[index])

    @staticmethod
    def cat(items: list["Conditioning"]) -> "Conditioning":
        first = items[0]
        return Conditioning(
            embeds=torch.cat([c.embeds for c in items]),
            pooled=None if first.pooled is None else torch.cat([c.pooled for c in items]),
            extra={key: torch.cat([c.extra[key] for c in items]) for key in first.extra},
        )


class FamilyAdapter(abc.ABC):
    """Shared pipeline parts (text encoders, tokenizers, VAE, scheduler) plus the family's conventions.

    The denoiser network is *not* owned here: roles (generator, teacher, critic, ...) each hold their own
    network and call `predict(net, ...)`, so one adapter serves every role built from one model source.
    """

    family: str = ""

    def __init__(self, pipeline, device: torch.device | str = "cpu"):
        self.pipeline = pipeline
        self.device = torch.device(device)
        self.vae = pipeline.vae
        self._prompt_cache: dict[str, Conditioning] = {}

    # ---- prompts -------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], cache: bool = True) -> Conditioning:
        """Encode prompts, cached per prompt (`cache=False`: kept only for this call, e.g. the captions of a large
        real-image dataset).

        Each new prompt is encoded on its own: a batched text encoder's output depends (at float rounding) on
        what else is in the batch, and a resumed run must see bit-identical conditioning.
        """
        encoded = {p: self._prompt_cache[p] if p in self._prompt_cache else self._encode([p])
                   for p in dict.fromkeys(prompts)}
        if cache:
            self._prompt_cache.update(encoded)
        return Conditioning.cat([encoded[p] for p in prompts])

    def unconditional(self, batch_size: int) -> Conditioning:
        """The empty-prompt conditioning used as the CFG unconditional branch (as the diffusers pipelines do)."""
        return self.encode_prompts([""]).index([0] * batch_size)

    def clear_prompt_cache(self) -> None:
        self._prompt_cache.clear()

    @abc.abstractmethod
    def _encode(self, prompts: list[str]) -> Conditioning:
        """Encode distinct prompts in one batch with the pipeline's own `encode_prompt`."""

    # ---- denoiser ------------------------------------------------------------------------------------
    def prepare_network(self, net: nn.Module) -> nn.Module:
        """Adapt a denoiser to how this adapter calls it (e.g. attention processors); every role's network
        goes through this once."""
        return net

    def predict(self, net: nn.Module, x: torch.Tensor, sigma: torch.Tensor | float, cond: Conditioning,
                guidance: float = 1.0, uncond: Conditioning | None = None) -> Prediction:
        """Denoiser prediction at canonical (x, σ), with classifier-free guidance when guidance != 1.

        CFG is applied to the raw output, x̂_u + w·(x̂_c − x̂_u); every parameterisation is affine in it at
        fixed (x, σ), so this equals CFG in x̂0, ε or v space.
        """
        sigma = torch.as_tensor(sigma, dtype=_work_dtype(x), device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        if guidance == 1.0:
            return self._forward(net, x, sigma, cond)
        if uncond is None:
            uncond = self.unconditional(x.shape[0])
        both = self._forward(net, torch.cat([x, x]), torch.cat([sigma, sigma]), Conditioning.cat([uncond, cond]))
        batch = x.shape[0]
        guided = {f.name: _cfg(getattr(both, f.name), batch, guidance) for f in fields(Prediction)}
        return Prediction(**guided)

    @abc.abstractmethod
    def _forward(self, net: nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> Prediction:
        """One network call at canonical (x, σ) with a per-sample σ vector."""

    @abc.abstractmethod
    def native_target(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Regression target of the denoising (critic) loss in the network's own parameterisation."""

    def denoising_loss(self, prediction: Prediction, x0: torch.Tensor, noise: torch.Tensor,
                       sigma: torch.Tensor) -> torch.Tensor:
        """Per-sample denoising MSE (mean over dims) in the native parameterisation (v for flow, ε for eps UNets)."""
        target = self.native_target(x0, noise, sigma)
        return (prediction.native.float() - target.float()).pow(2).flatten(1).mean(1)

    # ---- schedule ------------------------------------------------------------------------------------
    add_noise = staticmethod(add_noise)

    @property
    @abc.abstractmethod
    def sigma_max(self) -> float:
        """The largest σ the network is trained on (where sampling starts)."""

    @abc.abstractmethod
    def sigma_grid(self, steps: int, shift: float | None = None, resolution: int | None = None) -> torch.Tensor:
        """Few-step grid (steps + 1 values, descending from σ_max, ending at 0) for images of `resolution` pixels
        (None: the model's own); only resolution-dependent schedules (FLUX's dynamic shift) read it."""

    @abc.abstractmethod
    def prior_sample(self, noise: torch.Tensor) -> torch.Tensor:
        """The sampler's starting state at σ_max for standard-normal `noise`."""

    # ---- features for a discriminator ----------------------------------------------------------------
    @abc.abstractmethod
    def bottleneck(self, net: nn.Module) -> nn.Module:
        """The block whose output a GAN head reads (DMD2 reads the UNet's mid block)."""

    @abc.abstractmethod
    def bottleneck_map(self, output, x: torch.Tensor) -> torch.Tensor:
        """`bottleneck(net)`'s output for latents `x` as a (B, C, h, w) feature map."""

    # ---- latents <-> images --------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel along one side."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        factor = self.vae_scale_factor
        return (self.vae.config.latent_channels, resolution // factor, resolution // factor)

    @property
    def default_resolution(self) -> int:
        return int(self.vae.config.sample_size)

    def decode(self, latents: torch.Tensor, checkpointed: bool = False) -> torch.Tensor:
        """Latents -> images in [0, 1], differentiable; `checkpointed` trades compute for activation memory."""
        scaled = latents / self.vae.config.scaling_factor + (self.vae.config.shift_factor or 0.0)
        scaled = scaled.to(self.vae.dtype)
        if checkpointed and torch.is_grad_enabled():
            images = activation_checkpoint(lambda z: self.vae.decode(z).sample, scaled, use_reentrant=False)
        else:
            images = self.vae.decode(scaled).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [0, 1] -> latents (a posterior sample), e.g. real images for a GAN head."""
        posterior = self.vae.encode((images * 2 - 1).to(self.vae.device, self.vae.dtype)).latent_dist
        latents = posterior.sample(generator)
        return (latents - (self.vae.config.shift_factor or 0.0)) * self.vae.config.scaling_factor


def tokens_to_map(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Row-major image tokens (B, height·width, D), as patch embeddings and FLUX packing lay them out, as a
    (B, D, height, width) map."""
    batch, count, dim = tokens.shape
    if count != height * width:
        raise ValueError(f"{count} image tokens do not form a {height}x{width} grid")
    return tokens.transpose(1, 2).reshape(batch, dim, height, width)


def _cfg(output: torch.Tensor, batch: int, guidance: float) -> torch.Tensor:
    uncond, cond = output[:batch], output[batch:]
    return uncond + guidance * (cond - uncond)


