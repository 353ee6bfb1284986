"""`rlfew train`: a YAML recipe plus overrides, run by the Ray driver (or in-process)."""

from __future__ import annotations

import argparse

from rlfew.config import add_config_arguments


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train a few-step generator (DMD2, DMDR, ...) on Ray or in-process",
        description="Examples: rlfew train configs/world/dmd.yaml train.steps=50 | "
                    "rlfew train --algo dmdr --reward pickscore model.source=stabilityai/sd-turbo",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.set_defaults(func=run_train, accepts_extra_overrides=True)


def run_train(args) -> int:
    from rlfew.config import config_from_args
    from rlfew.method import resolve_method
    from rlfew.models import resolve_source
    from rlfew.runtime.driver import Trainer

    cfg = config_from_args(args)
    # Validate everything a user can get wrong before the run directory is written: the method, its options and
    # role table, the rewards it needs, its data folders, the model sources.
    resolved = resolve_method(cfg)
    resolved.cls.check_inputs(cfg, resolved.options)
    for source in (cfg.model.source, cfg.generator.source, cfg.teacher.source):
        if source:
            resolve_source(source)
    return Trainer(cfg).run()
