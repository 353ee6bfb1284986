"""The explicit package list in pyproject.toml must cover every package folder (a missing entry only shows
up in non-editable installs, e.g. on a Ray cluster)."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = set()
    for top, name in (("rlfew", "rlfew"), ("rewards", "rlfew.rewards"), ("algos", "rlfew.algos")):
        for init in (ROOT / top).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / top).parts
            found.add(".".join((name, *relative)))
    assert found == listed, f"unlisted: {sorted(found - listed)}; stale: {sorted(listed - found)}"
    assert config["package-dir"] == {"rlfew": "rlfew", "rlfew.rewards": "rewards", "rlfew.algos": "algos"}


def test_the_cli_lists_every_command():
    from rlfew.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"train", "eval", "sample", "export", "world", "rewards"} <= set(commands)
