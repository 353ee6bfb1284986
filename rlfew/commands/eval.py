"""`rlfew eval`: sample a prompt set with fixed seeds and write world metrics as JSON, plus a sample grid."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="evaluate a generator on world:eval (accuracy, fd, diversity)",
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="diffusers folder, hub id, or world:teacher / world:student")
    source.add_argument("--checkpoint", help="a run's checkpoint (runs/NAME/checkpoints/step_N) or run directory")
    parser.add_argument("--lora", help="LoRA folder from `rlfew export`")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--guidance", type=float, default=1.0, help="CFG scale (a multi-step teacher wants > 1)")
    parser.add_argument("--shift", type=float, help="flow models: σ-grid shift (default: the scheduler's)")
    parser.add_argument("--prompts", default="world:eval", help="world:eval, world:train or a file, one prompt a line")
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--max-prompts", type=int, help="evaluate only the first N prompts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="eval.json")
    parser.set_defaults(func=run_eval)


def run_eval(args) -> int:
    from rlfew.commands.common import load_generator_role
    from rlfew.runtime.prompts import read_prompts
    from rlfew.evaluation import evaluate_role
    from rlfew.images import save_grid

    prompts = read_prompts(args.prompts, None)[: args.max_prompts]
    if args.checkpoint:
        from rlfew.commands.common import roles_from_checkpoint

        role = roles_from_checkpoint(args.checkpoint, args.device)["generator"]
    else:
        role = load_generator_role(args.model, args.lora, args.device)
    start = time.perf_counter()
    metrics, images, expanded = evaluate_role(role, prompts, args.steps, args.images_per_prompt, args.seed,
                                              args.guidance, args.shift)
    metrics.update(model=args.model or args.checkpoint, lora=args.lora, prompts=args.prompts, seed=args.seed,
                   seconds=round(time.perf_counter() - start, 2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2) + "\n")
    grid = save_grid(out.with_suffix(".png"), images[: 8 * args.images_per_prompt],
                     expanded[: 8 * args.images_per_prompt], columns=args.images_per_prompt)
    print(json.dumps({k: metrics[k] for k in ("accuracy", "image_accuracy", "fd", "diversity", "clip_score", "steps", "n_images")}))
    print(f"wrote {out} and {grid}")
    return 0
