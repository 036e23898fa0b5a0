"""``dksm run``'s flags read without argparse mean what argparse makes of them: for
any command line of the flags written out in full both agree, and everything else
(abbreviations, help, bad values, a missing or doubled source) is left to argparse."""

from __future__ import annotations

import argparse

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dksm.cli import run_options
from dksm.cli.main import build_parser
from dksm.cli.run import plain_arguments
from dksm.cli.run_options import FLOAT, INT, OPTIONS, SOURCES, SWITCH, Option

PARSER = build_parser("run")
# Values as a user types them: words, paths, numbers (never starting with "-",
# which argparse reads by rules of its own and the plain reading leaves to it).
WORDS = st.text().filter(lambda t: not t.startswith("-"))


def _value(option: Option) -> st.SearchStrategy[str]:
    if option.kind == INT:
        return st.integers(0, 1 << 40).map(str)
    if option.kind == FLOAT:
        return st.floats(0, 1e6, allow_nan=False).map(repr)
    return WORDS


@st.composite
def command_lines(draw: st.DrawFn) -> list[str]:
    source = draw(st.sampled_from(SOURCES))
    others = [o for o in OPTIONS if o not in SOURCES]
    chosen = [source, *draw(st.lists(st.sampled_from(others), max_size=len(others)))]
    words: list[str] = []
    for option in draw(st.permutations(chosen)):
        name = draw(st.sampled_from(option.names))
        if option.kind == SWITCH:
            words.append(name)
        elif draw(st.booleans()):
            words.append(f"{name}={draw(_value(option))}")
        else:
            words += [name, draw(_value(option))]
    return words


def _by_argparse(words: list[str]) -> dict[str, object]:
    parsed = vars(PARSER.parse_args(["run", *words]))
    return {k: v for k, v in parsed.items() if k not in ("command", "handler")}


@given(command_lines())
def test_plain_flags_mean_what_argparse_makes_of_them(words: list[str]) -> None:
    plain = plain_arguments(words)
    assert plain is not None, words
    assert plain.command == "run"
    assert {k: v for k, v in vars(plain).items() if k not in ("command", "handler")} == (
        _by_argparse(words)
    )


@pytest.mark.parametrize(
    "words",
    [
        ["--kern", "hello"],  # an abbreviation
        ["--kernel", "hello", "--mem", "16"],
        ["--help"],
        ["--kernel", "hello", "-h"],
        ["--kernel", "hello", "--mem-mib", "x"],  # not an int
        ["--kernel", "hello", "--timeout", "-1"],  # argparse's rules for dashes
        ["--kernel", "hello", "--mem-mib"],  # no value
        ["--kernel", "hello", "--no-confine=yes"],  # a switch given a value
        ["--kernel", "hello", "--config-file", "vm.json"],  # two sources
        ["--mem-mib", "16"],  # no source
        ["--kernel", "hello", "extra"],  # a word that is no flag
        ["--kernel", "hello", "--", "--mem-mib", "16"],
        ["--kernel", "hello", "-vv"],
    ],
)
def test_anything_else_is_left_to_argparse(words: list[str]) -> None:
    assert plain_arguments(words) is None


def test_every_flag_of_the_parser_is_declared_once() -> None:
    """The table is what argparse is built from: no flag of ``dksm run`` is missing
    from it (the plain reading would leave it to argparse, slowly but correctly)."""
    declared = {name for option in run_options.OPTIONS for name in option.names}
    (commands,) = [a for a in PARSER._actions if isinstance(a, argparse._SubParsersAction)]
    flags = {
        name
        for action in commands.choices["run"]._actions
        if not isinstance(action, argparse._HelpAction)
        for name in action.option_strings
    }
    assert flags == declared
