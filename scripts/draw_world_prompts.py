"""Draw a prompt file from the world grammar: `python scripts/draw_world_prompts.py OUT [COUNT] [SEED] [SPLIT]`.

Categories uniformly, captions uniformly within a category. SPLIT eval (the default; no caption twice): colour-naming
captions hold at least one held-out colour-shape pair, a second evaluation set beside world:eval (whose fixed sample
caps each category at 24 captions), so a gain is not a property of one prompt list. SPLIT train (with replacement): a
category-balanced training file; world:train lists every caption once, so 76% of it is position captions."""

import sys
from pathlib import Path

import numpy as np

from rlfew.world.prompts import CATEGORIES, category_captions, random_prompt


def draw(count: int, seed: int, split: str = "eval") -> list[str]:
    rng = np.random.default_rng(seed)
    if split == "train":  # with replacement: a training file may be longer than the split
        return [random_prompt(rng, split="train") for _ in range(count)]
    pools = {category: list(category_captions(category, split)) for category in CATEGORIES}
    for pool in pools.values():
        rng.shuffle(pool)
    prompts: list[str] = []
    while len(prompts) < count and any(pools.values()):
        category = CATEGORIES[rng.integers(len(CATEGORIES))]
        if pools[category]:
            prompts.append(pools[category].pop())
    return prompts


if __name__ == "__main__":
    out = Path(sys.argv[1])
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 96
    seed = int(sys.argv[3]) if len(sys.argv) > 3 else 7
    split = sys.argv[4] if len(sys.argv) > 4 else "eval"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(draw(count, seed, split)) + "\n")
