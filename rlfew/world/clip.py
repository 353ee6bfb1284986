"""The world CLIP: a small transformers `CLIPModel` trained contrastively on (render, caption) pairs.

It is the embedded world's differentiable, PickScore-like reward. The shipped copy in
`rlfew/world/assets/clip/` (name `world:clip`) was trained with

    OMP_NUM_THREADS=1 rlfew world train-clip --steps 1500 --batch-size 96 --seed 0 \
        --out rlfew/world/assets/clip

(run with a scratch --out, then copied here; 688 s on one thread of the shared 2-core CPU machine;
~370k parameters, 1.5 MB) with the defaults below: AdamW lr 1e-3 (100 warm-up steps, cosine decay to 0),
weight decay 0.05; vision ViT 64x64 / patch 8, hidden 96, 3 layers; text hidden 64, 3 layers;
projection 64; learnable logit scale (init 1/0.07, capped at 100). Each step renders `batch_size` random `world:train` captions (uniform
over categories) and adds one hard negative per image (the caption with one colour, shape, number or
relation changed, see `prompts.perturb_prompt`). The loss is a symmetric InfoNCE in which every caption a
scene satisfies counts as a positive ("a circle" is as true as "a red circle" for a lone red circle), so
duplicate and overlapping captions in a batch are not pushed apart.

Its retrieval on 300 fresh renders of held-out `world:eval` captions (`retrieval_report()`, printed at the
end of training): the true caption ranks first among 8 (7 false eval captions) 90.7% of the time (chance
12.5%; position 70%, colour_binding 88%, others 92-100%) and beats its one-word hard negative 95.3% of
the time (chance 50%; position 88%).

Images are fed as float (B,3,H,W) in [0,1] through `preprocess_images` (resize to 64, mean/std 0.5);
the folder also holds a CLIP image processor doing the same for PIL images, and the tokenizer.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, PreTrainedTokenizerFast

from rlfew.errors import UsageError
from rlfew.world import resolve_world_asset
from rlfew.world.prompts import CATEGORIES, Claims, parse_prompt, perturb_prompt, random_prompt, sample_scene, scene_satisfies
from rlfew.world.render import render
from rlfew.world.tokenizer import build_tokenizer

IMAGE_SIZE = 64
IMAGE_MEAN = IMAGE_STD = (0.5, 0.5, 0.5)
MAX_TEXT_LENGTH = 16


@dataclass
class ClipTrainingConfig:
    steps: int = 1500
    batch_size: int = 96
    seed: int = 0
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.05
    checkpoint_every: int = 250
    vision_hidden: int = 96
    vision_layers: int = 3
    text_hidden: int = 64
    text_layers: int = 3
    projection_dim: int = 64


def build_clip_config(tokenizer: PreTrainedTokenizerFast, cfg: ClipTrainingConfig) -> CLIPConfig:
    text = dict(
        vocab_size=len(tokenizer), hidden_size=cfg.text_hidden, intermediate_size=2 * cfg.text_hidden,
        num_hidden_layers=cfg.text_layers, num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
        # CLIPTextModel pools at the first eos_token_id, so these must be the tokenizer's ids.
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    vision = dict(
        image_size=IMAGE_SIZE, patch_size=8, hidden_size=cfg.vision_hidden, intermediate_size=2 * cfg.vision_hidden,
        num_hidden_layers=cfg.vision_layers, num_attention_heads=4,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.projection_dim)


def preprocess_images(images: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) float in [0,1] -> the model's pixel_values; differentiable (for use as a reward)."""
    if images.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bicubic", antialias=True, align_corners=False)
    mean = images.new_tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def _features(output) -> torch.Tensor:
    # transformers 5 may return an output object instead of a tensor from get_*_features.
    return output.pooler_output if hasattr(output, "pooler_output") else output


def embed_images(model: CLIPModel, images: torch.Tensor) -> torch.Tensor:
    """L2-normalised image embeddings of (B,3,H,W) float images in [0,1]."""
    return F.normalize(_features(model.get_image_features(pixel_values=preprocess_images(images))), dim=-1)


def embed_texts(model: CLIPModel, tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> torch.Tensor:
    """L2-normalised text embeddings."""
    batch = tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt").to(model.device)
    features = model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return F.normalize(_features(features), dim=-1)


@functools.lru_cache(maxsize=4096)
def _claims(caption: str) -> Claims:
    return parse_prompt(caption)


def training_batch(rng: np.random.Generator, batch_size: int) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Renders of random training captions, the candidate texts (the captions, deduplicated, then one hard
    negative per image) and the (images x texts) boolean matrix of which scene satisfies which text."""
    captions = [random_prompt(rng) for _ in range(batch_size)]
    scenes = [sample_scene(caption, rng) for caption in captions]
    negatives = [perturb_prompt(caption, rng) for caption in captions]
    texts = list(dict.fromkeys(captions + negatives))
    positives = torch.tensor([[scene_satisfies(scene, _claims(text)) for text in texts] for scene in scenes])
    images = torch.from_numpy(np.stack([render(scene) for scene in scenes])).permute(0, 3, 1, 2).float() / 255.0
    return images, texts, positives


def multi_positive_infonce(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE where each row (image) and each column (text) with at least one positive gets
    -log(total softmax mass on its positives)."""
    negative_inf = torch.finfo(logits.dtype).min

    def one_side(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        rows = mask.any(dim=1)
        positive_mass = scores.masked_fill(~mask, negative_inf).logsumexp(dim=1)
        return (scores.logsumexp(dim=1) - positive_mass)[rows].mean()

    return (one_side(logits, positives) + one_side(logits.t(), positives.t())) / 2


def save_world_clip(model: CLIPModel, tokenizer: PreTrainedTokenizerFast, out: Path, metadata: dict) -> None:
    """save_pretrained of model, tokenizer and image processor into `out`, written beside it then swapped in
    so a killed run never leaves a half-written folder."""
    out = Path(out)
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    # The PIL variant: the default one wants torchvision, which CPU installs leave out (OFFLINE.md).
    CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD), do_convert_rgb=True,
    ).save_pretrained(staging)
    (staging / "training.json").write_text(json.dumps(metadata, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)


def train_world_clip(out: str | Path, cfg: ClipTrainingConfig, progress: bool = True) -> dict:
    """Train a world CLIP from scratch into `out` (checkpoint every cfg.checkpoint_every steps and at the end);
    returns the final metrics."""
    if cfg.steps < 1 or cfg.batch_size < 2:
        raise UsageError(f"train-clip needs --steps >= 1 and --batch-size >= 2 (got {cfg.steps}, {cfg.batch_size})")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    tokenizer = build_tokenizer(MAX_TEXT_LENGTH)
    model = CLIPModel(build_clip_config(tokenizer, cfg))
    model.train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def lr_factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lr_factor)
    started = time.time()
    metrics: dict = {}
    bar = tqdm(range(cfg.steps), desc="train-clip", disable=not progress)
    for step in bar:
        images, texts, positives = training_batch(rng, cfg.batch_size)
        image_embeds = embed_images(model, images)
        text_embeds = embed_texts(model, tokenizer, texts)
        logits = model.logit_scale.exp() * image_embeds @ text_embeds.t()
        loss = multi_positive_infonce(logits, positives)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        scheduler.step()
        with torch.no_grad():
            model.logit_scale.clamp_(max=math.log(100.0))
            # Share of images whose best-scoring text is one they satisfy (hard negatives included).
            train_top1 = positives[torch.arange(len(images)), logits.argmax(dim=1)].float().mean().item()
        metrics = {"step": step + 1, "loss": loss.item(), "train_top1": train_top1,
                   "logit_scale": model.logit_scale.exp().item(), "seconds": round(time.time() - started, 1)}
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", top1=f"{train_top1:.2f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            save_world_clip(model, tokenizer, Path(out), {"config": asdict(cfg), "metrics": metrics})
    return metrics


def load_world_clip(device: str | torch.device = "cpu", path: str | Path | None = None):
    """The shipped world CLIP (or one trained into `path`) as (CLIPModel in eval mode, tokenizer)."""
    folder = Path(path) if path is not None else resolve_world_asset("world:clip")
    if not (folder / "config.json").is_file():
        raise UsageError(f"world CLIP folder {str(folder)!r} holds no config.json; train one with `rlfew world train-clip --out DIR`")
    model = CLIPModel.from_pretrained(folder, local_files_only=True).to(device).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True)
    return model, tokenizer


@torch.no_grad()
def retrieval_report(model: CLIPModel, tokenizer: PreTrainedTokenizerFast, count: int = 300, candidates: int = 8,
                     seed: int = 1234) -> dict:
    """Image -> caption retrieval on fresh renders of held-out `world:eval` captions (uniform over categories).

    `top1`: the image's caption outscores `candidates - 1` other eval captions the scene does not satisfy.
    `hard_negative`: the caption outscores a one-word perturbation of it (chance 0.5).
    """
    rng = np.random.default_rng(seed)
    per_category: dict[str, list[tuple[bool, bool]]] = {c: [] for c in CATEGORIES}
    for index in range(count):
        category = CATEGORIES[index % len(CATEGORIES)]
        caption = random_prompt(rng, category, split="eval")
        scene = sample_scene(caption, rng)
        distractors: list[str] = []
        while len(distractors) < candidates - 1:
            other = random_prompt(rng, split="eval")
            if other not in distractors and not scene_satisfies(scene, other):
                distractors.append(other)
        hard = perturb_prompt(caption, rng)
        image = torch.from_numpy(render(scene)).permute(2, 0, 1)[None].float().div(255).to(model.device)
        scores = (embed_images(model, image) @ embed_texts(model, tokenizer, [caption, hard] + distractors).t())[0]
        top1 = bool(scores[0] > scores[2:].max())
        per_category[category].append((top1, bool(scores[0] > scores[1])))
    everything = [pair for pairs in per_category.values() for pair in pairs]
    return {
        "top1": float(np.mean([t for t, _ in everything])),
        "hard_negative": float(np.mean([h for _, h in everything])),
        "top1_chance": 1.0 / candidates,
        "by_category": {c: {"top1": float(np.mean([t for t, _ in v])), "hard_negative": float(np.mean([h for _, h in v]))}
                        for c, v in per_category.items()},
        "count": count,
    }
