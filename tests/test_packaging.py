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


def test_the_cli_lists_every_command_and_imports_only_the_chosen_one():
    import subprocess
    import sys

    from rlfew.cli import COMMANDS, build_parser

    assert {"train", "eval", "sample", "export", "world", "rewards", "bench"} == set(COMMANDS)
    for command, (module_name, help_text) in COMMANDS.items():
        parser = build_parser(command)
        chosen = parser._subparsers._group_actions[0].choices[command]
        assert chosen.get_default("func") is not None or chosen._subparsers is not None, command
        listed = {a.dest: a.help for a in parser._subparsers._group_actions[0]._choices_actions}
        assert listed[command] == help_text, command  # the static help matches what the module registers
    probe = ("import sys; from rlfew.cli import COMMANDS, build_parser; build_parser('export'); "
             "print(sorted(m for m, _ in COMMANDS.values() if m in sys.modules), 'transformers' in sys.modules)")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip()
    assert loaded == "['rlfew.commands.export'] False"
