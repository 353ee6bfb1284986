"""Tiny random reward checkpoints in the real on-disk formats, for tests and `rlfew bench rewards --tiny`.

Each builder writes what the real loader reads (a CLIPModel folder, an HPS `.pt` in the OpenAI-CLIP
layout, `ImageReward.pt` in the original layout with `med_config.json`, a LAION head `.pth`), so the
tiny models exercise the same loading and conversion code as the released ones. Scores are meaningless.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rlfew.rewards.api import RewardSpec

# Enough words for test and benchmark prompts; anything else maps to <unk>.
TINY_WORDS = ("a an the photo of red green blue yellow circle square triangle cat dog sign that says hello "
              "open world above below left right two three on with and in").split()


def build_clip_tokenizer(max_length: int = 16):
    """Word-level tokenizer with CLIP's id convention: <|startoftext|>, <|endoftext|> are the last two ids
    (the end-of-text id is the largest, which OpenAI-CLIP pooling relies on)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tokens = ["<pad>", "<unk>", *TINY_WORDS, "<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    core = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", vocab["<|startoftext|>"]), ("<|endoftext|>", vocab["<|endoftext|>"])])
    return PreTrainedTokenizerFast(tokenizer_object=core, model_max_length=max_length, pad_token="<pad>",
                                   unk_token="<unk>", bos_token="<|startoftext|>", eos_token="<|endoftext|>")


def tiny_clip_config(vocab_size: int, image_size: int = 64, projection_dim: int = 32, hidden_act: str = "gelu",
                     max_positions: int = 16):
    from transformers import CLIPConfig

    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                vocab_size=vocab_size, max_position_embeddings=max_positions, hidden_act=hidden_act,
                eos_token_id=vocab_size - 1, bos_token_id=vocab_size - 2, pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=image_size, patch_size=16, hidden_act=hidden_act)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def build_tiny_clip(folder: str | Path, image_size: int = 64, projection_dim: int = 32, seed: int = 0) -> Path:
    """A CLIPModel folder (weights + tokenizer) loadable with `from_pretrained`."""
    from transformers import CLIPModel

    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer()
    model = CLIPModel(tiny_clip_config(len(tokenizer), image_size, projection_dim))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_tiny_aesthetic_head(file: str | Path, input_size: int = 32, seed: int = 0) -> Path:
    from rlfew.rewards.clip_rewards import RewardMLP

    torch.manual_seed(seed)
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(RewardMLP(input_size).state_dict(), file)
    return file


def build_tiny_hps(folder: str | Path, seed: int = 0) -> Path:
    """HPS_v2*_compressed.pt files (`{'state_dict': OpenAI-CLIP layout}`) plus a tokenizer folder."""
    from transformers import CLIPModel

    from rlfew.rewards.hpsv2 import HPS_FILES, transformers_to_openai_clip

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_clip_tokenizer()
    tokenizer.save_pretrained(folder / "tokenizer")
    for offset, filename in enumerate(HPS_FILES.values()):
        torch.manual_seed(seed + offset)
        model = CLIPModel(tiny_clip_config(len(tokenizer), image_size=32))
        torch.save({"state_dict": transformers_to_openai_clip(model.state_dict())}, folder / filename)
    return folder


def tiny_med_config(vocab_size: int) -> dict:
    """A tiny `med_config.json` (BLIP's BERT config; the real one is bert-base)."""
    return {"architectures": ["BertModel"], "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
            "intermediate_size": 64, "hidden_act": "gelu", "max_position_embeddings": 40, "layer_norm_eps": 1e-12,
            "vocab_size": vocab_size, "add_cross_attention": True, "pad_token_id": 0,
            "encoder_width": 768}  # as in BLIP's file; the loader must use the ViT's width instead


def build_bert_tokenizer(folder: str | Path) -> Path:
    """A WordPiece BertTokenizerFast from a vocab list (the real one is bert-base-uncased). transformers 5
    ignores `vocab_file=` here, so the vocabulary goes in as a dict."""
    from transformers import BertTokenizerFast

    folder = Path(folder)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *TINY_WORDS, "##s"]
    BertTokenizerFast(vocab={token: index for index, token in enumerate(vocab)}).save_pretrained(folder)
    return folder


def build_tiny_imagereward(folder: str | Path, seed: int = 0, initializer_range: float = 0.2) -> Path:
    """ImageReward.pt (original key layout) + med_config.json + a tokenizer folder. The large init range
    keeps image gradients measurable through the random network (the default init gives ~1e-9)."""
    from transformers import BlipTextConfig, BlipVisionConfig

    from rlfew.rewards.imagereward import ImageRewardModel, load_tokenizer, transformers_to_original

    folder = Path(folder)
    tokenizer = load_tokenizer(build_bert_tokenizer(folder / "tokenizer"))
    med = tiny_med_config(len(tokenizer))
    vision = BlipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, image_size=32, patch_size=16, layer_norm_eps=1e-6,
                              initializer_range=initializer_range)
    text = BlipTextConfig(vocab_size=med["vocab_size"], hidden_size=med["hidden_size"],
                          num_hidden_layers=med["num_hidden_layers"], num_attention_heads=med["num_attention_heads"],
                          intermediate_size=med["intermediate_size"],
                          max_position_embeddings=med["max_position_embeddings"],
                          encoder_hidden_size=vision.hidden_size, is_decoder=True,
                          initializer_range=initializer_range)
    torch.manual_seed(seed)
    model = ImageRewardModel(vision, text)
    torch.save(transformers_to_original(model.state_dict()), folder / "ImageReward.pt")
    (folder / "med_config.json").write_text(json.dumps(med, indent=1))
    return folder


def build_tiny_rewards(folder: str | Path, seed: int = 0) -> dict[str, RewardSpec]:
    """Every built-in model reward as a tiny checkpoint under `folder`; returns specs that load them."""
    folder = Path(folder)
    clip = build_tiny_clip(folder / "clip", seed=seed)
    head = build_tiny_aesthetic_head(folder / "aesthetic" / "head.pth", seed=seed)
    hps = build_tiny_hps(folder / "hps", seed=seed)
    imagereward = build_tiny_imagereward(folder / "imagereward", seed=seed)
    return {
        "pickscore": RewardSpec("pickscore", options={"model": str(clip), "processor": str(clip)}),
        "clipscore": RewardSpec("clipscore", options={"model": str(clip)}),
        "aesthetic": RewardSpec("aesthetic", options={"model": str(clip), "head": str(head)}),
        "hpsv2": RewardSpec("hpsv2", options={"checkpoint": str(hps), "tokenizer": str(hps / "tokenizer"),
                                                  "head_width": 16}),
        "hpsv2.1": RewardSpec("hpsv2.1", options={"checkpoint": str(hps), "tokenizer": str(hps / "tokenizer"),
                                                  "head_width": 16}),
        "imagereward": RewardSpec("imagereward", options={"checkpoint": str(imagereward),
                                                          "tokenizer": str(imagereward / "tokenizer"),
                                                          "head_width": 16}),
        "jpeg": RewardSpec("jpeg"),
    }
