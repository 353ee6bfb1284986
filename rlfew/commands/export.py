"""`rlfew export`: a run's checkpoint -> LoRA weights and/or a merged diffusers folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from rlfew.errors import UsageError


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser("export", help="export a checkpoint's generator to diffusers",
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="runs/NAME/checkpoints/step_N, or a run dir (latest)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--mode", choices=["lora", "merged", "both"], default="both",
                        help="both: OUT/lora and OUT/merged")
    parser.set_defaults(func=run_export)


def run_export(args) -> int:
    from rlfew.checkpoint import latest_checkpoint, load_checkpoint
    from rlfew.config import load_config
    from rlfew.export import export_lora, export_merged
    from rlfew.models import build_roles

    path = Path(args.checkpoint)
    if (path / "config.yaml").is_file():  # a run directory: take its latest checkpoint
        checkpoint_path = latest_checkpoint(path)
        if checkpoint_path is None:
            raise UsageError(f"run directory {path} has no checkpoints")
        path = checkpoint_path
    run_dir = path.parent.parent
    if not (run_dir / "config.yaml").is_file():
        raise UsageError(f"{args.checkpoint} is not inside a run directory (no {run_dir / 'config.yaml'})")
    cfg = load_config(run_dir / "config.yaml")
    checkpoint = load_checkpoint(path)
    if "generator" not in checkpoint.tensors:
        raise UsageError(f"checkpoint {path} holds no generator weights")
    roles = build_roles(cfg.model.source, generator_source=cfg.generator.source,
                        generator_lora_rank=cfg.generator.lora_rank, lora_alpha=cfg.generator.lora_alpha,
                        lora_targets=cfg.generator.lora_targets)
    roles.generator.load_trainable_state_dict(checkpoint.tensors["generator"])
    out = Path(args.out)
    if args.mode == "lora" or (args.mode == "both" and roles.generator.lora is not None):
        print(f"LoRA weights -> {export_lora(roles, out / 'lora' if args.mode == 'both' else out)}")
    if args.mode in ("merged", "both"):
        print(f"merged pipeline -> {export_merged(roles, out / 'merged' if args.mode == 'both' else out)}")
    return 0
