"""The embedded world: rendered shapes with GenEval-like captions, an exact evaluator, a small CLIP and a
tiny diffusers pipeline, all offline (see DESIGN.md, "The embedded world")."""

from __future__ import annotations

from pathlib import Path

from rlfew.errors import UsageError

ASSETS_DIR = Path(__file__).resolve().parent / "assets"

# Asset name -> (folder under assets/, the command that builds it).
_ASSETS = {
    "world:clip": ("clip", "rlfew world train-clip --out rlfew/world/assets/clip"),
    "world:teacher": ("teacher", "rlfew world train-denoiser (see rlfew/world/pipeline.py)"),
    "world:student": ("student", "rlfew world train-denoiser (see rlfew/world/pipeline.py)"),
}


def resolve_world_asset(name: str) -> Path:
    """The folder of a shipped world asset (`world:clip`, `world:teacher`, `world:student`)."""
    if name not in _ASSETS:
        raise UsageError(f"unknown world asset {name!r}; choose from {', '.join(_ASSETS)}")
    folder, command = _ASSETS[name]
    path = ASSETS_DIR / folder
    if not path.is_dir() or not any(path.iterdir()):
        raise UsageError(f"world asset {name!r} is missing: {path} does not exist or is empty; build it with `{command}`")
    return path
