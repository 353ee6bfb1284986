"""Model rewards on tiny random checkpoints written in the real formats and loaded through the real
loading paths (no hub): PickScore, CLIP score, aesthetic, HPSv2 (with an OpenAI-CLIP reference
implementation), ImageReward (key mapping), world rewards, OCR, gradients, benchmark."""

from __future__ import annotations

import math
import re
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from rlfew.errors import ModelLoadError, RewardError
from rlfew.rewards import benchmark_rewards, load
from rlfew.rewards.clip_rewards import PickScore, preprocess_images
from rlfew.rewards.hpsv2 import (HPS_FILES, openai_clip_to_transformers, transformers_to_openai_clip)
from rlfew.rewards.imagereward import load_tokenizer, original_to_transformers, transformers_to_original
from rlfew.rewards.tiny import build_clip_tokenizer, build_tiny_rewards

PROMPTS = ["a photo of a red circle", "a blue square", "a photo of a red circle"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_rewards")
    return folder, build_tiny_rewards(folder)


def random_images(batch=3, size=64, seed=0, requires_grad=False):
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return images.requires_grad_(requires_grad)


def assert_gradient_reaches_images(reward, size=64):
    images = random_images(size=size, requires_grad=True)
    reward.score(images, PROMPTS).sum().backward()
    assert torch.isfinite(images.grad).all()
    assert images.grad.abs().max() > 0


# ------------------------------------------------------------------------------------- preprocessing

def test_preprocessing_matches_pil_bicubic_resize_and_centre_crop():
    rng = np.random.default_rng(0)
    # Smooth content, so the comparison measures the resize rather than aliasing of pure noise.
    array = (Image.fromarray(rng.integers(0, 256, (12, 18, 3), dtype=np.uint8)).resize((144, 96), Image.BICUBIC))
    pil = array.resize((96, 64), Image.BICUBIC)  # shorter side 96 -> 64
    pil = np.asarray(pil)[:, 16:80].astype(np.float32) / 255  # centre crop 64x64
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    expected = (torch.from_numpy(pil).permute(2, 0, 1)[None] - torch.tensor(mean).view(1, 3, 1, 1)) \
        / torch.tensor(std).view(1, 3, 1, 1)
    images = torch.from_numpy(np.asarray(array).astype(np.float32) / 255).permute(2, 0, 1)[None]
    got = preprocess_images(images, 64, mean, std)
    assert got.shape == (1, 3, 64, 64)
    # PIL rounds to uint8 and filters slightly differently: agreement within ~2/255 in pixel units.
    assert ((got - expected) * torch.tensor(std).view(1, 3, 1, 1)).abs().max() < 2.5 / 255


# --------------------------------------------------------------------------------------- CLIP family

def test_pickscore_equals_clipmodel_logits(tiny):
    folder, specs = tiny
    reward = load(specs["pickscore"])
    assert isinstance(reward, PickScore) and reward.differentiable
    images = random_images()
    tokens = reward.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = reward.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                              pixel_values=preprocess_images(images, 64)).logits_per_image
        scores = reward.score(images, PROMPTS)
    torch.testing.assert_close(scores, logits.diagonal())
    assert scores[0] != scores[1]  # the prompt matters


def test_clipscore_is_100_times_positive_cosine(tiny):
    _, specs = tiny
    reward = load(specs["clipscore"])
    images = random_images()
    with torch.no_grad():
        cosine = reward.cosine(images, PROMPTS)
        torch.testing.assert_close(reward.score(images, PROMPTS), 100 * cosine.clamp(min=0))
        direct = F.cosine_similarity(
            reward.model.get_image_features(pixel_values=preprocess_images(images, 64)).pooler_output,
            reward.model.get_text_features(**reward.tokenizer(PROMPTS, padding=True, return_tensors="pt")).pooler_output)
    torch.testing.assert_close(cosine, direct)


def test_aesthetic_is_the_mlp_on_normalised_image_embeddings(tiny):
    _, specs = tiny
    reward = load(specs["aesthetic"])
    images = random_images()
    head_state = torch.load(specs["aesthetic"].options["head"], weights_only=True)
    assert sorted(head_state) == [f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("bias", "weight")]
    with torch.no_grad():
        embeddings = F.normalize(reward.model.get_image_features(
            pixel_values=preprocess_images(images, 64)).pooler_output, dim=-1)
        x = embeddings
        for index in (0, 2, 4, 6, 7):  # the released head has no activations between its Linear layers
            x = F.linear(x, head_state[f"layers.{index}.weight"], head_state[f"layers.{index}.bias"])
        torch.testing.assert_close(reward.score(images, ["ignored"] * 3), x.squeeze(-1))


def test_aesthetic_rejects_a_head_of_the_wrong_width(tiny, tmp_path):
    from rlfew.rewards.tiny import build_tiny_aesthetic_head

    _, specs = tiny
    head = build_tiny_aesthetic_head(tmp_path / "head.pth", input_size=768)
    with pytest.raises(ModelLoadError, match="does not match the LAION MLP 32->1024"):
        load("aesthetic", **{**specs["aesthetic"].options, "head": str(head)})


@pytest.mark.parametrize("name", ["pickscore", "clipscore", "aesthetic", "hpsv2", "hpsv2.1", "imagereward"])
def test_gradient_reaches_input_images(tiny, name):
    assert_gradient_reaches_images(load(tiny[1][name]))


def test_repeated_prompts_score_like_separate_calls(tiny):
    reward = load(tiny[1]["pickscore"])
    images = random_images()
    with torch.no_grad():
        together = reward.score(images, PROMPTS)
        apart = torch.cat([reward.score(images[i:i + 1], PROMPTS[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(together, apart)


def test_gradient_reaches_a_generator_through_the_vae_decode(tiny):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8,
                        latent_channels=4, sample_size=64).requires_grad_(False)
    latent = nn.Parameter(torch.randn(2, 4, 8, 8))
    images = (vae.decode(latent / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    assert images.shape == (2, 3, 64, 64)
    load(tiny[1]["pickscore"]).score(images, PROMPTS[:2]).sum().backward()
    assert torch.isfinite(latent.grad).all() and latent.grad.abs().max() > 0


# ------------------------------------------------------------------------------------------- HPSv2

class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """OpenAI CLIP's block: pre-LN, nn.MultiheadAttention (sequence-first), MLP c_fc -> act -> c_proj."""

    def __init__(self, width, heads, activation):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=activation(),
                                             c_proj=nn.Linear(4 * width, width)))

    def forward(self, x, attn_mask=None):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, activation):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, activation) for _ in range(layers))

    def forward(self, x, attn_mask=None):
        for block in self.resblocks:
            x = block(x, attn_mask)
        return x


class VisionTransformer(nn.Module):
    def __init__(self, image_size, patch, width, layers, heads, embed_dim, activation):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width) * width ** -0.5)
        self.positional_embedding = nn.Parameter(torch.randn((image_size // patch) ** 2 + 1, width) * width ** -0.5)
        self.ln_pre, self.ln_post = nn.LayerNorm(width), nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, activation)
        self.proj = nn.Parameter(torch.randn(width, embed_dim) * width ** -0.5)

    def forward(self, x):
        x = self.conv1(x).flatten(2).permute(0, 2, 1)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x).permute(1, 0, 2)).permute(1, 0, 2)
        return self.ln_post(x[:, 0]) @ self.proj


class OpenAIClip(nn.Module):
    """The documented OpenAI-CLIP architecture (as in open_clip), with its state-dict key layout."""

    def __init__(self, vocab_size, context=16, width=32, layers=2, heads=2, embed_dim=24, image_size=32, patch=16,
                 activation=nn.GELU):
        super().__init__()
        self.visual = VisionTransformer(image_size, patch, width, layers, heads, embed_dim, activation)
        self.transformer = Transformer(width, layers, heads, activation)
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.randn(context, width) * 0.01)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.randn(width, embed_dim) * width ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        for parameter in self.parameters():  # LayerNorms start at 1/0: perturb everything so mistakes show
            parameter.data.add_(0.1 * torch.randn_like(parameter))

    def encode_image(self, pixels):
        return self.visual(pixels)

    def encode_text(self, text):
        length = text.shape[1]
        causal = torch.full((length, length), float("-inf")).triu(1)
        x = self.token_embedding(text) + self.positional_embedding[:length]
        x = self.ln_final(self.transformer(x.permute(1, 0, 2), causal).permute(1, 0, 2))
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection  # EOT has the largest id


@pytest.mark.parametrize("hidden_act, activation", [("gelu", nn.GELU), ("quick_gelu", QuickGELU)])
def test_hps_converter_matches_openai_clip_reference(hidden_act, activation):
    from rlfew.rewards.hpsv2 import load_openai_clip_as_transformers

    torch.manual_seed(0)
    tokenizer = build_clip_tokenizer()
    reference = OpenAIClip(len(tokenizer), activation=activation).eval()
    model = load_openai_clip_as_transformers(reference.state_dict(), hidden_act=hidden_act, head_width=16).eval()
    pixels = torch.randn(3, 3, 32, 32)
    tokens = tokenizer(PROMPTS + ["a"], padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model.get_image_features(pixel_values=pixels).pooler_output,
                                   reference.encode_image(pixels), atol=1e-5, rtol=0)
        torch.testing.assert_close(
            model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output,
            reference.encode_text(tokens["input_ids"]), atol=1e-5, rtol=0)
    assert model.logit_scale.item() == reference.logit_scale.item()


def test_hps_converter_round_trips_and_rejects_unknown_keys():
    torch.manual_seed(1)
    state = OpenAIClip(40).state_dict()
    back = transformers_to_openai_clip(openai_clip_to_transformers(state))
    assert back.keys() == state.keys()
    assert all(torch.equal(back[key], state[key]) for key in state)
    with pytest.raises(ModelLoadError, match="unknown keys.*visual.extra"):
        openai_clip_to_transformers({**state, "visual.extra.weight": torch.zeros(1)})


def test_hps_reward_scores_the_reference_cosine(tmp_path):
    torch.manual_seed(2)
    tokenizer = build_clip_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    reference = OpenAIClip(len(tokenizer)).eval()
    # DDP-style "module." prefix and the {'state_dict': ...} wrapper, as released checkpoints carry
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}},
               tmp_path / HPS_FILES["v2.1"])
    reward = load("hpsv2.1", checkpoint=str(tmp_path), tokenizer=str(tmp_path / "tokenizer"), head_width=16)
    images = random_images(size=48)
    tokens = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = F.cosine_similarity(reference.encode_image(preprocess_images(images, 32)),
                                       reference.encode_text(tokens["input_ids"]))
        torch.testing.assert_close(reward.score(images, PROMPTS), expected, atol=1e-5, rtol=0)
    with pytest.raises(ModelLoadError, match="HPS_v2_compressed.pt"):
        load("hpsv2", checkpoint=str(tmp_path), tokenizer=str(tmp_path / "tokenizer"))


# ------------------------------------------------------------------------------------- ImageReward

ORIGINAL_KEY_PATTERNS = {  # the original layout, as listed in OFFLINE.md
    r"blip\.visual_encoder\.cls_token", r"blip\.visual_encoder\.pos_embed",
    r"blip\.visual_encoder\.patch_embed\.proj\.(weight|bias)",
    r"blip\.visual_encoder\.blocks\.\d+\.(norm1|attn\.qkv|attn\.proj|norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias)",
    r"blip\.visual_encoder\.norm\.(weight|bias)", r"blip\.text_encoder\..+", r"mlp\.layers\.[02467]\.(weight|bias)",
}


def test_imagereward_checkpoint_layout_maps_every_key_exactly(tiny):
    folder, _ = tiny
    original = torch.load(folder / "imagereward" / "ImageReward.pt", weights_only=True)
    assert all(any(re.fullmatch(p, key) for p in ORIGINAL_KEY_PATTERNS) for key in original)
    assert all(any(re.fullmatch(p, key) for key in original) for p in ORIGINAL_KEY_PATTERNS)
    assert not any("position_ids" in key for key in original)
    reward = load(tiny[1]["imagereward"])  # loads with strict=True: no missing or unexpected keys
    converted = original_to_transformers(original)
    assert converted.keys() == reward.model.state_dict().keys()
    back = transformers_to_original(converted)
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in original)
    assert all(torch.equal(reward.model.state_dict()[k], v) for k, v in converted.items())


def test_imagereward_converter_skips_unused_heads_and_rejects_unknown_keys(tiny):
    folder, _ = tiny
    original = torch.load(folder / "imagereward" / "ImageReward.pt", weights_only=True)
    extras = {"blip.vision_proj.weight": torch.zeros(2, 32), "blip.text_proj.bias": torch.zeros(2),
              "blip.text_encoder.embeddings.position_ids": torch.arange(40)[None]}
    assert original_to_transformers({**original, **extras}).keys() == original_to_transformers(original).keys()
    with pytest.raises(ModelLoadError, match="unknown keys.*blip.itm_head.weight"):
        original_to_transformers({**original, "blip.itm_head.weight": torch.zeros(2, 32)})


def test_imagereward_tokenizer_has_blip_tokens(tiny):
    from transformers import AutoTokenizer

    folder, _ = tiny
    base = len(AutoTokenizer.from_pretrained(folder / "imagereward" / "tokenizer"))
    tokenizer = load_tokenizer(folder / "imagereward" / "tokenizer")
    assert tokenizer.bos_token == "[DEC]" and tokenizer.convert_tokens_to_ids("[DEC]") == base
    assert tokenizer.convert_tokens_to_ids("[ENC]") == base + 1
    ids = tokenizer("a red circle")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id  # scored from [CLS], as released
    assert tokenizer.unk_token_id not in ids


def test_imagereward_is_deterministic_and_reads_image_and_prompt(tiny):
    spec = tiny[1]["imagereward"]
    images = random_images()
    with torch.no_grad():
        first = load(spec).score(images, PROMPTS)
        again = load(spec).score(images, PROMPTS)
        other_images = load(spec).score(random_images(seed=1), PROMPTS)
        same_length_prompt = load(spec).score(images[:1], ["a photo of a blue circle"])
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    assert first[0] != same_length_prompt[0]  # the words matter, not only the prompt length
    assert not torch.allclose(first, other_images)  # and the image matters


# ------------------------------------------------------------------------------------------- world

def test_world_reward_checks_rendered_captions():
    from rlfew.world.render import render_batch

    prompts = ["a red circle left of a blue square", "three squares"]
    images = render_batch(prompts, seed=0)
    assert load("world", mode="correct").score(images, prompts).tolist() == [1.0, 1.0]
    swapped = prompts[::-1]
    correct = load("world", mode="correct").score(images, swapped)
    fraction = load("world").score(images, swapped)
    assert correct.tolist() == [0.0, 0.0]
    assert ((fraction >= 0) & (fraction < 1)).all()
    with pytest.raises(RewardError, match="'world'.*purple elephant"):
        load("world").score(images[:1], ["a purple elephant"])


def test_world_clip_is_scored_through_the_pickscore_path(tmp_path, monkeypatch):
    from transformers import CLIPModel

    from rlfew.rewards.tiny import tiny_clip_config
    from rlfew.rewards.world import WorldClip
    from rlfew.world.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = tiny_clip_config(len(tokenizer), max_positions=16)
    config.text_config.eos_token_id = tokenizer.eos_token_id  # pooling reads it at construction
    model = CLIPModel(config).eval()
    model.save_pretrained(tmp_path / "clip")  # like the world asset: weights only, tokenizer built in code
    monkeypatch.setattr("rlfew.world.resolve_world_asset",
                        lambda name: tmp_path / "clip" if name == "world:clip" else pytest.fail(name))
    reward = load("world-clip")
    assert isinstance(reward, WorldClip) and isinstance(reward, PickScore) and reward.differentiable
    prompts = ["a red circle", "two blue squares"]
    images = random_images(batch=2)
    tokens = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**tokens, pixel_values=preprocess_images(images, 64)).logits_per_image
        torch.testing.assert_close(reward.score(images, prompts), logits.diagonal())


# --------------------------------------------------------------------------------------------- OCR

def test_text_similarity_closed_forms():
    from rlfew.rewards.ocr import edit_distance, quoted_text, text_similarity

    assert edit_distance("kitten", "sitting") == 3 and edit_distance("", "abc") == 3
    assert quoted_text('a sign that says "Open Late" in neon') == "Open Late"
    assert text_similarity("OPEN LATE", "open late") == 1.0
    assert text_similarity("xx open late xx", "Open Late") == 1.0  # contained
    assert text_similarity("opan", "open") == pytest.approx(0.75)
    assert text_similarity("", "open") == 0.0


def test_ocr_reward_reads_rendered_text():
    pytest.importorskip("rapidocr", reason="OCR reward needs the optional 'ocr' extra (rapidocr, onnxruntime)")
    canvas = Image.new("RGB", (256, 96), "white")
    ImageDraw.Draw(canvas).text((12, 28), "HELLO", fill="black", font=ImageFont.load_default(size=36))
    image = torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1)[None].float() / 255
    reward = load("ocr")
    scores = reward.score(image.repeat(2, 1, 1, 1), ['a sign that says "hello"', 'a sign that says "goodbye"'])
    assert scores[0] == 1.0 and scores[1] < 0.5
    with pytest.raises(RewardError, match="'ocr'.*double quotes.*no quotes here"):
        reward.score(image, ["no quotes here"])


# --------------------------------------------------------------------------------------- benchmark

def test_benchmark_reports_throughput_per_reward(tiny):
    _, specs = tiny
    report = benchmark_rewards([specs["pickscore"], "jpeg"], batch_size=2, image_size=32, repeats=1, warmup=0,
                               backward=True)
    assert set(report["rewards"]) == {"pickscore", "jpeg"}
    assert report["rewards"]["pickscore"]["backward"] and not report["rewards"]["jpeg"]["backward"]
    assert all(entry["images_per_s"] > 0 for entry in report["rewards"].values())


def test_reward_to_moves_every_network_of_single_and_multi_rewards(tiny):
    specs = tiny[1]
    multi = load([specs["pickscore"], specs["aesthetic"]])
    multi.to("meta")
    for reward, _ in multi.parts:
        modules = [v for v in vars(reward).values() if isinstance(v, nn.Module)]
        assert modules and all(p.device.type == "meta" for m in modules for p in m.parameters())
