"""Every random stream of a run is seeded from (run seed, step, stream, ...), so a resumed run draws exactly what an
uninterrupted one would, and a shard draws the same noise whichever actor rolls it out."""

from __future__ import annotations

import numpy as np
import torch

# ROLLOUT: initial and kernel noise, per shard. METHOD_SHARED: a learner's choices that every rank must make
# alike (the backward-simulation step k). METHOD_RANK: a learner's own noise levels and noise, per rank. WINDOW: a
# method's per-iteration choice that rollout actors must make alike without a learner (GRPO's random SDE window).
ROLLOUT_STREAM, METHOD_SHARED_STREAM, PROMPT_STREAM, SAMPLES_STREAM, METHOD_RANK_STREAM, WINDOW_STREAM = range(6)


def step_seed(seed: int, step: int, stream: int, *more: int) -> int:
    """Independent, reproducible seeds per (run seed, step, stream, extra keys such as the shard or the rank).

    SeedSequence ignores trailing zeros ([s, t, k, 0] seeds like [s, t, k]), so a stream must either always or
    never take extra keys: then no two streams collide."""
    return int(np.random.SeedSequence([seed, step, stream, *more]).generate_state(1)[0])


def seeded_generator(device: str | torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device).manual_seed(seed)
