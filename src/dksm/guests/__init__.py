"""The guest images dksm ships, built from ``guests/`` in the source tree.

They are package data so that ``dksm run`` works without a compiler; ``make
guests`` rebuilds them byte for byte.
"""

from __future__ import annotations

from pathlib import Path

from dksm.error import DksmError

IMAGES_DIR = Path(__file__).parent / "images"
IMAGE_SUFFIX = ".elf"


class GuestNotFoundError(DksmError):
    """No shipped guest has that name."""


def catalog() -> dict[str, Path]:
    """Shipped guest names and their image paths, sorted by name."""
    return {p.stem: p for p in sorted(IMAGES_DIR.glob(f"*{IMAGE_SUFFIX}"))}


def guest_path(name: str) -> Path:
    images = catalog()
    if name not in images:
        known = ", ".join(images) or "none (run 'make guests')"
        raise GuestNotFoundError(f"no shipped guest named '{name}'; shipped guests: {known}")
    return images[name]


def resolve_image(name_or_path: str) -> Path:
    """A shipped guest's name, or else a path to an image file."""
    if "/" not in name_or_path and name_or_path in catalog():
        return guest_path(name_or_path)
    return Path(name_or_path)
