"""The `rlfew` command line. Each area registers its own subcommands through `register_cli(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from rlfew.errors import UsageError

# Modules that contribute subcommands; each defines `register_cli(subparsers)` and sets a `func` default
# that takes the parsed args and returns an exit code.
_COMMAND_MODULES = (
    "rlfew.commands.train",
    "rlfew.commands.sample",
    "rlfew.commands.export",
    "rlfew.commands.eval",
    "rlfew.commands.bench",
    "rlfew.world.commands",
    "rlfew.rewards.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlfew", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if not module_name.startswith(err.name or "?"):  # a real import error inside an existing module
                raise
            continue
        module.register_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
