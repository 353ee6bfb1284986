"""Tiny random pipelines built through the same diffusers / transformers classes as the real checkpoints, and a
method's batch drawn as a learner draws it.

Used by rlfew's tests and benchmarks, and handy for plug-in authors: `build_tiny_pipeline("sd3", folder)` writes
a diffusers folder that `DiffusionPipeline.from_pretrained(folder)` loads offline in well under a second (shapes
follow OFFLINE.md, "Tiny real pipelines"); `rollout_batch(method, step, prompts)` is one iteration's input to
`method.train_step`, exactly as the runtime builds it; `vector_roles(...)` puts small networks on plain vectors
behind the real role and adapter protocol, for tests of a method against closed forms.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from rlfew.models import Conditioning, FlowAdapter, Prediction, Role, Roles, RoleSpec

TINY_FAMILIES = ("sd3", "sd", "sd-v", "sdxl", "flux")

_WORDS = ("a an the and of left right above below red green blue yellow purple orange white black circle square "
          "triangle circles squares triangles one two three four cat dog photo picture big small").split()


def tiny_tokenizer(max_length: int = 16):
    """A word-level tokenizer (bos/eos added) that loads offline; unknown words map to <unk>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<bos>": 2, "<eos>": 3}
    for word in _WORDS:
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 2), ("<eos>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>", model_max_length=max_length)


def _text_config(hidden: int = 32, projection: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=16, projection_dim=projection,
                          pad_token_id=0, bos_token_id=2, eos_token_id=3)


def tiny_vae(latent_channels: int = 4, flow: bool = False):
    from diffusers import AutoencoderKL

    kwargs = dict(latent_channels=latent_channels, use_quant_conv=False, use_post_quant_conv=False,
                  shift_factor=0.0609, scaling_factor=1.5305) if flow else dict(latent_channels=latent_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16),
                         layers_per_block=1, norm_num_groups=8, sample_size=64, **kwargs)


def build_tiny_pipeline(family: str, seed: int = 0):
    """A random-init pipeline of `family` ∈ TINY_FAMILIES producing 64×64 images (8×8 latents)."""
    from diffusers import (EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; allowed: {', '.join(TINY_FAMILIES)}")
    torch.manual_seed(seed)
    if family == "sd3":
        transformer = SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
            num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
            pos_embed_max_size=16)
        return StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=tiny_vae(16, flow=True),
            text_encoder=CLIPTextModelWithProjection(_text_config()), tokenizer=tiny_tokenizer(),
            text_encoder_2=CLIPTextModelWithProjection(_text_config()), tokenizer_2=tiny_tokenizer(),
            text_encoder_3=None, tokenizer_3=None)
    if family == "flux":
        return _tiny_flux()
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="trailing",
        steps_offset=1, prediction_type="v_prediction" if family == "sd-v" else "epsilon")
    unet_kwargs = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                       down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                       up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=8,
                       layers_per_block=1, norm_num_groups=8)
    if family == "sdxl":
        unet = UNet2DConditionModel(cross_attention_dim=64, addition_embed_type="text_time",
                                    addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
                                    **unet_kwargs)
        return StableDiffusionXLPipeline(
            unet=unet, scheduler=scheduler, vae=tiny_vae(4),
            text_encoder=CLIPTextModel(_text_config()), tokenizer=tiny_tokenizer(),
            text_encoder_2=CLIPTextModelWithProjection(_text_config()), tokenizer_2=tiny_tokenizer(),
            force_zeros_for_empty_prompt=False)
    unet = UNet2DConditionModel(cross_attention_dim=32, **unet_kwargs)
    return StableDiffusionPipeline(unet=unet, scheduler=scheduler, vae=tiny_vae(4),
                                   text_encoder=CLIPTextModel(_text_config()), tokenizer=tiny_tokenizer(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _tiny_flux():
    """Schnell-like FLUX (no guidance embedding): 8×8 latents of 16 channels packed 2×2 into 16 tokens of 64."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
        guidance_embeds=False)
    t5 = T5EncoderModel(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                 pad_token_id=0, eos_token_id=3, decoder_start_token_id=0))
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    # Any fast tokenizer with pad/eos works for `_get_t5_prompt_embeds` (it pads to max_sequence_length).
    return FluxPipeline(transformer=transformer, scheduler=scheduler, vae=tiny_vae(16, flow=True),
                        text_encoder=CLIPTextModel(_text_config()), tokenizer=tiny_tokenizer(),
                        text_encoder_2=t5, tokenizer_2=tiny_tokenizer())


def rollout_batch(method, step: int, prompts: list[str], group_size: int = 1, rank: int = 0,
                  scores: dict[str, list[float]] | None = None):
    """The Batch a learner of `rank` would hand `method` at `step` for these prompts (each repeated `group_size`
    times, one group per prompt): the method's own rollout kernel, per-shard seeds and streams. With `scores`,
    the trajectory carries them, their weighted sum (weights of `method.cfg.reward`) and, when the method uses
    advantages, the group-normalised advantages of this batch."""
    import numpy as np

    from rlfew.algos.advantages import group_advantages
    from rlfew.runtime.prompts import PromptBatch
    from rlfew.runtime.workers import attach_scores, draw_rollout, learner_batch

    spec = type(method).spec(method.cfg, method.options)
    shard = PromptBatch([p for p in prompts for _ in range(group_size)],
                        np.repeat(np.arange(len(prompts)), group_size), group_size)
    generator = method.roles["generator"]
    trajectory, _ = draw_rollout(generator, method.cfg, spec.rollout(step), step, shard, rank, decode=False,
                                 weights_version=step)
    trajectory = trajectory.to(generator.adapter.device)
    if scores:
        weights = {entry.name: entry.weight for entry in method.cfg.reward}
        tensors = {name: torch.tensor(values, dtype=torch.float64) for name, values in scores.items()}
        rewards = sum(weights[name] * values for name, values in tensors.items())
        advantages = (group_advantages(tensors, weights, torch.from_numpy(shard.group_ids), spec.advantages)
                      if spec.advantages is not None else None)
        attach_scores(trajectory, {n: v.numpy() for n, v in tensors.items()}, rewards.numpy(),
                      None if advantages is None else advantages.values.numpy(),
                      None if advantages is None else advantages.valid.numpy())
    return learner_batch(method.cfg, generator, step, trajectory, rank)


def build_sd35_medium_shaped_pipeline(seed: int = 0):
    """A random-init StableDiffusion3Pipeline with SD3.5-Medium's transformer (24 MMDiT blocks, dual attention in
    the first 13, hidden 1536, QK RMS norm; 2.2B parameters) and VAE shapes, and tiny CLIP text encoders projecting
    to its 2048-wide pooled input: for memory and step-time benchmarks at the real size, without downloads."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                        layers_per_block=2, latent_channels=16, sample_size=1024, scaling_factor=1.5305,
                        shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=CLIPTextModelWithProjection(_text_config(projection=1024)), tokenizer=tiny_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(projection=1024)), tokenizer_2=tiny_tokenizer(),
        text_encoder_3=None, tokenizer_3=None)


def save_shaped_pipeline(shape: str, folder: str | Path) -> Path:
    """`tiny` (the tiny sd3 pipeline) or `sd35-medium` (build_sd35_medium_shaped_pipeline), saved to `folder`."""
    if shape == "tiny":
        return save_tiny_pipeline("sd3", folder)
    if shape == "sd35-medium":
        folder = Path(folder)
        build_sd35_medium_shaped_pipeline().save_pretrained(folder)
        return folder
    raise ValueError(f"unknown pipeline shape {shape!r}; allowed: tiny, sd35-medium")


def save_tiny_pipeline(family: str, folder: str | Path, seed: int = 0) -> Path:
    folder = Path(folder)
    build_tiny_pipeline(family, seed).save_pretrained(folder)
    return folder



class VectorFlowAdapter(FlowAdapter):
    """The flow family's conventions on plain vectors (B, D): `net(x, σ) -> v`, shift 1, no text encoder (every
    prompt encodes to a zero), and `decode` shows a vector of D = 3·n values as a 1×n image with 3 channels."""

    def __init__(self, dim: int):
        from diffusers.configuration_utils import FrozenDict

        scheduler = SimpleNamespace(config=FrozenDict(num_train_timesteps=1000, shift=1.0))
        super().__init__(SimpleNamespace(vae=None, scheduler=scheduler, text_encoder_3=None))
        self.dim = dim

    def prepare_network(self, net: nn.Module) -> nn.Module:
        return net

    def _encode(self, prompts: list[str]) -> Conditioning:
        return Conditioning(embeds=torch.zeros(len(prompts), 1))

    def _forward(self, net, x, sigma, cond):
        return Prediction.from_velocity(x, sigma, net(x.float(), sigma.float()).to(x.dtype))

    @property
    def default_resolution(self) -> int:
        return 1

    def latent_shape(self, resolution: int) -> tuple[int]:
        return (self.dim,)

    def decode(self, latents: torch.Tensor, checkpointed: bool = False) -> torch.Tensor:
        return latents.reshape(len(latents), 3, 1, -1)


class VelocityMLP(nn.Module):
    def __init__(self, dim: int, width: int = 64):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(dim + 1, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                    nn.Linear(width, dim))

    def forward(self, x, sigma):
        sigma = sigma.to(x.dtype).expand(x.shape[0])
        return self.layers(torch.cat([x, sigma[:, None]], 1))


class GaussianMixtureDenoiser(nn.Module):
    """Exact velocity of an isotropic Gaussian mixture Σ w_i N(m_i, s²I) under x_σ = (1−σ)x0 + σε:
    x̂0 = Σ_i r_i(x)·(m_i + (1−σ)s²/v·(x − (1−σ)m_i)), v = (1−σ)²s² + σ², r_i the component posteriors."""

    def __init__(self, means: torch.Tensor, std: float):
        super().__init__()
        self.register_buffer("means", means.double())
        self.std = std

    def posterior_mean(self, x, sigma):
        alpha = (1 - sigma).reshape(-1, 1, 1)
        var = alpha**2 * self.std**2 + sigma.reshape(-1, 1, 1) ** 2
        offset = x.double()[:, None, :] - alpha * self.means[None]  # (B, modes, D)
        responsibilities = torch.softmax(-(offset**2).sum(-1, keepdim=True) / (2 * var), dim=1)
        component_means = self.means[None] + alpha * self.std**2 / var * offset
        return (responsibilities * component_means).sum(1)

    def log_density(self, x):
        """log p(x) of the clean mixture (equal weights)."""
        sq = ((x.double()[:, None, :] - self.means[None]) ** 2).sum(-1)
        dim = self.means.shape[1]
        log_components = -sq / (2 * self.std**2) - dim * math.log(self.std * math.sqrt(2 * math.pi))
        return torch.logsumexp(log_components, 1) - math.log(len(self.means))

    def forward(self, x, sigma):
        sigma = sigma.double().expand(x.shape[0])
        return ((x.double() - self.posterior_mean(x, sigma)) / sigma[:, None]).to(x.dtype)


def vector_roles(dim: int, teacher: nn.Module, ema: dict[str, str] | None = None, **trainable: nn.Module) -> Roles:
    """A frozen teacher and trainable roles (generator=..., critic=...) on vectors of `dim` values; `ema` adds
    frozen EMA copies, {copy: role it follows} (e.g. {"surrogate_old": "surrogate"})."""
    import copy

    adapter = VectorFlowAdapter(dim)
    roles = {"teacher": Role("teacher", adapter, teacher.requires_grad_(False))}
    roles.update({name: Role(name, adapter, net, trainable=True) for name, net in trainable.items()})
    specs = {"teacher": RoleSpec(), **{name: RoleSpec(trainable=True) for name in trainable}}
    for name, source in (ema or {}).items():
        roles[name] = Role(name, adapter, copy.deepcopy(trainable[source]).requires_grad_(False))
        specs[name] = RoleSpec(ema_of=source)
    return Roles(adapter, roles, specs)
