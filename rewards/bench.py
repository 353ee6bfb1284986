"""Reward scoring throughput (exposed as `rlfew bench rewards`, which writes the returned dict as JSON)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from rlfew.rewards.api import RewardSpec, load_one, parse_reward_spec

# Rewards that only accept certain prompts get one they accept.
BENCH_PROMPTS = {"ocr": 'a sign that says "hello"', "world": "a red circle above a blue square"}
DEFAULT_PROMPT = "a photo of a red circle"


def benchmark_rewards(specs: str | Sequence[str | RewardSpec | dict], batch_size: int = 8, image_size: int = 64,
                      repeats: int = 3, warmup: int = 1, backward: bool = False, seed: int = 0) -> dict:
    """Time `score` on random images for each reward; with `backward`, differentiable rewards also
    back-propagate to the images (the reward-gradient path). Returns load time, seconds per batch (best of
    `repeats`, after `warmup` untimed calls) and images/s per reward, plus the settings."""
    generator = torch.Generator().manual_seed(seed)
    results = {}
    for spec in parse_reward_spec(specs):
        started = time.perf_counter()
        reward = load_one(spec)
        load_seconds = time.perf_counter() - started
        prompts = [BENCH_PROMPTS.get(spec.name, DEFAULT_PROMPT)] * batch_size
        images = torch.rand(batch_size, 3, image_size, image_size, generator=generator)
        with_grad = backward and reward.differentiable
        timings = []
        for call in range(warmup + repeats):
            batch = images.clone().requires_grad_(with_grad)
            started = time.perf_counter()
            with torch.set_grad_enabled(with_grad):
                scores = reward.score(batch, prompts)
                if with_grad:
                    scores.sum().backward()
            if call >= warmup:
                timings.append(time.perf_counter() - started)
        best = min(timings)
        results[spec.name] = {"differentiable": reward.differentiable, "backward": with_grad,
                              "load_s": round(load_seconds, 4), "seconds_per_batch": round(best, 5),
                              "images_per_s": round(batch_size / best, 2)}
    return {"batch_size": batch_size, "image_size": image_size, "repeats": repeats,
            "torch_threads": torch.get_num_threads(), "rewards": results}
