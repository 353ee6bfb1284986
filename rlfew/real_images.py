"""Real images for methods that need data (DMD2's GAN head): world renders, or a folder of the user's images.

A source draws a batch from a torch generator (the learner's, which checkpoints with the run), so a resumed run
sees the same real images as an uninterrupted one. `sample` returns images in [0, 1] and their captions, or
None for captions when the source has none.
"""

from __future__ import annotations

import abc
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from rlfew.errors import UsageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class RealImages(abc.ABC):
    captioned: bool  # whether `sample` returns captions
    @abc.abstractmethod
    def sample(self, count: int, resolution: int, rng: torch.Generator) -> tuple[torch.Tensor, list[str] | None]:
        """`count` images (count, 3, resolution, resolution) in [0, 1], and their captions (or None)."""


class WorldRenders(RealImages):
    """Fresh renders of random world captions of one split, captioned."""

    captioned = True

    def __init__(self, split: str = "train"):
        self.split = split

    def sample(self, count, resolution, rng):
        from rlfew.world.prompts import random_prompt
        from rlfew.world.render import render_batch

        seed = int(torch.randint(2**62, (1,), generator=rng, device=rng.device))
        prompt_rng = np.random.default_rng(seed)
        captions = [random_prompt(prompt_rng, split=self.split) for _ in range(count)]
        return render_batch(captions, seed=seed, size=resolution), captions


class ImageFolder(RealImages):
    """Every image directly in `folder` (png, jpg, jpeg, webp, bmp), resized on its shorter side and centre-cropped.
    Captions come from `<image stem>.txt` files beside the images, when every image has one."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise UsageError(f"real image folder {str(self.folder)!r} does not exist")
        self.files = sorted(p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise UsageError(f"real image folder {str(self.folder)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        caption_files = [p.with_suffix(".txt") for p in self.files]
        missing = [p.name for p in caption_files if not p.is_file()]
        if missing and len(missing) < len(caption_files):
            raise UsageError(f"real image folder {str(self.folder)!r}: {len(missing)} of {len(caption_files)} images "
                             f"have no caption file (e.g. {', '.join(missing[:3])}); caption every image or none")
        self.captions = None if missing else [p.read_text(encoding="utf-8").strip() for p in caption_files]
        self.captioned = self.captions is not None

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int, resolution: int) -> torch.Tensor:
        path = self.files[index]
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
        except (UnidentifiedImageError, OSError) as err:
            raise UsageError(f"real image {str(path)!r} cannot be read: {err}") from err
        scale = resolution / min(image.size)
        width, height = max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))
        image = image.resize((width, height), Image.Resampling.BICUBIC)
        left, top = (width - resolution) // 2, (height - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)

    def sample(self, count, resolution, rng):
        indices = torch.randint(len(self.files), (count,), generator=rng, device=rng.device).tolist()
        images = torch.stack([self.load(i, resolution) for i in indices])
        return images, None if self.captions is None else [self.captions[i] for i in indices]


def load_real_images(spec: str) -> RealImages:
    """`world:train` / `world:eval` (renders of that split's captions) or a folder of images."""
    if spec.startswith("world:"):
        split = spec.split(":", 1)[1]
        if split not in ("train", "eval"):
            raise UsageError(f"unknown real image source {spec!r}; choose world:train, world:eval or a folder")
        return WorldRenders(split)
    return ImageFolder(spec)
