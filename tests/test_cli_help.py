"""Every option and argument of every dksm command says what it is for (checked on
the real parsers), and the version is one flag away."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from dksm.cli.main import build_parser
from dksm.cli.vmm import build_parser as firecracker_parser

from conftest import dksm


def _parsers(
    parser: argparse.ArgumentParser, path: str
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{path} {name}")


def test_every_option_has_help() -> None:
    undocumented = []
    for path, parser in [
        *_parsers(build_parser(), "dksm"),
        ("dksm-firecracker", firecracker_parser()),
    ]:
        if path.endswith(("fleet supervise", "dksm vmm")):  # internal / delegated
            continue
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not action.help:
                undocumented.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
    assert undocumented == []


def test_version() -> None:
    ran = dksm("--version")
    assert ran.returncode == 0
    assert ran.stdout.startswith("dksm 0.")
