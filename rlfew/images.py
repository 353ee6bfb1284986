"""Image conversions and captioned PNG grids (used by sample, eval, world render and training logs)."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B,3,H,W) float in [0,1] -> (B,H,W,3) uint8."""
    array = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return array.permute(0, 2, 3, 1).cpu().numpy()


def from_uint8(array: np.ndarray) -> torch.Tensor:
    """(B,H,W,3) or (H,W,3) uint8 -> (B,3,H,W) float in [0,1]."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if tensor.ndim == 3:
        tensor = tensor[None]
    return tensor.permute(0, 3, 1, 2).float() / 255.0


def make_grid(images: torch.Tensor | np.ndarray, captions: list[str] | None = None, columns: int | None = None,
              scale: int = 2) -> Image.Image:
    """Tile images into one picture, each with its caption written underneath.

    Small images (the embedded world's are 64x64) are upscaled by `scale` so captions stay legible.
    """
    array = to_uint8(images) if isinstance(images, torch.Tensor) else np.asarray(images)
    count, height, width = array.shape[:3]
    columns = columns or min(count, max(1, math.ceil(math.sqrt(count))))
    rows = math.ceil(count / columns)
    cell_w, cell_h = width * scale, height * scale
    font = ImageFont.load_default()
    chars_per_line = max(8, cell_w // 6)
    wrapped = [textwrap.wrap(c, chars_per_line)[:4] if c else [] for c in (captions or [""] * count)]
    text_h = 12 * max((len(lines) for lines in wrapped), default=0)
    grid = Image.new("RGB", (columns * cell_w, rows * (cell_h + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for index in range(count):
        row, column = divmod(index, columns)
        left, top = column * cell_w, row * (cell_h + text_h)
        tile = Image.fromarray(array[index]).resize((cell_w, cell_h), Image.NEAREST)
        grid.paste(tile, (left, top))
        for line_no, line in enumerate(wrapped[index]):
            draw.text((left + 2, top + cell_h + 12 * line_no), line, fill="black", font=font)
    return grid


def save_grid(path: str | Path, images, captions: list[str] | None = None, columns: int | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(images, captions, columns).save(path)
    return path
