"""Draw a prompt file from the world grammar: `python scripts/draw_world_prompts.py OUT [COUNT] [SEED]`.

Categories uniformly, captions uniformly within a category, from the held-out split ('eval': colour-naming captions
hold at least one held-out colour-shape pair), without repeats; a second evaluation set beside world:eval (whose
fixed sample caps each category at 24 captions), so a gain is not a property of one prompt list."""

import sys
from pathlib import Path

import numpy as np

from rlfew.world.prompts import CATEGORIES, category_captions


def draw(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    pools = {category: list(category_captions(category, "eval")) for category in CATEGORIES}
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
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(draw(count, seed)) + "\n")
