"""Transparent huge pages: the host-wide switch memory experiments record, and may
turn off for their run.

``/sys/kernel/mm/transparent_hugepage/enabled`` says when anonymous memory may be
backed by 2 MiB pages: ``always``, ``madvise`` (only regions advised
``MADV_HUGEPAGE``) or ``never``.  It matters to the experiments because KSM merges
small pages only (a huge page is split before its parts can merge, or skipped), and
the DKSM thesis ran every experiment with it set to ``never`` (its kernel merged no
huge page at all).  dksm never advises guest RAM huge, so under ``madvise`` (the
usual default) its fleets get no huge pages either way; ``always`` would give them
some, and results taken under it say so.

This module only reads and writes the switch.  Changing it is the business of
:class:`dksm.dedup.ksm.KsmSession`, which saves it with KSM's own settings, puts it
back on every exit and repairs it after a crash, exactly as it does KSM's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

from dksm.error import DksmError

THP_ENABLED: Final = Path("/sys/kernel/mm/transparent_hugepage/enabled")
CHOICES: Final = ("always", "madvise", "never")


class HugePagesError(DksmError):
    """Transparent huge pages cannot be read or set as asked."""


def thp_available(path: Path = THP_ENABLED) -> bool:
    """Whether this kernel has transparent huge pages."""
    return path.exists()


def read_thp_enabled(path: Path = THP_ENABLED) -> str:
    """The current choice (``always``, ``madvise`` or ``never``), or ``"absent"``
    on a kernel without transparent huge pages."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return "absent"
    # The file lists every choice and brackets the current one.
    if "[" not in text:
        raise HugePagesError(f"{path} reads '{text.strip()}', not a bracketed choice")
    return text[text.index("[") + 1 : text.index("]")]


def write_thp_enabled(value: str, path: Path = THP_ENABLED) -> None:
    """Set the switch (host-wide: use :meth:`KsmSession.set_thp_enabled`, which
    restores it)."""
    if value not in CHOICES:
        raise HugePagesError(
            f"transparent huge pages cannot be set to '{value}'; choose {', '.join(CHOICES)}"
        )
    if not thp_available(path):
        raise HugePagesError(f"this kernel has no transparent huge pages ({path} is missing)")
    try:
        fd = os.open(path, os.O_WRONLY)
    except PermissionError:
        raise HugePagesError(f"changing {path} needs root") from None
    try:
        os.write(fd, value.encode())
    except OSError as error:
        raise HugePagesError(
            f"the kernel refused '{value}' for {path} ({os.strerror(error.errno or 0)})"
        ) from None
    finally:
        os.close(fd)
