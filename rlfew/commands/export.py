"""`rlfew export`: a run's checkpoint -> LoRA weights and/or a merged diffusers folder."""

from __future__ import annotations

import argparse
from pathlib import Path


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser("export", help="export a checkpoint's generator to diffusers",
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="runs/NAME/checkpoints/step_N, or a run dir (latest)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--mode", choices=["lora", "merged", "both"], default="both",
                        help="both: OUT/lora and OUT/merged")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="cast the merged folder")
    parser.set_defaults(func=run_export)


def run_export(args) -> int:
    from rlfew.commands.common import roles_from_checkpoint
    from rlfew.export import export_lora, export_merged
    from rlfew.models import DTYPES

    roles = roles_from_checkpoint(args.checkpoint)
    out = Path(args.out)
    if args.mode == "lora" or (args.mode == "both" and roles["generator"].lora is not None):
        print(f"LoRA weights -> {export_lora(roles, out / 'lora' if args.mode == 'both' else out)}")
    if args.mode in ("merged", "both"):
        dtype = DTYPES[args.dtype] if args.dtype else None
        print(f"merged pipeline -> {export_merged(roles, out / 'merged' if args.mode == 'both' else out, dtype)}")
    return 0
