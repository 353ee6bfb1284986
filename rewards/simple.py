"""Rewards computed directly from pixels."""

from __future__ import annotations

import io

from PIL import Image

from rlfew.images import to_uint8
from rlfew.rewards.api import Reward


class JpegCompressibility(Reward):
    """Negative JPEG file size in kB (DDPO's "compressibility" task): higher means a simpler image.
    Images are quantised to uint8 and saved with PIL at `quality` (DDPO used 95)."""

    name = "jpeg"
    differentiable = False

    def __init__(self, quality: int = 95):
        self.quality = int(quality)

    def compute(self, images, prompts, **meta):
        sizes = []
        for array in to_uint8(images):
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format="JPEG", quality=self.quality)
            sizes.append(buffer.tell() / 1000)
        return [-size for size in sizes]
