"""The guest images dksm ships, built from ``guests/`` in the source tree, and the
Linux guest it fetches from Debian's packages (:mod:`dksm.guests.linux`).

The shipped images are package data so that ``dksm run`` works without a
compiler; ``make guests`` rebuilds them byte for byte.  The fetched ones live in a
per-user cache and answer to the names in :data:`FETCHED_NAMES` once fetched.
"""

from __future__ import annotations

import os

from dksm.error import DksmError

TYPE_CHECKING = False  # typing's, without importing typing (see the dksm package)
if TYPE_CHECKING:
    from pathlib import Path

IMAGES_DIR = os.path.join(os.path.dirname(__file__), "images")
IMAGE_SUFFIX = ".elf"
# Names of fetched guests (``dksm guests fetch linux``); kept here so that resolving
# a shipped name never imports the fetcher.
FETCHED_NAMES = ("linux", "linux-initrd", "linux-bzimage")

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
    "virtioprobe": "drives the virtio-mmio block, net, entropy and vsock devices it finds",
    "linux": "Debian's cloud kernel, its vmlinux (fetched: 'dksm guests fetch linux')",
    "linux-initrd": "busybox initramfs: /init prints /proc/cmdline, runs a shell, reboots",
    "linux-bzimage": "Debian's cloud kernel as packaged (a bzImage; boots as its vmlinux)",
}


class GuestNotFoundError(DksmError):
    """No shipped guest has that name."""


def catalog() -> dict[str, Path]:
    """Shipped guest names and their image paths, sorted by name."""
    from pathlib import Path

    return {p.stem: p for p in sorted(Path(IMAGES_DIR).glob(f"*{IMAGE_SUFFIX}"))}


def fetched_catalog() -> dict[str, Path]:
    """Fetched guests' names and paths (empty until ``dksm guests fetch linux``)."""
    from dksm.guests.linux import fetched_path

    found = {name: fetched_path(name) for name in FETCHED_NAMES}
    return {name: path for name, path in found.items() if path is not None}


def guest_path(name: str) -> Path:
    images = catalog()
    if name in images:
        return images[name]
    if name in FETCHED_NAMES:
        from dksm.guests.linux import fetched_path

        fetched = fetched_path(name)
        if fetched is None:
            raise GuestNotFoundError(
                f"the guest '{name}' has not been fetched: run 'dksm guests fetch linux'"
            )
        return fetched
    known = ", ".join([*images, *FETCHED_NAMES]) or "none (run 'make guests')"
    raise GuestNotFoundError(f"no guest named '{name}'; guests: {known}")


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
        if name_or_path in FETCHED_NAMES and not os.path.exists(name_or_path):
            return str(guest_path(name_or_path))
    return name_or_path


def resolve_initrd_path(name_or_path: str) -> str:
    """A fetched guest's name (``linux-initrd``) as its cached file; anything else is
    a path, so that no shipped kernel's name stands for an initrd."""
    if name_or_path in FETCHED_NAMES and not os.path.exists(name_or_path):
        return str(guest_path(name_or_path))
    return name_or_path
