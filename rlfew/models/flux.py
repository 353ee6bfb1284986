"""FLUX (FluxPipeline / FluxTransformer2DModel): velocity-predicting flow matching on packed 2×2 latent patches.

The canonical state stays the unpacked VAE latent (B, C, H, W), so samplers, `latent_shape`, `add_noise` and
`decode` are the generic ones; only `_forward` packs to FLUX's (B, H/2·W/2, 4C) tokens and back, with the
pipeline's own `_pack_latents` / `_unpack_latents` / `_prepare_latent_image_ids`.
"""

from __future__ import annotations

import torch
from torch import nn

from rlfew.errors import UsageError
from rlfew.models.base import Conditioning, Prediction, _work_dtype, tokens_to_map
from rlfew.models.flow import FlowAdapter


class FluxAdapter(FlowAdapter):
    """`transformer(packed x, timestep=σ, [guidance], pooled, T5 embeds, txt_ids, img_ids) -> packed v`.

    `embedded_guidance` is FluxPipeline's `guidance_scale`: the distilled-guidance input of guidance-embedded
    models (FLUX.1-dev), ignored by schnell-like ones. rlfew's `guidance` argument is true CFG against the empty
    prompt (FluxPipeline's `true_cfg_scale` with `negative_prompt=""`).
    """

    family = "flux"

    def __init__(self, pipeline, device="cpu", embedded_guidance: float = 3.5, max_sequence_length: int = 512):
        super().__init__(pipeline, device)
        self.collapse_zero_tokens = False  # FLUX always has its T5 encoder
        self.embedded_guidance = float(embedded_guidance)
        self.max_sequence_length = int(max_sequence_length)

    def prepare_network(self, net: nn.Module) -> nn.Module:
        return net

    def _encode(self, prompts: list[str]) -> Conditioning:
        # text_ids come back as (seq, 3) zeros without a batch dimension: not per-sample, rebuilt in _forward.
        embeds, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts, prompt_2=prompts, device=self.device, num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length)
        return Conditioning(embeds=embeds, pooled=pooled)

    def bottleneck(self, net: nn.Module) -> nn.Module:
        """The middle double-stream block (its image tokens are the packed 2x2 latent patches)."""
        return net.transformer_blocks[(len(net.transformer_blocks) - 1) // 2]

    def bottleneck_map(self, output, x: torch.Tensor) -> torch.Tensor:
        return tokens_to_map(output[1], x.shape[-2] // 2, x.shape[-1] // 2)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        return self.pipeline._pack_latents(x, batch, channels, height, width)

    def unpack(self, packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Packed tokens -> (B, C, height, width) latents (height/width in latent pixels)."""
        return self.pipeline._unpack_latents(packed, height * self.vae_scale_factor, width * self.vae_scale_factor,
                                             self.vae_scale_factor)

    def _forward(self, net: nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> Prediction:
        dtype = net.dtype
        batch, _, height, width = x.shape
        if height % 2 or width % 2:
            raise UsageError(f"FLUX latents need even height and width, got {height}x{width}")
        img_ids = self.pipeline._prepare_latent_image_ids(batch, height // 2, width // 2, x.device, dtype)
        txt_ids = torch.zeros(cond.embeds.shape[1], 3, device=x.device, dtype=dtype)
        guidance = None
        if getattr(getattr(net, "config", None), "guidance_embeds", False):
            guidance = torch.full((batch,), self.embedded_guidance, device=x.device, dtype=torch.float32)
        packed = net(
            hidden_states=self.pack(x.to(dtype)),
            timestep=sigma.to(dtype),
            guidance=guidance,
            pooled_projections=cond.pooled.to(dtype),
            encoder_hidden_states=cond.embeds.to(dtype),
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        velocity = self.unpack(packed, height, width)
        work = _work_dtype(x)
        return Prediction.from_velocity(x.to(work), sigma.to(work), velocity.to(work))

    def image_seq_len(self, resolution: int | None = None) -> int:
        _, height, width = self.latent_shape(resolution or self.default_resolution)
        return (height // 2) * (width // 2)

    def warp(self, u: torch.Tensor, shift: float | None = None, resolution: int | None = None) -> torch.Tensor:
        """As FluxPipeline places its timesteps: with dynamic shifting, σ = time_shift(μ, 1, u) with
        μ = calculate_shift(image tokens at `resolution`); a given `shift` uses the static s·u / (1 + (s − 1)·u).

        Passing the unwarped u_k as `sigmas=` to FluxPipeline (at that resolution) reproduces `sigma_grid`."""
        config = self.pipeline.scheduler.config
        if shift is not None or not config.get("use_dynamic_shifting", False):
            return super().warp(u, shift, resolution)
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        mu = calculate_shift(self.image_seq_len(resolution), config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))
        return self.pipeline.scheduler.time_shift(mu, 1.0, u)
