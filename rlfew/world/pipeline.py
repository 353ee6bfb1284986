"""The world's generative model: a tiny SD3-family diffusers pipeline and the commands that train it.

Components are exactly the classes of `StableDiffusion3Pipeline` minus T5: an `AutoencoderKL` (64x64 RGB,
f=4 -> 4x16x16 latents), two `CLIPTextModelWithProjection` encoders over the world's word-level
tokenizer, an `SD3Transformer2DModel` (patch 2 -> 64 image tokens) and a `FlowMatchEulerDiscreteScheduler`.
So plain diffusers loads and samples it:

    StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None)

Training (the recipe, with seeds and the exact commands, is `configs/world/teacher.yaml`):

    rlfew world train-vae --out runs/world-vae
    rlfew world train-denoiser --vae runs/world-vae --out runs/world-denoiser
    rlfew world build-teacher --run runs/world-denoiser --out rlfew/world/assets/teacher

Data is rendered on the fly: every step draws world:train captions and a fresh random scene for each.
Both trainers derive a step's captions, scenes and noise from (seed, step) alone, so a run resumed from a
checkpoint sees exactly the data the uninterrupted run would have seen.

Without T5 the SD3 pipeline pads the text context with `max_sequence_length` (256 by default) all-zero
tokens. They stay identical through every block, so they act as one token whose attention weight is
multiplied by 256; `collapsed_zero_text_tokens` computes exactly that with a single token, which makes
training ~4x cheaper while the model stays the one plain diffusers runs with its defaults.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, PreTrainedTokenizerFast

from rlfew.checkpoint import latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from rlfew.errors import UsageError
from rlfew.models.flow import SD3_ZERO_TEXT_TOKENS, CollapsedZeroTokensAttnProcessor
from rlfew.run import MetricsLogger
from rlfew.world.evaluator import accuracy_report, evaluate
from rlfew.world.prompts import load_prompts, random_prompt
from rlfew.world.render import render_batch
from rlfew.world.tokenizer import build_tokenizer

log = logging.getLogger(__name__)

IMAGE_SIZE = 64


# ------------------------------------------------------------------------------------------ architecture

@dataclasses.dataclass(frozen=True)
class VaeArchitecture:
    # Three blocks = two downsamplings: f=4, so 64x64 images become 16x16 latents (64 tokens at patch 2).
    block_out_channels: tuple[int, ...] = (16, 32, 64)
    latent_channels: int = 4
    layers_per_block: int = 1
    norm_num_groups: int = 8


@dataclasses.dataclass(frozen=True)
class DenoiserArchitecture:
    text_hidden_size: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_projection_dim: int = 64
    tokenizer_max_length: int = 16  # longest world caption is 10 tokens with <bos>/<eos>
    transformer_layers: int = 5
    attention_heads: int = 4
    attention_head_dim: int = 32
    patch_size: int = 2


def build_vae(arch: VaeArchitecture = VaeArchitecture()) -> AutoencoderKL:
    blocks = len(arch.block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, sample_size=IMAGE_SIZE,
        down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=arch.block_out_channels, layers_per_block=arch.layers_per_block,
        latent_channels=arch.latent_channels, norm_num_groups=arch.norm_num_groups,
        use_quant_conv=False, use_post_quant_conv=False,  # as SD3's VAE
    )


def build_text_encoder(tokenizer: PreTrainedTokenizerFast, arch: DenoiserArchitecture) -> CLIPTextModelWithProjection:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=arch.text_hidden_size, intermediate_size=4 * arch.text_hidden_size,
        num_hidden_layers=arch.text_layers, num_attention_heads=arch.text_heads,
        max_position_embeddings=arch.tokenizer_max_length, projection_dim=arch.text_projection_dim,
        # CLIP pools at the first <|endoftext|>; these ids must be the tokenizer's.
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return CLIPTextModelWithProjection(config)


def build_transformer(arch: DenoiserArchitecture, latent_channels: int) -> SD3Transformer2DModel:
    inner_dim = arch.attention_heads * arch.attention_head_dim
    latent_size = IMAGE_SIZE // 4
    return SD3Transformer2DModel(
        sample_size=latent_size, patch_size=arch.patch_size, in_channels=latent_channels, out_channels=latent_channels,
        num_layers=arch.transformer_layers, attention_head_dim=arch.attention_head_dim,
        num_attention_heads=arch.attention_heads,
        # The pipeline concatenates both encoders' hidden states along features and zero-pads to this width.
        joint_attention_dim=2 * arch.text_hidden_size, caption_projection_dim=inner_dim,
        pooled_projection_dim=2 * arch.text_projection_dim,
        pos_embed_max_size=2 * latent_size // arch.patch_size,  # room for 128x128 samples
        qk_norm="rms_norm",  # as SD3.5: keeps attention logits bounded at a high learning rate
    )


def build_scheduler(shift: float) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def assemble_pipeline(vae, tokenizer, text_encoder, text_encoder_2, transformer, scheduler) -> StableDiffusion3Pipeline:
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None,
    )


def load_pipeline(path: str | Path, **kwargs) -> StableDiffusion3Pipeline:
    """A world pipeline folder (or `world:teacher`) through plain diffusers."""
    path = str(path)
    if path.startswith("world:"):
        from rlfew.world import resolve_world_asset

        path = str(resolve_world_asset(path))
    return StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None, local_files_only=True, **kwargs)


# ------------------------------------------------------------------------ collapsed zero text tokens

@contextlib.contextmanager
def collapsed_zero_text_tokens(transformer: SD3Transformer2DModel, copies: int = SD3_ZERO_TEXT_TOKENS) -> Iterator[None]:
    """Within the block, the transformer expects contexts from `encode_prompt(..., max_sequence_length=1)` and
    computes exactly what it computes on the pipeline's default `max_sequence_length=copies` context."""
    original = transformer.attn_processors
    transformer.set_attn_processor(CollapsedZeroTokensAttnProcessor(copies))
    try:
        yield
    finally:
        transformer.set_attn_processor(original)


# ---------------------------------------------------------------------------------------------- data

def _step_rng(seed: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, step])


def world_batch(seed: int, step: int, batch_size: int, category_weights: tuple[float, ...] = ()
                ) -> tuple[list[str], torch.Tensor, np.random.Generator]:
    """Step `step`'s world:train captions and fresh renders in [-1, 1]; the generator continues the step's stream."""
    rng = _step_rng(seed, step)
    prompts = [random_prompt(rng, split="train", category_weights=category_weights) for _ in range(batch_size)]
    images = render_batch(prompts, seed=int(rng.integers(2**62)), size=IMAGE_SIZE)
    return prompts, images * 2 - 1, rng


# ------------------------------------------------------------------------------------------ training

def _atomic_save_pretrained(obj, folder: Path) -> None:
    """`save_pretrained` into a temporary sibling, then rename, so `folder` is complete or absent."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".tmp-{folder.name}-", dir=folder.parent))
    obj.save_pretrained(temp)
    if folder.exists():
        shutil.rmtree(folder)
    temp.rename(folder)


def _lr_lambda(warmup_steps: int, total_steps: int, decay_fraction: float):
    """Linear warm-up, constant, then linear decay to zero over the last `decay_fraction` of the run. Up to
    the decay the factor does not depend on `total_steps`, so a run can be extended by resuming it."""
    decay_steps = decay_fraction * total_steps

    def factor(step: int) -> float:
        warmup = min(1.0, (step + 1) / max(1, warmup_steps))
        return warmup * (min(1.0, (total_steps - step) / decay_steps) if decay_steps > 0 else 1.0)

    return factor


def _resolve_resume(resume: str | None, out: Path) -> Path | None:
    if resume is None:
        return None
    if resume == "latest":
        found = latest_checkpoint(out)
        if found is None:
            log.info("no checkpoint under %s; starting from scratch", out)
        return found
    return Path(resume)


@dataclasses.dataclass
class VaeTrainConfig:
    steps: int = 500  # reconstructions already score 1.0 with the world evaluator
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 100
    kl_weight: float = 1e-4  # per latent element: keeps latents bounded without blurring
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    stats_batches: int = 16  # batches used to measure the latent shift/scale
    eval_images: int = 256  # fresh renders whose reconstructions the world evaluator scores at the end
    architecture: VaeArchitecture = VaeArchitecture()


def train_vae(config: VaeTrainConfig, out: str | Path, resume: str | None = None) -> AutoencoderKL:
    """Train the world VAE (L1 + L2 reconstruction + small KL) and save it with its latent shift/scale to `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    vae = build_vae(config.architecture)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.lr, weight_decay=0.0)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config.warmup_steps, config.steps, 0.0))
    start = 0
    checkpoint_path = _resolve_resume(resume, out)
    if checkpoint_path is not None:
        checkpoint = load_checkpoint(checkpoint_path)
        vae.load_state_dict(checkpoint.tensors["vae"])
        optimizer.load_state_dict(checkpoint.state["optimizer"])
        lr_schedule.load_state_dict(checkpoint.state["lr_schedule"])
        start = checkpoint.step
        log.info("resumed the VAE from %s at step %d", checkpoint_path, start)
    (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=1))

    vae.train()
    with MetricsLogger(out, resumed_step=start if checkpoint_path else None, fresh=checkpoint_path is None) as metrics:
        progress = tqdm(range(start, config.steps), initial=start, total=config.steps, desc="train-vae", unit="step")
        for step in progress:
            _, images, _ = world_batch(config.seed, step, config.batch_size)
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
            posterior = vae.encode(images).latent_dist
            reconstruction = vae.decode(posterior.sample(generator)).sample
            l1, l2 = F.l1_loss(reconstruction, images), F.mse_loss(reconstruction, images)
            kl = posterior.kl().mean() / posterior.mean[0].numel()
            loss = l1 + l2 + config.kl_weight * kl
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            optimizer.step()
            lr_schedule.step()
            done = step + 1
            progress.set_postfix(l1=f"{l1.item():.4f}", kl=f"{kl.item():.2f}")
            if done % 10 == 0 or done == config.steps:
                metrics.log(done, {"loss": loss.item(), "l1": l1.item(), "l2": l2.item(), "kl": kl.item()})
            if done % config.checkpoint_every == 0 and done < config.steps:
                save_checkpoint(out, done, {"vae": vae.state_dict()},
                                {"optimizer": optimizer.state_dict(), "lr_schedule": lr_schedule.state_dict()})
                prune_checkpoints(out, config.keep_checkpoints)

    vae.eval()
    shift, scale = latent_statistics(vae, config.seed, config.stats_batches, config.batch_size)
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    report = reconstruction_report(vae, seed=config.seed + 1, count=config.eval_images)
    (out / "reconstruction.json").write_text(json.dumps(report, indent=1))
    log.info("VAE latents: shift %.4f scale %.4f; evaluator accuracy of reconstructions %.3f",
             shift, scale, report["accuracy"])
    _atomic_save_pretrained(vae, out / "vae")
    return vae


@torch.no_grad()
def latent_statistics(vae: AutoencoderKL, seed: int, batches: int, batch_size: int) -> tuple[float, float]:
    """(shift, scale) that bring posterior samples of world renders to zero mean, unit variance."""
    latents = []
    for index in range(batches):
        _, images, _ = world_batch(seed + 10_000, index, batch_size)  # a stream disjoint from training's
        latents.append(vae.encode(images).latent_dist.sample(torch.Generator().manual_seed(index)))
    latents = torch.cat(latents)
    return float(latents.mean()), float(1.0 / latents.std())


@torch.no_grad()
def reconstruction_report(vae: AutoencoderKL, seed: int, count: int = 256, batch_size: int = 32) -> dict:
    """The world evaluator's accuracy on VAE reconstructions (latent means) of fresh world:train renders."""
    results = []
    for index, begin in enumerate(range(0, count, batch_size)):
        prompts, images, _ = world_batch(seed, index, min(batch_size, count - begin))
        reconstruction = vae.decode(vae.encode(images).latent_dist.mode()).sample
        results += evaluate(((reconstruction + 1) / 2).clamp(0, 1), prompts)
    return accuracy_report(results)


@dataclasses.dataclass
class DenoiserTrainConfig:
    steps: int = 6500
    batch_size: int = 32
    lr: float = 1e-3  # high for a short CPU run; qk-norm, warm-up and clipping keep it stable
    text_lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 200
    lr_decay_fraction: float = 0.2  # linear decay to zero over the last 20% of the steps
    caption_dropout: float = 0.1  # empty caption, the pipeline's negative_prompt="" for CFG
    logit_normal_mean: float = 0.0  # sigma = sigmoid(N(mean, std)): SD3's training distribution
    logit_normal_std: float = 1.0
    ema_decay: float = 0.999
    ema_power: float = 2 / 3  # EMA warm-up: decay 1 - (1 + step)^-power, capped at ema_decay
    scheduler_shift: float = 2.0
    # Caption categories in proportion to these (order of prompts.CATEGORIES); empty: uniform. Multi-object
    # categories are the hard ones, and world:eval weighs them most.
    category_weights: tuple[float, ...] = ()
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    architecture: DenoiserArchitecture = DenoiserArchitecture()


def _trained_modules(pipeline: StableDiffusion3Pipeline) -> dict[str, torch.nn.Module]:
    return {"transformer": pipeline.transformer, "text_encoder": pipeline.text_encoder,
            "text_encoder_2": pipeline.text_encoder_2}


def _ema_parameters(pipeline: StableDiffusion3Pipeline) -> list[torch.nn.Parameter]:
    return [p for module in _trained_modules(pipeline).values() for p in module.parameters()]


def train_denoiser(config: DenoiserTrainConfig, vae_path: str | Path, out: str | Path,
                   resume: str | None = None) -> StableDiffusion3Pipeline:
    """Flow-matching training of the transformer and both text encoders on a frozen VAE.

    Writes `out/checkpoints/step_N/` (training state, plus `pipeline/` with the EMA weights) and finally
    the EMA pipeline itself into `out/` (a diffusers folder)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    arch = config.architecture
    vae_path = Path(vae_path)
    vae = AutoencoderKL.from_pretrained(vae_path / "vae" if (vae_path / "vae").is_dir() else vae_path).eval()
    vae.requires_grad_(False)
    torch.manual_seed(config.seed)
    tokenizer = build_tokenizer(max_length=arch.tokenizer_max_length)
    pipeline = assemble_pipeline(
        vae, tokenizer, build_text_encoder(tokenizer, arch), build_text_encoder(tokenizer, arch),
        build_transformer(arch, vae.config.latent_channels), build_scheduler(config.scheduler_shift),
    )
    modules = _trained_modules(pipeline)
    text_parameters = [p for name in ("text_encoder", "text_encoder_2") for p in modules[name].parameters()]
    optimizer = torch.optim.AdamW(
        [{"params": list(pipeline.transformer.parameters()), "lr": config.lr},
         {"params": text_parameters, "lr": config.text_lr}],
        weight_decay=config.weight_decay, betas=(0.9, 0.99),
    )
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(config.warmup_steps, config.steps, config.lr_decay_fraction))
    ema = EMAModel(_ema_parameters(pipeline), decay=config.ema_decay, use_ema_warmup=True, power=config.ema_power)
    start = 0
    checkpoint_path = _resolve_resume(resume, out)
    if checkpoint_path is not None:
        checkpoint = load_checkpoint(checkpoint_path)
        for name, module in modules.items():
            module.load_state_dict(checkpoint.tensors[name])
        optimizer.load_state_dict(checkpoint.state["optimizer"])
        lr_schedule.load_state_dict(checkpoint.state["lr_schedule"])
        ema.load_state_dict(checkpoint.state["ema"])
        start = checkpoint.step
        log.info("resumed the denoiser from %s at step %d", checkpoint_path, start)
    (out / "train_config.json").write_text(json.dumps(
        {**dataclasses.asdict(config), "vae": str(vae_path)}, indent=1))

    scale, shift = vae.config.scaling_factor, vae.config.shift_factor
    for module in modules.values():
        module.train()
    with MetricsLogger(out, resumed_step=start if checkpoint_path else None, fresh=checkpoint_path is None) as metrics, \
            collapsed_zero_text_tokens(pipeline.transformer):
        progress = tqdm(range(start, config.steps), initial=start, total=config.steps, desc="train-denoiser", unit="step")
        window: list[float] = []
        started = time.perf_counter()
        for step in progress:
            prompts, images, rng = world_batch(config.seed, step, config.batch_size, config.category_weights)
            captions = ["" if drop else p for p, drop in zip(prompts, rng.random(len(prompts)) < config.caption_dropout)]
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
            with torch.no_grad():
                latents = (vae.encode(images).latent_dist.sample(generator) - shift) * scale
            sigma = torch.sigmoid(config.logit_normal_mean + config.logit_normal_std *
                                  torch.randn(len(prompts), generator=generator))
            noise = torch.randn(latents.shape, generator=generator)
            sigma_b = sigma.view(-1, 1, 1, 1)
            noisy = (1 - sigma_b) * latents + sigma_b * noise
            embeds, _, pooled, _ = pipeline.encode_prompt(
                captions, None, None, device=torch.device("cpu"), do_classifier_free_guidance=False, max_sequence_length=1)
            velocity = pipeline.transformer(hidden_states=noisy, timestep=sigma * 1000, encoder_hidden_states=embeds,
                                            pooled_projections=pooled, return_dict=False)[0]
            loss = F.mse_loss(velocity, noise - latents)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(_ema_parameters(pipeline), 1.0)
            optimizer.step()
            lr_schedule.step()
            ema.step(_ema_parameters(pipeline))
            done = step + 1
            window.append(loss.item())
            progress.set_postfix(loss=f"{np.mean(window[-50:]):.4f}")
            if done % 25 == 0 or done == config.steps:
                elapsed, started = time.perf_counter() - started, time.perf_counter()
                metrics.log(done, {"loss": float(np.mean(window)), "grad_norm": grad_norm.item(),
                                   "lr": lr_schedule.get_last_lr()[0], "ema_decay": ema.cur_decay_value or 0.0,
                                   "images_per_s": len(window) * config.batch_size / elapsed})
                window = []
            if done % config.checkpoint_every == 0 and done < config.steps:
                path = save_checkpoint(out, done, {name: m.state_dict() for name, m in modules.items()},
                                       {"optimizer": optimizer.state_dict(), "lr_schedule": lr_schedule.state_dict(),
                                        "ema": ema.state_dict()})
                with _ema_weights(ema, pipeline):
                    _atomic_save_pretrained(pipeline, path / "pipeline")
                prune_checkpoints(out, config.keep_checkpoints)

    ema.copy_to(_ema_parameters(pipeline))
    for module in modules.values():
        module.eval()
    pipeline.save_pretrained(out)
    return pipeline


@contextlib.contextmanager
def _ema_weights(ema: EMAModel, pipeline: StableDiffusion3Pipeline) -> Iterator[None]:
    parameters = _ema_parameters(pipeline)
    ema.store(parameters)
    ema.copy_to(parameters)
    try:
        yield
    finally:
        ema.restore(parameters)


def build_teacher(run: str | Path, out: str | Path, dtype: torch.dtype = torch.float16,
                  scheduler_shift: float | None = None) -> Path:
    """Copy a trained pipeline folder (a train-denoiser output or one of its checkpoints' `pipeline/`) to
    `out` as a clean diffusers folder: weights in `dtype`, optionally another scheduler shift."""
    pipeline = load_pipeline(run)
    if scheduler_shift is not None:
        pipeline.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipeline.scheduler.config, shift=scheduler_shift)
    pipeline.to(dtype)
    out = Path(out)
    _atomic_save_pretrained(pipeline, out)
    (out / "README.md").write_text(
        "# world:teacher\n\nThe embedded world's text-to-image model: a tiny StableDiffusion3Pipeline (no T5) trained by\n"
        "`rlfew world train-vae` and `rlfew world train-denoiser`; recipe, seeds and measured accuracy in\n"
        "`configs/world/teacher.yaml`. Load with\n"
        "`StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None, dtype=torch.float32)`\n"
        f"(the weights are stored as {str(dtype).removeprefix('torch.')}; on a CPU run them in float32).\n"
        f"Weights stored as {str(dtype).removeprefix('torch.')}; scheduler shift {pipeline.scheduler.config.shift}.\n")
    return out


# -------------------------------------------------------------------------------------------- measure

@torch.no_grad()
def measure_teacher(pipeline: str | Path | StableDiffusion3Pipeline = "world:teacher", prompts: str = "world:eval",
                    steps: tuple[int, ...] = (50, 8, 4, 2, 1), guidance_scale: float = 3.0,
                    images_per_prompt: int = 4, seed: int = 0, batch_size: int = 32,
                    collapse_zero_tokens: bool = True) -> dict:
    """World-evaluator accuracy of plain `StableDiffusion3Pipeline` samples at each step count.

    Image j of prompt i uses seed `seed + j` (and the same initial noise at every step count). With
    `collapse_zero_tokens` the pipeline runs with one zero text token standing for its default 256
    (`collapsed_zero_text_tokens`): the same samples up to float rounding, ~4x faster."""
    if not isinstance(pipeline, StableDiffusion3Pipeline):
        pipeline = load_pipeline(pipeline, torch_dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    prompt_list = load_prompts(prompts)
    jobs = [(prompt, seed + j) for j in range(images_per_prompt) for prompt in prompt_list]
    report = {"prompts": prompts, "guidance_scale": guidance_scale, "images_per_prompt": images_per_prompt,
              "seed": seed, "results": {}}
    zero_tokens = {"max_sequence_length": 1} if collapse_zero_tokens else {}
    collapsed = collapsed_zero_text_tokens(pipeline.transformer) if collapse_zero_tokens else contextlib.nullcontext()
    with collapsed:
        for num_steps in steps:
            report["results"][str(num_steps)] = _measure_steps(pipeline, jobs, num_steps, guidance_scale, batch_size, zero_tokens)
    return report


def _measure_steps(pipeline, jobs, num_steps, guidance_scale, batch_size, zero_tokens) -> dict:
    started = time.perf_counter()
    results = []
    for begin in tqdm(range(0, len(jobs), batch_size), desc=f"measure {num_steps} steps", unit="batch"):
        chunk = jobs[begin:begin + batch_size]
        images = pipeline(
            prompt=[p for p, _ in chunk], negative_prompt=[""] * len(chunk),
            num_inference_steps=num_steps, guidance_scale=guidance_scale, height=IMAGE_SIZE, width=IMAGE_SIZE,
            generator=[torch.Generator().manual_seed(s) for _, s in chunk], output_type="pt", **zero_tokens,
        ).images
        results += evaluate(images, [p for p, _ in chunk])
    accuracy = accuracy_report(results)
    accuracy["seconds"] = round(time.perf_counter() - started, 1)
    log.info("%d steps: accuracy %.3f %s", num_steps, accuracy["accuracy"],
             {k: round(v, 3) for k, v in accuracy["accuracy_by_category"].items()})
    return accuracy


# ------------------------------------------------------------------------------------------------ CLI

def _set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def _number_tuple(text: str) -> tuple[int | float, ...]:
    return tuple(int(part) if part.strip().isdigit() else float(part) for part in text.split(","))


def _overrides(config, args: argparse.Namespace):
    """`config` with every flag the user gave (architecture fields included) replacing its default."""
    def replaced(obj):
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(obj) if getattr(args, f.name, None) is not None}
        return dataclasses.replace(obj, **values)

    return dataclasses.replace(replaced(config), architecture=replaced(config.architecture))


def _add_config_flags(parser: argparse.ArgumentParser, config) -> None:
    """One flag per training and architecture field; unset flags keep the recipe's default."""
    for field in dataclasses.fields(config) + dataclasses.fields(config.architecture):
        if field.name == "architecture":
            continue
        default = field.default
        kind = _number_tuple if isinstance(default, tuple) else type(default)
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        parser.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name, type=kind, default=None,
                            help=f"default {shown}")


def _run_train_vae(args: argparse.Namespace) -> int:
    _set_threads(args.threads)
    train_vae(_overrides(VaeTrainConfig(), args), args.out, resume=args.resume)
    return 0


def _run_train_denoiser(args: argparse.Namespace) -> int:
    _set_threads(args.threads)
    config = _overrides(DenoiserTrainConfig(), args)
    if not Path(args.vae).is_dir():
        raise UsageError(f"--vae {args.vae!r} is not a folder (expected a train-vae output)")
    train_denoiser(config, args.vae, args.out, resume=args.resume)
    return 0


def _run_build_teacher(args: argparse.Namespace) -> int:
    dtype = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    print(build_teacher(args.run, args.out, dtype=dtype, scheduler_shift=args.shift))
    return 0


def _run_measure_teacher(args: argparse.Namespace) -> int:
    _set_threads(args.threads)
    report = measure_teacher(args.pipeline, args.prompts, tuple(int(s) for s in args.steps.split(",")),
                             args.guidance, args.images_per_prompt, args.seed, args.batch_size,
                             collapse_zero_tokens=not args.full_text_context)
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


def register_world_cli(world_subparsers) -> None:
    """Add `train-vae`, `train-denoiser`, `build-teacher` and `measure-teacher` under `rlfew world`."""
    vae = world_subparsers.add_parser("train-vae", help="train the world pipeline's AutoencoderKL")
    _add_config_flags(vae, VaeTrainConfig())
    vae.add_argument("--out", required=True, help="run folder; the VAE is saved to OUT/vae")
    vae.add_argument("--resume", help="a checkpoint folder (OUT/checkpoints/step_N) or 'latest'")
    vae.add_argument("--threads", type=int, help="torch threads (default: OMP_NUM_THREADS)")
    vae.set_defaults(func=_run_train_vae)

    denoiser = world_subparsers.add_parser("train-denoiser", help="train the SD3 transformer and text encoders")
    _add_config_flags(denoiser, DenoiserTrainConfig())
    denoiser.add_argument("--vae", required=True, help="a train-vae run folder (or a saved AutoencoderKL folder)")
    denoiser.add_argument("--out", required=True, help="run folder; the final pipeline is saved into it")
    denoiser.add_argument("--resume", help="a checkpoint folder (OUT/checkpoints/step_N) or 'latest'")
    denoiser.add_argument("--threads", type=int, help="torch threads (default: OMP_NUM_THREADS)")
    denoiser.set_defaults(func=_run_train_denoiser)

    teacher = world_subparsers.add_parser("build-teacher", help="write a trained pipeline as a clean diffusers folder")
    teacher.add_argument("--run", required=True, help="train-denoiser output (or a checkpoint's pipeline/ folder)")
    teacher.add_argument("--out", required=True, help="e.g. rlfew/world/assets/teacher")
    teacher.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    teacher.add_argument("--shift", type=float, help="override the scheduler's shift")
    teacher.set_defaults(func=_run_build_teacher)

    measure = world_subparsers.add_parser("measure-teacher", help="evaluator accuracy of a world pipeline per step count")
    measure.add_argument("--pipeline", default="world:teacher")
    measure.add_argument("--prompts", default="world:eval")
    measure.add_argument("--steps", default="50,8,4,2,1", help="comma-separated step counts")
    measure.add_argument("--guidance", type=float, default=3.0)
    measure.add_argument("--images-per-prompt", type=int, default=4)
    measure.add_argument("--seed", type=int, default=0)
    measure.add_argument("--batch-size", type=int, default=32)
    measure.add_argument("--threads", type=int)
    measure.add_argument("--full-text-context", action="store_true",
                         help="run the 256 zero text tokens literally instead of collapsed into one (same samples, slower)")
    measure.add_argument("--out", help="also write the JSON report here")
    measure.set_defaults(func=_run_measure_teacher)
