"""Helpers shared by the CLI subcommands."""

from __future__ import annotations

from pathlib import Path

import torch

from rlfew.errors import UsageError


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} requested but CUDA is not available")
    return device


def read_prompts(spec: str | None, literal: list[str] | None) -> list[str]:
    """Prompts from literal `--prompt` values, or a spec: `world:train`, `world:eval` or a text file."""
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


def load_generator_role(model: str, lora: str | None = None, device: str = "auto", dtype: str = "float32"):
    """A frozen Role over any diffusers folder / hub id (optionally with exported LoRA weights) for sampling."""
    from rlfew.models import DTYPES, load_pipeline, make_adapter
    from rlfew.models.loading import denoiser_of
    from rlfew.models.roles import Role

    device = resolve_device(device)
    pipeline = load_pipeline(model, dtype=DTYPES[dtype], device=device)
    if lora:
        if not Path(lora).exists():
            raise UsageError(f"LoRA folder {lora!r} does not exist")
        pipeline.load_lora_weights(lora)
    adapter = make_adapter(pipeline, device)
    return Role("generator", adapter, adapter.prepare_network(denoiser_of(pipeline)))


def roles_from_checkpoint(checkpoint: str, device: str = "auto"):
    """The generator (with its teacher) of a run's checkpoint: `runs/NAME/checkpoints/step_N`, or a run
    directory for its latest checkpoint. The run's config.yaml says how the roles were built."""
    from rlfew.checkpoint import latest_checkpoint, load_checkpoint
    from rlfew.config import load_config
    from rlfew.models import build_roles

    path = Path(checkpoint)
    if (path / "config.yaml").is_file():
        latest = latest_checkpoint(path)
        if latest is None:
            raise UsageError(f"run directory {path} has no checkpoints")
        path = latest
    run_dir = path.parent.parent
    if not (run_dir / "config.yaml").is_file():
        raise UsageError(f"{checkpoint} is not inside a run directory (no {run_dir / 'config.yaml'})")
    cfg = load_config(run_dir / "config.yaml")
    loaded = load_checkpoint(path)
    if "generator" not in loaded.tensors:
        raise UsageError(f"checkpoint {path} holds no generator weights")
    roles = build_roles(cfg.model.source, generator_source=cfg.generator.source,
                        generator_lora_rank=cfg.generator.lora_rank, lora_alpha=cfg.generator.lora_alpha,
                        lora_targets=cfg.generator.lora_targets, device=resolve_device(device))
    roles.generator.load_trainable_state_dict(loaded.tensors["generator"])
    return roles
