"""The argument parser every ``dksm`` command's flags are added to.

Imported only where a command line is parsed by argparse: ``dksm run`` with plain
flags does without (:mod:`dksm.cli.run_options`)."""

from __future__ import annotations

import argparse
import os


def _terminal_width() -> int:
    try:
        return int(os.environ.get("COLUMNS", "0")) or os.get_terminal_size(1).columns
    except (ValueError, OSError):
        return 80


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that measures the terminal itself: argparse's formatter,
    made on every ``add_argument``, would import shutil (and with it bz2 and lzma)
    just to ask the same question, milliseconds on every start."""

    def _get_formatter(self) -> argparse.HelpFormatter:
        return argparse.HelpFormatter(prog=self.prog, width=_terminal_width() - 2)
