"""HPS v2 / v2.1 without the hpsv2 or open_clip packages.

The released checkpoints (`xswu/HPSv2`: `HPS_v2_compressed.pt`, `HPS_v2.1_compressed.pt`) are an open_clip
ViT-H-14 in the OpenAI-CLIP key layout. `openai_clip_to_transformers` converts such a state dict into a
transformers `CLIPModel` (the same conversion that produced laion's ViT-H-14 on the hub), which then runs
through the PickScore code path. The score is the raw cosine between image and prompt, about 0.2-0.3.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from rlfew.errors import ModelLoadError
from rlfew.rewards.checkpoints import load_torch_state_dict, parse_dtype, resolve_file
from rlfew.rewards.clip_rewards import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ClipEmbeddingReward

# Keys the OpenAI CLIP pickles carry besides weights; open_clip's `attn_mask` is a derived buffer.
_NON_WEIGHT_KEYS = {"input_resolution", "context_length", "vocab_size", "attn_mask"}

_BLOCK_RENAMES = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                  "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_TOP_RENAMES = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_BLOCK_KEY = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")


def clip_config_from_openai_state_dict(state: dict[str, torch.Tensor], hidden_act: str = "gelu",
                                       head_width: int = 64):
    """A transformers CLIPConfig matching an OpenAI-layout state dict. Shapes give every size except the
    number of heads (width / head_width, 64 in all OpenAI and open_clip ViTs) and the activation
    (open_clip ViT-H-14: "gelu"; OpenAI's own models: "quick_gelu")."""
    from transformers import CLIPConfig

    def layer_count(prefix: str) -> int:
        return 1 + max(int(m.group(2)) for key in state if (m := _BLOCK_KEY.match(key)) and (m.group(1) or "") == prefix)

    vision_width, _, patch, _ = state["visual.conv1.weight"].shape
    grid = math.isqrt(state["visual.positional_embedding"].shape[0] - 1)
    text_width = state["ln_final.weight"].shape[0]
    vocab_size = state["token_embedding.weight"].shape[0]
    text = dict(hidden_size=text_width, num_attention_heads=text_width // head_width,
                intermediate_size=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                num_hidden_layers=layer_count(""), vocab_size=vocab_size,
                max_position_embeddings=state["positional_embedding"].shape[0], hidden_act=hidden_act,
                # the end-of-text token is the last id of the CLIP vocabulary; pooling takes its position
                eos_token_id=vocab_size - 1, bos_token_id=vocab_size - 2, pad_token_id=0)
    vision = dict(hidden_size=vision_width, num_attention_heads=vision_width // head_width,
                  intermediate_size=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                  num_hidden_layers=layer_count("visual."), patch_size=patch, image_size=grid * patch,
                  hidden_act=hidden_act)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=state["text_projection"].shape[1])


def openai_clip_to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an OpenAI-CLIP-layout state dict into transformers CLIPModel keys: split the fused attention
    `in_proj` into q/k/v, transpose the projection matrices (OpenAI multiplies x @ proj, nn.Linear
    computes x @ W.T). Raises on any key it does not know, so nothing is dropped silently."""
    converted: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key in _NON_WEIGHT_KEYS:
            continue
        if key in _TOP_RENAMES:
            converted[_TOP_RENAMES[key]] = value
        elif key in _TRANSPOSED:
            converted[_TRANSPOSED[key]] = value.t().contiguous()
        elif match := _BLOCK_KEY.match(key):
            tower = "vision_model" if match.group(1) else "text_model"
            prefix, rest = f"{tower}.encoder.layers.{match.group(2)}", match.group(3)
            if rest.startswith("attn.in_proj_"):
                kind = rest.rsplit("_", 1)[1]  # weight | bias
                for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    converted[f"{prefix}.self_attn.{name}.{kind}"] = chunk.contiguous()
                continue
            module, _, kind = rest.rpartition(".")
            if module not in _BLOCK_RENAMES:
                unknown.append(key)
                continue
            converted[f"{prefix}.{_BLOCK_RENAMES[module]}.{kind}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise ModelLoadError(f"not an OpenAI-CLIP state dict: unknown keys {unknown[:10]}")
    return converted


def load_openai_clip_as_transformers(state: dict[str, torch.Tensor], hidden_act: str = "gelu", head_width: int = 64,
                                     dtype: torch.dtype = torch.float32):
    from transformers import CLIPModel

    config = clip_config_from_openai_state_dict(state, hidden_act, head_width)
    model = CLIPModel(config)
    try:
        model.load_state_dict(openai_clip_to_transformers(state), strict=True)
    except RuntimeError as err:
        raise ModelLoadError(f"converted OpenAI-CLIP state dict does not fit CLIPModel: {err}") from err
    return model.to(dtype)


HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


class HPSv2(ClipEmbeddingReward):
    """Human Preference Score v2 (Wu et al. 2023): cos(image, prompt) under the HPS-tuned ViT-H-14.

    `checkpoint`: the `.pt` file, a folder holding it, or a hub id (the file is chosen by `version`).
    `tokenizer`: any CLIP BPE tokenizer with 77 positions (open_clip's tokenizer is the same BPE).
    `hidden_act`, `head_width`: what the checkpoint's shapes cannot tell (defaults: ViT-H-14's)."""

    name = "hpsv2"
    version = "v2.0"

    def __init__(self, checkpoint: str | Path = "xswu/HPSv2",
                 tokenizer: str | Path = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", hidden_act: str = "gelu",
                 head_width: int = 64, device: str = "cpu", dtype: str = "float32"):
        from transformers import AutoTokenizer

        state = load_torch_state_dict(resolve_file(checkpoint, HPS_FILES[self.version]))
        model = load_openai_clip_as_transformers(state, hidden_act, head_width, parse_dtype(dtype))
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
        except OSError as err:
            raise ModelLoadError(f"HPS {self.version}: cannot load tokenizer {str(tokenizer)!r}: {err}") from err
        super().__init__(model, tokenizer, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, device=device)

    def compute(self, images, prompts, **meta):
        return self.cosine(images, prompts)


class HPSv21(HPSv2):
    __doc__ = HPSv2.__doc__.replace("v2 (", "v2.1 (")
    name = "hpsv2.1"
    version = "v2.1"


def transformers_to_openai_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `openai_clip_to_transformers` (fuses q/k/v back into `in_proj`)."""
    top = {new: old for old, new in _TOP_RENAMES.items()}
    transposed = {new: old for old, new in _TRANSPOSED.items()}
    block_renames = {new: old for old, new in _BLOCK_RENAMES.items()}
    block = re.compile(r"^(vision_model|text_model)\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
    original: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in top:
            original[top[key]] = value
        elif key in transposed:
            original[transposed[key]] = value.t().contiguous()
        elif match := block.match(key):
            tower, index, module, kind = match.groups()
            prefix = f"{'visual.' if tower == 'vision_model' else ''}transformer.resblocks.{index}"
            if module.startswith("self_attn.") and module != "self_attn.out_proj":
                if module == "self_attn.q_proj":  # emit the fused tensor once, at q
                    parts = [state[f"{tower}.encoder.layers.{index}.self_attn.{p}.{kind}"] for p in ("q_proj", "k_proj", "v_proj")]
                    original[f"{prefix}.attn.in_proj_{kind}"] = torch.cat(parts, dim=0)
                continue
            original[f"{prefix}.{block_renames[module]}.{kind}"] = value
        elif not key.endswith("position_ids"):
            raise ValueError(f"unexpected CLIPModel key {key!r}")
    return original
