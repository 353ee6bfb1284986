"""VP UNets (SD1.5, SD2.1 / SD-Turbo, SDXL / SDXL-Turbo, DMD2 checkpoints): ε- or v-prediction.

Mapped onto the canonical σ exactly: a VP state x_t = α_t·x0 + σ_t·ε equals (α_t + σ_t)·x_flow with
σ_flow = σ_t / (α_t + σ_t). Given σ_flow, the VP pair follows in closed form (α² + σ² = 1); only the network's
timestep input needs the discrete ᾱ table (interpolated, so any σ between the table's ends is valid).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from rlfew.errors import UsageError
from rlfew.models.base import Conditioning, FamilyAdapter, Prediction, _expand_like, _work_dtype


class VPAdapter(FamilyAdapter):
    family = "vp"

    def __init__(self, pipeline, device="cpu"):
        super().__init__(pipeline, device)
        scheduler_config = pipeline.scheduler.config
        self.prediction_type = scheduler_config.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise UsageError(f"unsupported prediction_type {self.prediction_type!r}; allowed: epsilon, v_prediction")
        alphas_cumprod = pipeline.scheduler.alphas_cumprod.double()
        self.num_train_timesteps = len(alphas_cumprod)
        alpha, sigma = alphas_cumprod.sqrt(), (1 - alphas_cumprod).sqrt()
        self._flow_sigma_table = (sigma / (alpha + sigma)).numpy()
        self.is_sdxl = getattr(pipeline, "text_encoder_2", None) is not None

    # ---- σ_flow <-> VP -------------------------------------------------------------------------------
    @staticmethod
    def vp_coefficients(sigma_flow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(α_t, σ_t) of the VP process at a canonical σ."""
        sigma_flow = sigma_flow.double()
        ratio = sigma_flow / (1 - sigma_flow).clamp_min(1e-12)
        alpha = torch.rsqrt(1 + ratio**2)
        return alpha, ratio * alpha

    def timestep(self, sigma_flow: torch.Tensor) -> torch.Tensor:
        """Continuous network timestep t ∈ [0, T−1] whose VP noise level matches σ_flow."""
        sigma_flow = torch.as_tensor(sigma_flow)
        t = np.interp(sigma_flow.detach().double().cpu().numpy().reshape(-1), self._flow_sigma_table,
                      np.arange(self.num_train_timesteps, dtype=np.float64))
        return torch.from_numpy(t).reshape(sigma_flow.shape).to(sigma_flow.device)

    # ---- protocol ------------------------------------------------------------------------------------
    def bottleneck(self, net: nn.Module) -> nn.Module:
        return net.mid_block

    def bottleneck_map(self, output, x: torch.Tensor) -> torch.Tensor:
        return output

    def _encode(self, prompts: list[str]) -> Conditioning:
        if self.is_sdxl:
            embeds, _, pooled, _ = self.pipeline.encode_prompt(
                prompt=prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False)
            size = self.default_resolution
            # (original size, crop top-left, target size) as SDXL's pipeline builds them for an uncropped image.
            time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=embeds.dtype, device=embeds.device)
            return Conditioning(embeds=embeds, pooled=pooled, extra={"time_ids": time_ids.expand(len(prompts), -1)})
        embeds, _ = self.pipeline.encode_prompt(prompts, self.device, 1, False)
        return Conditioning(embeds=embeds)

    def _forward(self, net: nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> Prediction:
        work = _work_dtype(x)
        x = x.to(work)
        alpha, sigma_vp = (_expand_like(c.to(work), x) for c in self.vp_coefficients(sigma))
        x_vp = x * (alpha + sigma_vp)
        kwargs = {}
        if self.is_sdxl:
            kwargs["added_cond_kwargs"] = {"text_embeds": cond.pooled.to(net.dtype),
                                           "time_ids": cond.extra["time_ids"].to(net.dtype)}
        output = net(x_vp.to(net.dtype), self.timestep(sigma).to(net.dtype),
                     encoder_hidden_states=cond.embeds.to(net.dtype), return_dict=False, **kwargs)[0].to(work)
        if self.prediction_type == "epsilon":
            eps = output
            x0 = (x_vp - sigma_vp * eps) / alpha
        else:
            x0 = alpha * x_vp - sigma_vp * output
            eps = sigma_vp * x_vp + alpha * output
        return Prediction(x0=x0, eps=eps, native=output)

    def native_target(self, x0, noise, sigma):
        if self.prediction_type == "epsilon":
            return noise
        alpha, sigma_vp = (_expand_like(c.float(), x0) for c in self.vp_coefficients(torch.as_tensor(sigma)))
        return alpha * noise - sigma_vp * x0

    @property
    def sigma_max(self) -> float:
        return float(self._flow_sigma_table[-1])

    def sigma_grid(self, steps: int, shift: float | None = None, resolution: int | None = None) -> torch.Tensor:
        """Trailing timesteps, as diffusers' schedulers space them (K=4: 999, 749, 499, 249; DMD2's grid), then 0."""
        if steps < 1:
            raise UsageError(f"steps must be >= 1, got {steps}")
        if shift is not None:
            raise UsageError("shift applies to flow-matching models only; leave it unset for VP UNets")
        timesteps = self.trailing_timesteps(steps, self.num_train_timesteps)
        sigmas = torch.from_numpy(self._flow_sigma_table[timesteps])
        return torch.cat([sigmas, torch.zeros(1, dtype=sigmas.dtype)])

    @staticmethod
    def trailing_timesteps(steps: int, num_train_timesteps: int = 1000) -> np.ndarray:
        return (np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / steps)) - 1).astype(np.int64)

    def prior_sample(self, noise: torch.Tensor) -> torch.Tensor:
        """x_T = σ_T·ε, as diffusers' Euler schedulers start with trailing / linspace spacing (SD-Turbo's); in
        canonical scale that is σ_flow,max·ε, the forward process at σ_max without the (tiny) α_T·x0 term."""
        return noise * self.sigma_max
