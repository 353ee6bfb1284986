"""Flow-matching transformers (SD3 / SD3.5): velocity prediction, already in the canonical σ convention."""

from __future__ import annotations

import torch
from torch import nn

from rlfew.errors import UsageError
from rlfew.models.base import Conditioning, FamilyAdapter, Prediction, _work_dtype


class FlowAdapter(FamilyAdapter):
    """SD3-family pipelines: `transformer(x, timestep=1000·σ, text embeds, pooled) -> v`."""

    family = "flow"

    def __init__(self, pipeline, device="cpu"):
        super().__init__(pipeline, device)
        self.num_train_timesteps = int(pipeline.scheduler.config.num_train_timesteps)
        self.default_shift = float(pipeline.scheduler.config.get("shift", 1.0))

    def _encode(self, prompts: list[str]) -> Conditioning:
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts, prompt_2=prompts, prompt_3=prompts, device=self.device,
            num_images_per_prompt=1, do_classifier_free_guidance=False,
        )
        return Conditioning(embeds=embeds, pooled=pooled)

    def _forward(self, net: nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> Prediction:
        dtype = net.dtype
        velocity = net(
            hidden_states=x.to(dtype),
            timestep=(sigma * self.num_train_timesteps).to(dtype),
            encoder_hidden_states=cond.embeds.to(dtype),
            pooled_projections=cond.pooled.to(dtype),
            return_dict=False,
        )[0]
        work = _work_dtype(x)
        return Prediction.from_velocity(x.to(work), sigma.to(work), velocity.to(work))

    def native_target(self, x0, noise, sigma):
        return noise - x0

    @property
    def sigma_max(self) -> float:
        return 1.0

    def sigma_grid(self, steps: int, shift: float | None = None) -> torch.Tensor:
        """u_k = 1 − k/K (k < K) warped by the scheduler's shift, σ(u) = s·u / (1 + (s − 1)·u), then 0.

        Passing the unwarped u_k as `sigmas=` to the diffusers pipeline reproduces this grid exactly.
        """
        if steps < 1:
            raise UsageError(f"steps must be >= 1, got {steps}")
        shift = self.default_shift if shift is None else float(shift)
        u = self.unshifted_grid(steps)
        sigmas = shift * u / (1 + (shift - 1) * u)
        return torch.cat([sigmas, torch.zeros(1, dtype=sigmas.dtype)])

    @staticmethod
    def unshifted_grid(steps: int) -> torch.Tensor:
        return 1 - torch.arange(steps, dtype=torch.float64) / steps

    def prior_sample(self, noise: torch.Tensor) -> torch.Tensor:
        return noise
