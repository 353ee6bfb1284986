"""Helpers shared by the CLI subcommands."""

from __future__ import annotations

from pathlib import Path

from rlfew.errors import UsageError


def load_generator_role(model: str, lora: str | None = None, device: str = "auto", dtype: str = "float32"):
    """A frozen Role over any diffusers folder / hub id (optionally with exported LoRA weights) for sampling."""
    from rlfew.models import DTYPES, Role, load_pipeline, make_adapter, resolve_device
    from rlfew.models.loading import denoiser_of

    device = resolve_device(device)
    pipeline = load_pipeline(model, dtype=DTYPES[dtype], device=device)
    if lora:
        if not Path(lora).exists():
            raise UsageError(f"LoRA folder {lora!r} does not exist")
        pipeline.load_lora_weights(lora)
    adapter = make_adapter(pipeline, device)
    return Role("generator", adapter, adapter.prepare_network(denoiser_of(pipeline)))


def roles_from_checkpoint(checkpoint: str, device: str = "auto"):
    """The generator role of a run's checkpoint (`runs/NAME/checkpoints/step_N`, or a run directory for its latest
    checkpoint), built as the run's config.yaml says, with the checkpoint's weights."""
    from rlfew.checkpoint import latest_checkpoint, load_checkpoint
    from rlfew.config import load_config
    from rlfew.method import resolve_method
    from rlfew.models import build_roles, resolve_device

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
    generator_spec = resolve_method(cfg).roles["generator"]
    roles = build_roles(cfg.model.source, {"generator": generator_spec}, teacher_source=cfg.teacher.source,
                        student_source=cfg.generator.source, device=resolve_device(device))
    roles["generator"].load_trainable_state_dict(loaded.tensors["generator"])
    return roles
