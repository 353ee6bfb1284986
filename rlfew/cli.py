"""The `rlfew` command line. Each area registers its own subcommands through `register_cli(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from rlfew.errors import UsageError

# command -> (module whose `register_cli(subparsers)` adds it with a `func` default, one-line help). Only the
# chosen command's module is imported, so a slow import (transformers) or a broken area never costs or breaks
# the other commands.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("rlfew.commands.train", "train a few-step generator (DMD2, DMDR, ...) on Ray or in-process"),
    "sample": ("rlfew.commands.sample", "few-step sampling into a captioned PNG grid"),
    "export": ("rlfew.commands.export", "export a checkpoint's generator to diffusers"),
    "eval": ("rlfew.commands.eval", "evaluate a generator on world:eval (accuracy, fd, diversity)"),
    "bench": ("rlfew.commands.bench", "benchmarks that write JSON (sampling, runtime, dmd, grpo, rewards)"),
    "world": ("rlfew.world.commands", "the embedded offline world: render, train its models"),
    "rewards": ("rlfew.rewards.commands", "list rewards, score a folder of images"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with `command`'s full subcommand tree and a help-only entry for every other command."""
    parser = argparse.ArgumentParser(prog="rlfew", description="RL post-training for few-step image generators.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        if name == command:
            importlib.import_module(module_name).register_cli(subparsers)
        else:
            subparsers.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(next((token for token in argv if not token.startswith("-")), None))
    args, extra = parser.parse_known_args(argv)
    if extra:
        # `key=value` overrides may follow options (`rlfew train cfg.yaml --algo dmd train.steps=5`).
        if getattr(args, "accepts_extra_overrides", False) and all("=" in t and not t.startswith("-") for t in extra):
            args.config_and_overrides = [*args.config_and_overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UsageError as err:
        print(f"rlfew {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
