"""`rlfew world ...`: render captioned grids of the world, train the world CLIP (and, from
rlfew.world.pipeline, the world generator)."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import fields
from pathlib import Path

from rlfew.errors import UsageError

log = logging.getLogger(__name__)


def _render_command(args: argparse.Namespace) -> int:
    from rlfew.images import save_grid
    from rlfew.world.prompts import load_prompts, parse_prompt
    from rlfew.world.render import render_batch

    if args.prompts.startswith("world:") or Path(args.prompts).is_file():
        prompts = load_prompts(args.prompts)
    else:  # a single caption typed on the command line
        try:
            parse_prompt(args.prompts)
        except UsageError as err:
            raise UsageError(f"--prompts is neither world:train, world:eval, an existing file nor a world caption: {err}") from None
        prompts = [args.prompts]
    if args.n < 1:
        raise UsageError(f"--n must be at least 1 (got {args.n})")
    chosen = [prompts[i % len(prompts)] for i in range(args.n)]
    path = save_grid(args.out, render_batch(chosen, seed=args.seed, size=args.size), chosen)
    print(f"wrote {len(chosen)} renders to {path}")
    return 0


def _train_clip_command(args: argparse.Namespace) -> int:
    import torch

    from rlfew.world.clip import ClipTrainingConfig, load_world_clip, retrieval_report, train_world_clip

    torch.set_num_threads(args.threads)
    cfg = ClipTrainingConfig(**{f.name: getattr(args, f.name) for f in fields(ClipTrainingConfig)})
    metrics = train_world_clip(args.out, cfg)
    log.info("trained: %s", metrics)
    model, tokenizer = load_world_clip(path=args.out)
    report = retrieval_report(model, tokenizer, count=args.eval_count)
    print(json.dumps({"training": metrics, "retrieval": report}, indent=2))
    return 0


def register_cli(subparsers) -> None:
    world = subparsers.add_parser("world", help="the embedded offline world: render, train its models")
    world_subparsers = world.add_subparsers(dest="world_command", metavar="WORLD_COMMAND")

    def show_world_help(_args: argparse.Namespace) -> int:
        world.print_help()
        return 2

    world.set_defaults(func=show_world_help)

    render = world_subparsers.add_parser("render", help="save a captioned grid of world renders")
    render.add_argument("--prompts", default="world:eval",
                        help="world:train, world:eval, a text file with one prompt per line, or one caption")
    render.add_argument("--n", type=int, default=16, help="number of renders (prompts are cycled)")
    render.add_argument("--seed", type=int, default=0)
    render.add_argument("--size", type=int, default=64, help="image side in pixels")
    render.add_argument("--out", default="world_grid.png", help="PNG path")
    render.set_defaults(func=_render_command)

    from rlfew.world.clip import ClipTrainingConfig

    defaults = ClipTrainingConfig()
    train_clip = world_subparsers.add_parser("train-clip", help="train the world CLIP from scratch")
    train_clip.add_argument("--out", required=True, help="output folder (save_pretrained layout)")
    for field in fields(ClipTrainingConfig):
        flag = "--" + field.name.replace("_", "-")
        train_clip.add_argument(flag, type=type(getattr(defaults, field.name)), default=getattr(defaults, field.name))
    train_clip.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    train_clip.add_argument("--eval-count", type=int, default=300, help="held-out renders for the retrieval report")
    train_clip.set_defaults(func=_train_clip_command)

    # The generator's training commands live with the pipeline.
    from rlfew.world import pipeline

    pipeline.register_world_cli(world_subparsers)
