"""The guest images dksm ships, built from ``guests/`` in the source tree.

They are package data so that ``dksm run`` works without a compiler; ``make
guests`` rebuilds them byte for byte.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from dksm.error import DksmError

if TYPE_CHECKING:
    from pathlib import Path

IMAGES_DIR = os.path.join(os.path.dirname(__file__), "images")
IMAGE_SUFFIX = ".elf"

# What each shipped guest does, in one line (its source, guests/apps/NAME.c, says more).
DESCRIPTIONS = {
    "compute": "a fixed amount of real work, then prints a result Python can recompute",
    "cowprobe": "writes into a page of its own read-only data (copy-on-write), then idles",
    "echo": "echoes lines typed on the serial console, interrupt-driven",
    "hello": "prints its command line and e820 map, then powers off (then=idle: idles)",
    "idle": "says it is ready, then sleeps with interrupts enabled for ever",
    "platprobe": "prints the CMOS clock, the hypervisor CPUID leaves and RDRAND/RDSEED",
    "smpprobe": "starts every CPU of the MP table; all count on one shared counter",
    "sseprobe": "uses SSE on purpose (exercises the emulation fallback on PVM hosts)",
    "vecprobe": "runs code gcc vectorised itself, as a stock-compiled unikernel does",
}


class GuestNotFoundError(DksmError):
    """No shipped guest has that name."""


def catalog() -> dict[str, Path]:
    """Shipped guest names and their image paths, sorted by name."""
    from pathlib import Path

    return {p.stem: p for p in sorted(Path(IMAGES_DIR).glob(f"*{IMAGE_SUFFIX}"))}


def guest_path(name: str) -> Path:
    images = catalog()
    if name not in images:
        known = ", ".join(images) or "none (run 'make guests')"
        raise GuestNotFoundError(f"no shipped guest named '{name}'; shipped guests: {known}")
    return images[name]


def resolve_image(name_or_path: str) -> Path:
    """A shipped guest's name, or else a path to an image file."""
    from pathlib import Path

    return Path(resolve_image_path(name_or_path))


def resolve_image_path(name_or_path: str) -> str:
    """:func:`resolve_image` as a plain string, without pathlib or listing the catalog:
    the ``dksm run`` path, where every millisecond of start-up shows."""
    if "/" not in name_or_path:
        shipped = os.path.join(IMAGES_DIR, name_or_path + IMAGE_SUFFIX)
        if os.path.isfile(shipped):
            return shipped
    return name_or_path
