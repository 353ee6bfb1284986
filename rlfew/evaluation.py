"""Evaluate a few-step generator on the embedded world: exact accuracy, FD, diversity and CLIP score.

Features for FD and diversity come from the world CLIP's image tower (the world's analogue of Inception /
CLIP features); the FD reference set is renders of the same prompts.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch

from rlfew.models.roles import Role
from rlfew.sampling import Deterministic, sample


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets: |μa−μb|² + Tr(Σa + Σb − 2(ΣaΣb)^½)."""
    mu_a, mu_b = features_a.mean(0), features_b.mean(0)
    cov_a, cov_b = np.cov(features_a, rowvar=False), np.cov(features_b, rowvar=False)
    root, _ = scipy.linalg.sqrtm(cov_a @ cov_b, disp=False)
    root = root.real  # numerical noise can leave a tiny imaginary part
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def mean_pairwise_distance(features: np.ndarray, groups: list[int]) -> float:
    """Mean Euclidean distance between features of images that share a prompt (averaged over prompts)."""
    groups_arr = np.asarray(groups)
    per_group = []
    for group in np.unique(groups_arr):
        members = features[groups_arr == group]
        if len(members) < 2:
            continue
        distances = np.linalg.norm(members[:, None] - members[None], axis=-1)
        per_group.append(distances[np.triu_indices(len(members), 1)].mean())
    return float(np.mean(per_group)) if per_group else float("nan")


def generate(role: Role, prompts: list[str], steps: int, seed: int, guidance: float = 1.0, batch_size: int = 64,
             shift: float | None = None, resolution: int | None = None) -> torch.Tensor:
    """Deterministic few-step samples, image i seeded by (seed, i) so results do not depend on batch size."""
    adapter = role.adapter
    resolution = resolution or adapter.default_resolution
    shape = adapter.latent_shape(resolution)
    images = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + start + i))
                                 for i in range(len(chunk))]).to(adapter.device)
            trajectory = sample(role, adapter.encode_prompts(chunk), adapter.sigma_grid(steps, shift, resolution), Deterministic(),
                                prompts=chunk, noise=noise, guidance=guidance)
            images.append(trajectory.images.cpu())
    return torch.cat(images)


def evaluate_images(images: torch.Tensor, prompts: list[str], seed: int = 0) -> dict:
    """World metrics of images (B,3,H,W) in [0,1] for their prompts (one entry per image)."""
    from rlfew.world.clip import embed_images, embed_texts, load_world_clip
    from rlfew.world.evaluator import accuracy_report, evaluate
    from rlfew.world.render import render_batch

    report = accuracy_report(evaluate(images, prompts))
    clip, tokenizer = load_world_clip()
    with torch.no_grad():
        generated = torch.cat([embed_images(clip, images[i:i + 256]) for i in range(0, len(images), 256)])
        renders = render_batch(prompts, seed)
        reference = torch.cat([embed_images(clip, renders[i:i + 256]) for i in range(0, len(renders), 256)])
        unique = list(dict.fromkeys(prompts))
        text = embed_texts(clip, tokenizer, unique)
        text_of = text[[unique.index(p) for p in prompts]]
    groups = [unique.index(p) for p in prompts]
    return {
        "accuracy": report["accuracy"],
        "image_accuracy": report["image_accuracy"],
        "accuracy_by_category": report["accuracy_by_category"],
        "check_accuracy": report["check_accuracy"],
        "fd": frechet_distance(generated.double().numpy(), reference.double().numpy()),
        "diversity": mean_pairwise_distance(generated.double().numpy(), groups),
        "clip_score": float(100 * (generated * text_of).sum(-1).clamp_min(0).mean()),
        "n_images": len(prompts),
        "n_prompts": len(unique),
    }


def evaluate_role(role: Role, prompts: list[str], steps: int, images_per_prompt: int = 4, seed: int = 0,
                  guidance: float = 1.0, shift: float | None = None) -> tuple[dict, torch.Tensor, list[str]]:
    """Sample `images_per_prompt` images of each prompt and score them; returns (metrics, images, prompts)."""
    expanded = [p for p in prompts for _ in range(images_per_prompt)]
    images = generate(role, expanded, steps, seed, guidance, shift=shift)
    metrics = evaluate_images(images, expanded, seed)
    metrics.update(steps=steps, guidance=guidance, images_per_prompt=images_per_prompt)
    return metrics, images, expanded
