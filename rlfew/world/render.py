"""Crisp (not anti-aliased) rendering of world scenes; sharp edges keep the exact evaluator exact."""

from __future__ import annotations

import numpy as np
import torch

from rlfew.world.prompts import BACKGROUND_RGB, COLOURS, Scene, SceneObject, sample_scene


def _object_mask(obj: SceneObject, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Pixels (given by their centres in canvas coordinates) covered by `obj`."""
    cx, cy = obj.centre
    half = obj.size / 2
    if obj.shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= half ** 2
    if obj.shape == "square":
        return (np.abs(xs - cx) < half) & (np.abs(ys - cy) < half)
    if obj.shape == "triangle":  # apex up, base = height = size: fills half its bounding box
        depth = ys - (cy - half)
        return (depth >= 0) & (ys <= cy + half) & (np.abs(xs - cx) <= depth / 2)
    raise ValueError(f"unknown shape {obj.shape!r}")


def render(scene: Scene, size: int = 64) -> np.ndarray:
    """The scene as a (size, size, 3) uint8 image."""
    scale = scene.canvas / size
    centres = (np.arange(size) + 0.5) * scale
    xs, ys = np.meshgrid(centres, centres)
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = BACKGROUND_RGB
    for obj in scene.objects:
        image[_object_mask(obj, xs, ys)] = COLOURS[obj.colour]
    return image


def render_prompt(prompt: str, seed: int, size: int = 64) -> np.ndarray:
    """One random render of `prompt` (uint8 HWC); the same seed gives the same image."""
    return render(sample_scene(prompt, np.random.default_rng(seed)), size)


def render_batch(prompts: list[str], seed: int, size: int = 64) -> torch.Tensor:
    """Random renders of `prompts` as a (B, 3, size, size) float tensor in [0, 1]; deterministic for a seed."""
    rng = np.random.default_rng(seed)
    images = np.stack([render(sample_scene(p, rng), size) for p in prompts])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
