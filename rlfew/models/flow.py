"""Flow-matching transformers (SD3 / SD3.5): velocity prediction, already in the canonical σ convention."""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from diffusers import StableDiffusion3Pipeline
from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0
from torch import nn

from rlfew.errors import UsageError
from rlfew.models.base import Conditioning, FamilyAdapter, Prediction, _work_dtype, tokens_to_map


class CollapsedZeroTokensAttnProcessor(JointAttnProcessor2_0):
    """`JointAttnProcessor2_0` for a context whose last token stands for `copies` identical tokens.

    Without T5, SD3 pipelines pad the text context with `max_sequence_length` (256) zero rows. Identical keys
    and values contribute `copies·exp(q·k)·v`, i.e. one key with its logit raised by log(copies), and identical
    queries give identical outputs, so one token with that bias computes exactly what the padded context does.
    """

    def __init__(self, copies: int):
        super().__init__()
        self.log_copies = math.log(copies)

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, *args,
                 **kwargs):
        batch, image_tokens = hidden_states.shape[:2]

        def heads(tensor, norm):
            tensor = tensor.view(batch, -1, attn.heads, tensor.shape[-1] // attn.heads).transpose(1, 2)
            return norm(tensor) if norm is not None else tensor

        query = torch.cat([heads(attn.to_q(hidden_states), attn.norm_q),
                           heads(attn.add_q_proj(encoder_hidden_states), attn.norm_added_q)], dim=2)
        key = torch.cat([heads(attn.to_k(hidden_states), attn.norm_k),
                         heads(attn.add_k_proj(encoder_hidden_states), attn.norm_added_k)], dim=2)
        value = torch.cat([heads(attn.to_v(hidden_states), None),
                           heads(attn.add_v_proj(encoder_hidden_states), None)], dim=2)
        bias = torch.zeros(key.shape[2], dtype=query.dtype, device=query.device)
        bias[-1] = self.log_copies
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias.view(1, 1, 1, -1))
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * query.shape[-1]).to(query.dtype)
        out, context = out[:, :image_tokens], out[:, image_tokens:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        return attn.to_out[1](attn.to_out[0](out)), context


# What `StableDiffusion3Pipeline.encode_prompt` pads the context with when T5 is absent.
SD3_ZERO_TEXT_TOKENS = inspect.signature(StableDiffusion3Pipeline.encode_prompt).parameters["max_sequence_length"].default


class FlowAdapter(FamilyAdapter):
    """SD3-family pipelines: `transformer(x, timestep=1000·σ, text embeds, pooled) -> v`."""

    family = "flow"

    def __init__(self, pipeline, device="cpu"):
        super().__init__(pipeline, device)
        self.num_train_timesteps = int(pipeline.scheduler.config.num_train_timesteps)
        self.default_shift = float(pipeline.scheduler.config.get("shift", 1.0))
        # Without T5 the zero padding is collapsed into one token (exact; 5-20x fewer tokens for small models).
        self.collapse_zero_tokens = getattr(pipeline, "text_encoder_3", None) is None

    def prepare_network(self, net: nn.Module) -> nn.Module:
        if self.collapse_zero_tokens:
            net.set_attn_processor(CollapsedZeroTokensAttnProcessor(SD3_ZERO_TEXT_TOKENS))
        return net

    def bottleneck(self, net: nn.Module) -> nn.Module:
        """The middle joint-attention block."""
        return net.transformer_blocks[(len(net.transformer_blocks) - 1) // 2]

    def bottleneck_map(self, output, x: torch.Tensor) -> torch.Tensor:
        tokens = output[1]
        patch = math.isqrt(x.shape[-2] * x.shape[-1] // tokens.shape[1])  # the transformer's patch_size
        return tokens_to_map(tokens, x.shape[-2] // patch, x.shape[-1] // patch)

    def _encode(self, prompts: list[str]) -> Conditioning:
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts, prompt_2=prompts, prompt_3=prompts, device=self.device,
            num_images_per_prompt=1, do_classifier_free_guidance=False,
            max_sequence_length=1 if self.collapse_zero_tokens else SD3_ZERO_TEXT_TOKENS,
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

    def sigma_grid(self, steps: int, shift: float | None = None, resolution: int | None = None) -> torch.Tensor:
        """u_k = 1 − k/K (k < K) warped by `warp`, then 0.

        Passing the unwarped u_k as `sigmas=` to the diffusers pipeline reproduces this grid exactly.
        """
        if steps < 1:
            raise UsageError(f"steps must be >= 1, got {steps}")
        sigmas = self.warp(self.unshifted_grid(steps), shift, resolution)
        return torch.cat([sigmas, torch.zeros(1, dtype=sigmas.dtype)])

    def warp(self, u: torch.Tensor, shift: float | None = None, resolution: int | None = None) -> torch.Tensor:
        """σ of fractions u of the training-time axis, as the scheduler places its timesteps:
        σ(u) = s·u / (1 + (s − 1)·u) with the scheduler's shift s (or `shift`)."""
        shift = self.default_shift if shift is None else float(shift)
        return shift * u / (1 + (shift - 1) * u)

    @staticmethod
    def unshifted_grid(steps: int) -> torch.Tensor:
        return 1 - torch.arange(steps, dtype=torch.float64) / steps

    def prior_sample(self, noise: torch.Tensor) -> torch.Tensor:
        return noise
