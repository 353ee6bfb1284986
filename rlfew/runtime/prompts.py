"""Where a run's prompts come from, in groups: each step draws `prompts_per_step` prompts and repeats each one
`group_size` times; the copies of a prompt share a group id and stay together on one learner."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rlfew.errors import UsageError
from rlfew.runtime.seeds import PROMPT_STREAM, step_seed


def read_prompts(spec: str | None, literal: list[str] | None = None) -> list[str]:
    """Prompts from literal values, or a spec: `world:train`, `world:eval` or a text file (one prompt a line)."""
    if literal:
        return list(literal)
    if not spec:
        raise UsageError("give --prompt TEXT (repeatable) or --prompts world:eval|FILE")
    if spec.startswith("world:"):
        from rlfew.world.prompts import load_prompts

        return load_prompts(spec)
    path = Path(spec)
    if not path.is_file():
        raise UsageError(f"prompt file {spec!r} does not exist")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"prompt file {spec!r} has no prompts")
    return prompts


@dataclass
class PromptBatch:
    """One step's prompts: `group_size` consecutive copies of each drawn prompt, with explicit group ids."""

    prompts: list[str]
    group_ids: np.ndarray  # (B,) int64, 0 .. groups−1 in order
    group_size: int

    def __len__(self) -> int:
        return len(self.prompts)

    def shard(self, count: int) -> list["PromptBatch"]:
        """`count` equal blocks of whole groups, in order (shard r goes to learner r)."""
        groups = len(self) // self.group_size
        if groups % count:
            raise UsageError(f"{groups} prompt groups cannot be split evenly over {count} learners")
        size = len(self) // count
        return [PromptBatch(self.prompts[r * size:(r + 1) * size], self.group_ids[r * size:(r + 1) * size],
                            self.group_size) for r in range(count)]


class PromptSource:
    """Prompts for a step, drawn with replacement from a fixed list by a generator seeded from (seed, step)."""

    def __init__(self, spec: str, seed: int):
        self.prompts = read_prompts(spec)
        self.seed = seed

    def groups(self, step: int, prompts_per_step: int, group_size: int) -> PromptBatch:
        rng = np.random.default_rng(step_seed(self.seed, step, PROMPT_STREAM))
        drawn = [self.prompts[i] for i in rng.integers(0, len(self.prompts), prompts_per_step)]
        return PromptBatch(prompts=[p for p in drawn for _ in range(group_size)],
                           group_ids=np.repeat(np.arange(prompts_per_step, dtype=np.int64), group_size),
                           group_size=group_size)
