"""ImageReward v1.0 (Xu et al. 2023) without the image-reward package (which no longer imports on
transformers 5): BLIP rebuilt from transformers classes plus the MLP head, and a converter from the
released checkpoint's key layout.

Model: ViT-L/16 (`BlipVisionModel`) -> its tokens are cross-attended by a BERT encoder
(`BlipTextModel(add_pooling_layer=False)` with cross-attention layers) reading the prompt -> the [CLS]
state -> 5-Linear MLP -> (r - 0.16717) / 1.03334.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from rlfew.errors import ModelLoadError
from rlfew.rewards.api import Reward
from rlfew.rewards.checkpoints import load_torch_state_dict, parse_dtype, resolve_file
from rlfew.rewards.clip_rewards import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, RewardMLP, preprocess_images

IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
PROMPT_TOKENS = 35  # the original pads/truncates every prompt to 35 tokens

# Original (timm ViT inside BLIP) -> transformers BlipVisionModel, per block and top level.
_VISION_BLOCK_RENAMES = {"norm1": "layer_norm1", "attn.qkv": "self_attn.qkv", "attn.proj": "self_attn.projection",
                         "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_VISION_TOP_RENAMES = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
                       "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
                       "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
                       "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}
# In the checkpoint but unused by the score: BLIP's contrastive projections and a derived buffer.
_UNUSED_PREFIXES = ("blip.vision_proj.", "blip.text_proj.")
_UNUSED_KEYS = {"blip.text_encoder.embeddings.position_ids"}
_VISION_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")


class ImageRewardModel(nn.Module):
    def __init__(self, vision_config, text_config):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = RewardMLP(text_config.hidden_size).layers  # keys mlp.{0,2,4,6,7}

    def forward(self, pixel_values, input_ids, attention_mask) -> torch.Tensor:
        image_tokens = self.vision(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(image_tokens.shape[:-1], dtype=torch.long, device=image_tokens.device)
        text = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_tokens,
                         encoder_attention_mask=image_mask, is_decoder=False)  # bidirectional, as BERT
        raw = self.mlp(text.last_hidden_state[:, 0]).squeeze(-1)
        return (raw.float() - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


def configs_from_original(state: dict[str, torch.Tensor], med_config: dict, head_width: int = 64):
    """BlipVisionConfig from the checkpoint's shapes (heads = width / 64, as in ViT-L/16) and
    BlipTextConfig from `med_config.json` (BERT config keys); cross-attention reads the ViT's width."""
    from transformers import BlipTextConfig, BlipVisionConfig

    width, _, patch, _ = state["blip.visual_encoder.patch_embed.proj.weight"].shape
    tokens = state["blip.visual_encoder.pos_embed"].shape[1]
    prefix = "blip.visual_encoder."
    depth = 1 + max(int(m.group(1)) for key in state
                    if key.startswith(prefix) and (m := _VISION_BLOCK.match(key[len(prefix):])))
    vision = BlipVisionConfig(hidden_size=width, num_attention_heads=width // head_width,
                              intermediate_size=state["blip.visual_encoder.blocks.0.mlp.fc1.weight"].shape[0],
                              num_hidden_layers=depth, patch_size=patch, image_size=round((tokens - 1) ** 0.5) * patch,
                              hidden_act="gelu", layer_norm_eps=1e-6)  # timm ViT in BLIP: LayerNorm eps 1e-6
    text = BlipTextConfig(vocab_size=med_config["vocab_size"], hidden_size=med_config["hidden_size"],
                          num_hidden_layers=med_config["num_hidden_layers"],
                          num_attention_heads=med_config["num_attention_heads"],
                          intermediate_size=med_config["intermediate_size"],
                          hidden_act=med_config.get("hidden_act", "gelu"),
                          max_position_embeddings=med_config["max_position_embeddings"],
                          layer_norm_eps=med_config.get("layer_norm_eps", 1e-12),
                          # BLIP_Pretrain overrides med_config's encoder_width with the ViT's width
                          encoder_hidden_size=width,
                          # is_decoder builds the cross-attention layers; forward(is_decoder=False) keeps
                          # self-attention bidirectional, as in the original BERT encoder
                          is_decoder=True, pad_token_id=med_config.get("pad_token_id", 0))
    return vision, text


def original_to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ImageReward.pt keys -> ImageRewardModel keys. Raises on any key it does not know."""
    converted, unknown = {}, []
    for key, value in state.items():
        if key in _UNUSED_KEYS or key.startswith(_UNUSED_PREFIXES):
            continue
        if key.startswith("blip.visual_encoder."):
            rest = key[len("blip.visual_encoder."):]
            if rest in _VISION_TOP_RENAMES:
                converted[f"vision.{_VISION_TOP_RENAMES[rest]}"] = value
            elif (m := _VISION_BLOCK.match(rest)) and m.group(2) in _VISION_BLOCK_RENAMES:
                converted[f"vision.encoder.layers.{m.group(1)}.{_VISION_BLOCK_RENAMES[m.group(2)]}.{m.group(3)}"] = value
            else:
                unknown.append(key)
        elif key.startswith("blip.text_encoder."):
            converted["text." + key[len("blip.text_encoder."):]] = value
        elif key.startswith("mlp.layers."):
            converted["mlp." + key[len("mlp.layers."):]] = value
        else:
            unknown.append(key)
    if unknown:
        raise ModelLoadError(f"not an ImageReward checkpoint: unknown keys {unknown[:10]}")
    return converted


def transformers_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `original_to_transformers` (for exporting and for round-trip tests)."""
    vision_top = {new: old for old, new in _VISION_TOP_RENAMES.items()}
    vision_block = {new: old for old, new in _VISION_BLOCK_RENAMES.items()}
    block = re.compile(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
    original = {}
    for key, value in state.items():
        if key.startswith("vision."):
            rest = key[len("vision."):]
            if rest in vision_top:
                original[f"blip.visual_encoder.{vision_top[rest]}"] = value
            else:
                m = block.match(rest)
                original[f"blip.visual_encoder.blocks.{m.group(1)}.{vision_block[m.group(2)]}.{m.group(3)}"] = value
        elif key.startswith("text."):
            original["blip.text_encoder." + key[len("text."):]] = value
        else:
            original["mlp.layers." + key[len("mlp."):]] = value
    return original


def load_tokenizer(source: str | Path):
    """BERT tokenizer with BLIP's extra tokens: `[DEC]` as bos and `[ENC]` (ids 30522/30523 in the real one)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source))
    except OSError as err:
        raise ModelLoadError(f"ImageReward: cannot load tokenizer {str(source)!r}: {err}") from err
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tokenizer


class ImageReward(Reward):
    """ImageReward v1.0, normalised as released (mean 0, std 1 over its benchmark; roughly -2..2).

    `checkpoint`: `ImageReward.pt` as a file, a folder holding it, or a hub id; `med_config`: the BERT
    config, by default `med_config.json` beside the checkpoint. `tokenizer`: BERT-base-uncased (hub id or
    folder). `head_width`: ViT attention head width, which shapes cannot tell (64 in ViT-L/16)."""

    name = "imagereward"
    differentiable = True

    def __init__(self, checkpoint: str | Path = "THUDM/ImageReward", tokenizer: str | Path = "bert-base-uncased",
                 med_config: str | Path | None = None, head_width: int = 64, device: str = "cpu",
                 dtype: str = "float32"):
        state = load_torch_state_dict(resolve_file(checkpoint, "ImageReward.pt"))
        beside_checkpoint = Path(checkpoint).parent if Path(checkpoint).is_file() else checkpoint
        med_config = json.loads(resolve_file(med_config or beside_checkpoint, "med_config.json").read_text())
        self.model = ImageRewardModel(*configs_from_original(state, med_config, head_width))
        try:
            self.model.load_state_dict(original_to_transformers(state), strict=True)
        except RuntimeError as err:
            raise ModelLoadError(f"ImageReward checkpoint {str(checkpoint)!r} does not fit the model: {err}") from err
        self.model.to(device, parse_dtype(dtype)).eval().requires_grad_(False)
        self.tokenizer = load_tokenizer(tokenizer)
        self.image_size = self.model.vision.config.image_size

    def compute(self, images, prompts, **meta):
        device = self.model.mlp[0].weight.device
        pixels = preprocess_images(images.to(device, self.model.mlp[0].weight.dtype), self.image_size,
                                   OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=PROMPT_TOKENS,
                                return_tensors="pt").to(device)
        return self.model(pixels, tokens["input_ids"], tokens["attention_mask"])
