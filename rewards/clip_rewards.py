"""CLIP-based rewards on transformers `CLIPModel`: PickScore, CLIP score, LAION aesthetic predictor.

Images are preprocessed inside the autograd graph (bicubic antialiased resize, centre crop, mean/std), so
the gradient of a score reaches the generator's pixels; the reward networks themselves stay frozen.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rlfew.errors import ModelLoadError
from rlfew.rewards.api import Reward
from rlfew.rewards.checkpoints import load_torch_state_dict, parse_dtype, resolve_file

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess_images(images: torch.Tensor, size: int, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> torch.Tensor:
    """Differentiable version of CLIP's processor: resize the shorter side to `size` (bicubic, antialiased),
    centre crop `size` x `size`, normalise. Input (B,3,H,W) in [0,1]."""
    height, width = images.shape[-2:]
    scale = size / min(height, width)
    resized_h, resized_w = max(size, round(height * scale)), max(size, round(width * scale))
    if (resized_h, resized_w) != (height, width):
        images = F.interpolate(images, size=(resized_h, resized_w), mode="bicubic", antialias=True,
                               align_corners=False)
    top, left = (resized_h - size) // 2, (resized_w - size) // 2
    images = images[..., top:top + size, left:left + size]
    mean = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def features(output) -> torch.Tensor:
    """transformers 5 returns an output object from get_*_features; older versions a tensor."""
    return output.pooler_output if hasattr(output, "pooler_output") else output


def image_normalisation(processor_source: str | Path) -> tuple[tuple, tuple]:
    """Mean/std from the processor's preprocessor_config.json; OpenAI CLIP's when the source has none."""
    config_file = resolve_file(processor_source, "preprocessor_config.json", required=False)
    if config_file is None:
        return OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    config = json.loads(config_file.read_text())
    return tuple(config.get("image_mean", OPENAI_CLIP_MEAN)), tuple(config.get("image_std", OPENAI_CLIP_STD))


def load_clip(model: str | Path, processor: str | Path | None, dtype: str = "float32"):
    """(CLIPModel, tokenizer, image mean, image std) from hub ids or local folders."""
    from transformers import AutoTokenizer, CLIPModel

    processor = processor or model
    try:
        clip = CLIPModel.from_pretrained(str(model), dtype=parse_dtype(dtype))
        tokenizer = AutoTokenizer.from_pretrained(str(processor))
    except OSError as err:
        raise ModelLoadError(f"cannot load CLIP model {str(model)!r} / processor {str(processor)!r}: {err}") from err
    return (clip, tokenizer, *image_normalisation(processor))


class ClipEmbeddingReward(Reward):
    """A frozen transformers CLIPModel with its tokenizer; subclasses turn embeddings into a score."""

    differentiable = True

    def __init__(self, model, tokenizer, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
                 device: str = "cpu"):
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_mean, self.image_std = image_mean, image_std
        self.image_size = model.config.vision_config.image_size
        self.max_length = min(tokenizer.model_max_length, model.config.text_config.max_position_embeddings)

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings (B, D); differentiable w.r.t. `images`."""
        pixels = preprocess_images(images.to(self.device, self.model.dtype), self.image_size,
                                   self.image_mean, self.image_std)
        return F.normalize(features(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)

    def embed_prompts(self, prompts: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings (B, D); each distinct prompt is encoded once (groups repeat them)."""
        unique = sorted(set(prompts))
        tokens = self.tokenizer(unique, padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(self.device)
        embeddings = F.normalize(features(self.model.get_text_features(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])).float(), dim=-1)
        return embeddings[torch.tensor([unique.index(p) for p in prompts], device=self.device)]

    def cosine(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return (self.embed_images(images) * self.embed_prompts(prompts)).sum(-1)


class PickScore(ClipEmbeddingReward):
    """PickScore v1 (Kirstain et al. 2023): logit_scale.exp() * cos(image, prompt), about 18-24."""

    name = "pickscore"

    def __init__(self, model: str | Path = "yuvalkirstain/PickScore_v1",
                 processor: str | Path = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", device: str = "cpu",
                 dtype: str = "float32"):
        super().__init__(*load_clip(model, processor, dtype), device=device)

    def compute(self, images, prompts, **meta):
        return self.model.logit_scale.exp().float() * self.cosine(images, prompts)


class ClipScore(ClipEmbeddingReward):
    """CLIP score (Hessel et al. 2021, w = 1 as in torchmetrics): 100 * max(cos(image, prompt), 0)."""

    name = "clipscore"

    def __init__(self, model: str | Path = "openai/clip-vit-large-patch14", processor: str | Path | None = None,
                 device: str = "cpu", dtype: str = "float32"):
        super().__init__(*load_clip(model, processor, dtype), device=device)

    def compute(self, images, prompts, **meta):
        return 100.0 * self.cosine(images, prompts).clamp(min=0)


class RewardMLP(nn.Module):
    """The head shared by the LAION aesthetic predictor and ImageReward: five Linear layers with dropout
    between the first four and no activation, keys `layers.{0,2,4,6,7}` as in the released checkpoints."""

    def __init__(self, input_size: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)


AESTHETIC_HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"


class AestheticScore(ClipEmbeddingReward):
    """LAION improved aesthetic predictor v2: the MLP on L2-normalised CLIP-L/14 image embeddings, roughly
    1-10. The prompt is not used. `head` is the `.pth` state dict: a file, a folder holding it, or a hub id."""

    name = "aesthetic"

    def __init__(self, model: str | Path = "openai/clip-vit-large-patch14",
                 head: str | Path = "camenduru/improved-aesthetic-predictor", head_file: str = AESTHETIC_HEAD_FILE,
                 processor: str | Path | None = None, device: str = "cpu", dtype: str = "float32"):
        super().__init__(*load_clip(model, processor, dtype), device=device)
        self.head = RewardMLP(self.model.config.projection_dim)
        state = load_torch_state_dict(resolve_file(head, head_file))
        try:
            self.head.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ModelLoadError(f"aesthetic head {str(head)!r} does not match the LAION MLP "
                                 f"{self.model.config.projection_dim}->1024->128->64->16->1: {err}") from err
        self.head.to(self.device, self.model.dtype).eval().requires_grad_(False)

    def compute(self, images, prompts, **meta):
        embeddings = self.embed_images(images).to(self.model.dtype)
        return self.head(embeddings).squeeze(-1).float()
