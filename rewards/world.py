"""Rewards of the embedded world (rlfew/world): its exact evaluator and its CLIP."""

from __future__ import annotations

from pathlib import Path

from rlfew.errors import UsageError
from rlfew.rewards.api import Reward
from rlfew.rewards.clip_rewards import ClipEmbeddingReward, PickScore, image_normalisation
from rlfew.rewards.checkpoints import parse_dtype


class WorldEvaluatorReward(Reward):
    """The world's exact evaluator (GenEval for shapes). `mode="checks"`: the fraction of the caption's
    checks that pass (counts, no extra objects, relations), a denser signal; `mode="correct"`: 1.0 when
    every check passes, else 0.0 (GenEval's accuracy). Captions outside the world grammar raise."""

    name = "world"
    differentiable = False
    MODES = ("checks", "correct")

    def __init__(self, mode: str = "checks"):
        if mode not in self.MODES:
            raise UsageError(f"world reward: mode {mode!r} is not one of {', '.join(self.MODES)}")
        self.mode = mode

    def compute(self, images, prompts, **meta):
        from rlfew.world.evaluator import evaluate

        results = evaluate(images, prompts)
        if self.mode == "correct":
            return [float(result.correct) for result in results]
        return [sum(check.passed for check in result.checks) / len(result.checks) for result in results]


class WorldClip(PickScore):
    """The world's small CLIP (asset `world:clip`, or any CLIPModel folder), scored exactly like PickScore:
    logit_scale.exp() * cos(image, prompt)."""

    name = "world-clip"

    def __init__(self, model: str | Path = "world:clip", device: str = "cpu", dtype: str = "float32"):
        from transformers import AutoTokenizer, CLIPModel

        from rlfew.world import resolve_world_asset

        folder = resolve_world_asset(model) if str(model).startswith("world:") else Path(model)
        clip = CLIPModel.from_pretrained(str(folder), dtype=parse_dtype(dtype))
        if (folder / "tokenizer_config.json").is_file():
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
        else:  # the world tokenizer is built in code, so an asset need not store it
            from rlfew.world.tokenizer import build_tokenizer

            tokenizer = build_tokenizer(clip.config.text_config.max_position_embeddings)
        # PickScore's scoring on a different checkpoint: skip only PickScore's hub-default loading
        ClipEmbeddingReward.__init__(self, clip, tokenizer, *image_normalisation(folder), device=device)
