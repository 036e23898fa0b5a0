"""Aligned versus naive builds of the same apps, as real fleets under ``dksm``.

The guest kit links every app with the library at the same addresses (``aligned``,
shipped) so that the pool shares the library's pages across apps.  Its ``naive``
layout (app code first, library after: ``guests/ld/naive.ld``) is what a build
that ignores alignment gets.  Here both are run as fleets of N instances per app,
each in a fresh pool domain, and measured three ways:

- ``hashtable_entries``: the pool's distinct pages, against
  :func:`dksm.analyze.predict.predict_fleet`'s prediction (which must match exactly);
- guest-image memory: what the loaded images cost, against the prediction (see
  :func:`measure_image_memory`);
- fleet memory: the project's measure (:mod:`dksm.memory.accounting`: Pss of the
  supervisor and workers plus the pool's tmpfs bytes), VMM overhead included.

The naive images are built from the source tree's ``guests/build.py`` into a
temporary directory (gcc, ld and objdump needed); the shipped images are never
touched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from dksm.analyze.pages import read_image, unique_labels
from dksm.analyze.predict import FleetPrediction, predict_fleet
from dksm.dedup.pool import PagePool, pool_directory
from dksm.error import DksmError
from dksm.fleet import control
from dksm.fleet.instance import DedupMode, InstanceSpec
from dksm.loader.segment import PAGE_SIZE
from dksm.memory.accounting import fleet_memory, tmpfs_bytes
from dksm.vmm.config import DEFAULT_BOOT_ARGS, VmConfig

DEFAULT_APPS = ("hello", "idle", "compute", "cowprobe")
LAYOUTS = ("aligned", "naive")
# Apps that finish their work stay up, halted, with "then=idle" (guests/README.md).
FLEET_BOOT_ARGS = f"{DEFAULT_BOOT_ARGS} then=idle"
MIB = 1 << 20

# /proc/PID/pagemap: one little-endian u64 per virtual page (Documentation/admin-guide/
# mm/pagemap.rst).
PAGEMAP_ENTRY = struct.Struct("<Q")
PM_PRESENT = 1 << 63
PM_FILE_OR_SHARED_ANON = 1 << 61

# A fleet is measured once its consoles have been silent this long: loading is done
# before boot, and the apps' own first writes (cowprobe's) come with their output.
QUIET_SECONDS = 0.3
QUIET_TIMEOUT = 10.0


class LayoutsError(DksmError):
    """The layouts experiment cannot run (no build script, no compiler, failed build)."""


def build_script() -> Path:
    """``guests/build.py`` of the source tree this dksm runs from."""
    script = Path(__file__).resolve().parents[3] / "guests" / "build.py"
    if not script.is_file():
        raise LayoutsError(
            f"the naive images are built by guests/build.py of dksm's source tree, and "
            f"{script} does not exist (dksm installed without its sources?); "
            "pass prebuilt images with --naive-dir"
        )
    return script


def build_naive_images(out_dir: Path, apps: Sequence[str]) -> list[Path]:
    """Build ``apps`` with the naive layout into ``out_dir`` (never the shipped
    directory); return their image paths in the order of ``apps``."""
    script = build_script()
    for tool in ("gcc", "ld", "objdump"):
        if shutil.which(tool) is None:
            raise LayoutsError(f"building the naive images needs {tool}, which is not on PATH")
    images = out_dir / "naive"
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            "--layout",
            "naive",
            "--apps",
            ",".join(apps),
            "--out",
            str(images),
            "--build-dir",
            str(out_dir / "build"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        raise LayoutsError(
            f"guests/build.py --layout naive failed: {lines[-1] if lines else result.returncode}"
        )
    return [images / f"{app}.elf" for app in apps]


@contextlib.contextmanager
def naive_images(apps: Sequence[str]) -> Iterator[list[Path]]:
    """The naive build of ``apps`` in a temporary directory, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="dksm-naive-") as tmp:
        yield build_naive_images(Path(tmp), apps)


@dataclass(frozen=True)
class ImageMemory:
    """Guest-image memory of a running fleet, read from ``/proc/PID/pagemap``.

    ``private_pages``: over every VM, the pages of its image's loaded range that
    are present and anonymous (written privately: copied at load, or copies of pool
    pages the guest wrote to).  ``pool_pages``: the pool's pages on tmpfs, each
    counted once whether or not a guest has touched it yet.  Pages the guest maps
    from the pool are page-cache pages of that file, so neither of them counts such
    a page twice, and the sum is what :mod:`dksm.analyze.predict` predicts.
    """

    private_pages: int
    pool_pages: int
    cow_pages: int  # with a pool: private pages where pool pages were mapped (guest writes)

    @property
    def pages(self) -> int:
        return self.private_pages + self.pool_pages

    @property
    def bytes(self) -> int:
        return self.pages * PAGE_SIZE


def _pagemap_flags(pid: int, host_addresses: Sequence[int]) -> list[int]:
    """The pagemap entry of each host page address of ``pid`` (read in runs)."""
    entries: list[int] = []
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    try:
        start = 0
        while start < len(host_addresses):
            stop = start + 1
            while (
                stop < len(host_addresses)
                and host_addresses[stop] == host_addresses[stop - 1] + PAGE_SIZE
            ):
                stop += 1
            offset = host_addresses[start] // PAGE_SIZE * PAGEMAP_ENTRY.size
            data = os.pread(fd, (stop - start) * PAGEMAP_ENTRY.size, offset)
            entries.extend(e for (e,) in PAGEMAP_ENTRY.iter_unpack(data))
            start = stop
    finally:
        os.close(fd)
    return entries


def measure_image_memory(
    handle: control.FleetHandle, pool_dir: Path | None, mem_size: int
) -> ImageMemory:
    """What the fleet's guest images cost now (see :class:`ImageMemory`); needs
    root (or ptrace rights) over the fleet's processes."""
    pages_of: dict[str, tuple[list[int], set[int]]] = {}
    private = cow = 0
    for member in handle.members():
        if member.state not in ("booting", "running"):
            continue
        info = handle.info(member.index)
        kernel = info.kernel
        if kernel not in pages_of:
            img = read_image(Path(kernel), mem_size)
            loaded = [p.addr for p in img.loaded]
            shareable = {p.addr for p in img.shareable}
            pages_of[kernel] = (loaded, shareable)
        loaded, shareable = pages_of[kernel]
        base = info.ram_host_address
        flags = _pagemap_flags(info.pid, [base + addr for addr in loaded])
        for addr, entry in zip(loaded, flags, strict=True):
            if entry & PM_PRESENT and not entry & PM_FILE_OR_SHARED_ANON:
                private += 1
                # With a pool, a private page where a shareable one was mapped is a
                # copy the guest's write made; without one, every page is private.
                cow += pool_dir is not None and addr in shareable
    pool_pages = tmpfs_bytes(pool_dir / "pages") // PAGE_SIZE if pool_dir is not None else 0
    return ImageMemory(private_pages=private, pool_pages=pool_pages, cow_pages=cow)


def wait_until_quiet(handle: control.FleetHandle) -> None:
    """Return once no VM console of the fleet has grown for QUIET_SECONDS."""
    deadline = time.monotonic() + QUIET_TIMEOUT
    sizes: list[int] = []
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        now = [
            handle.log_path(m.index).stat().st_size
            for m in handle.members()
            if handle.log_path(m.index).exists()
        ]
        if now != sizes:
            sizes, quiet_since = now, time.monotonic()
        elif time.monotonic() - quiet_since >= QUIET_SECONDS:
            return
        time.sleep(0.05)


@dataclass(frozen=True)
class FleetMeasurement:
    """One fleet, measured, with what :mod:`dksm.analyze.predict` predicts for it."""

    mode: str
    images: tuple[str, ...]
    vms: int
    hashtable_entries: int
    prediction: FleetPrediction
    image_memory: ImageMemory
    fleet_bytes: int
    boot_seconds: float

    @property
    def predicted_image_bytes(self) -> int:
        return self.prediction.bytes("dksm" if self.mode == DedupMode.DKSM.value else "none")


def run_fleet(
    paths: Sequence[Path],
    counts: Sequence[int],
    *,
    mode: DedupMode = DedupMode.DKSM,
    mem_mib: int = 16,
    domain: str,
) -> FleetMeasurement:
    """Boot ``counts[i]`` VMs of ``paths[i]`` in a fresh pool ``domain``, measure,
    stop, and purge the domain."""
    mem_size = mem_mib * MIB
    labels = unique_labels(paths)
    images = [read_image(p, mem_size, label) for p, label in zip(paths, labels, strict=True)]
    prediction = predict_fleet(images, counts)
    specs = [
        (
            label,
            InstanceSpec(
                VmConfig(kernel_path=str(path), mem_mib=mem_mib, boot_args=FLEET_BOOT_ARGS),
                mode,
                domain,
            ),
        )
        for path, label, count in zip(paths, labels, counts, strict=True)
        for _ in range(count)
    ]
    pool_dir = pool_directory(domain) if mode.uses_pool else None
    started = time.monotonic()
    handle = control.up(specs, boot_timeout=max(120.0, 0.5 * len(specs)))
    boot_seconds = time.monotonic() - started
    try:
        wait_until_quiet(handle)
        failed = [m for m in handle.members() if m.state not in ("booting", "running")]
        if failed:
            raise LayoutsError(
                f"{len(failed)} VMs of the {mode.value} fleet ended early, e.g. "
                f"{failed[0].label}: {failed[0].reason or failed[0].state}"
            )
        image_memory = measure_image_memory(handle, pool_dir, mem_size)
        fleet = fleet_memory(handle.process_pids(), [pool_dir] if pool_dir else [])
        entries = 0
        if mode.uses_pool:
            with contextlib.closing(PagePool.open(domain)) as pool:
                entries = pool.stats().hashtable_entries
    finally:
        handle.down()
    if mode.uses_pool:
        with contextlib.closing(PagePool.open(domain)) as pool:
            pool.purge()
    return FleetMeasurement(
        mode=mode.value,
        images=tuple(labels),
        vms=len(specs),
        hashtable_entries=entries,
        prediction=prediction,
        image_memory=image_memory,
        fleet_bytes=fleet.total,
        boot_seconds=round(boot_seconds, 2),
    )


@dataclass(frozen=True)
class LayoutRow:
    layout: str
    images: tuple[str, ...]
    vms: int
    hashtable_entries: int
    predicted_hashtable_entries: int
    pool_bytes: int
    image_bytes: int
    predicted_image_bytes: int
    cow_pages: int
    fleet_bytes: int
    boot_seconds: float


def run_layouts(
    aligned: Sequence[Path], naive: Sequence[Path], instances: int, mem_mib: int = 16
) -> list[LayoutRow]:
    """Both layouts as ``dksm`` fleets of ``instances`` VMs per image, one after the
    other, each in its own fresh pool domain."""
    rows: list[LayoutRow] = []
    for layout, paths in (("aligned", aligned), ("naive", naive)):
        m = run_fleet(
            paths,
            [instances] * len(paths),
            mem_mib=mem_mib,
            domain=f"layouts-{layout}-{os.getpid()}",
        )
        rows.append(
            LayoutRow(
                layout=layout,
                images=m.images,
                vms=m.vms,
                hashtable_entries=m.hashtable_entries,
                predicted_hashtable_entries=m.prediction.hashtable_entries,
                pool_bytes=m.image_memory.pool_pages * PAGE_SIZE,
                image_bytes=m.image_memory.bytes,
                predicted_image_bytes=m.predicted_image_bytes,
                cow_pages=m.image_memory.cow_pages,
                fleet_bytes=m.fleet_bytes,
                boot_seconds=m.boot_seconds,
            )
        )
    return rows


def shipped_images(apps: Sequence[str]) -> list[Path]:
    from dksm.guests import guest_path

    return [guest_path(app) for app in apps]


def to_json(rows: Sequence[LayoutRow], instances: int) -> dict[str, object]:
    return {"instances_per_image": instances, "rows": [asdict(r) for r in rows]}


def table(rows: Sequence[LayoutRow]) -> object:
    from rich import box
    from rich.table import Table

    kib = 1024
    t = Table(
        title="Aligned vs naive guest layouts: fleets under dksm",
        box=box.SIMPLE_HEAD,
        title_justify="left",
    )
    for col in (
        "layout",
        "VMs",
        "pool pages",
        "predicted",
        "image KiB",
        "predicted",
        "run-time copies",
        "fleet MiB",
        "fleet KiB/VM",
    ):
        # Headers wrap between words, never inside one.
        width = max(len(word) for word in col.split())
        t.add_column(col, justify="left" if col == "layout" else "right", min_width=max(width, 7))
    for r in rows:
        t.add_row(
            r.layout,
            str(r.vms),
            str(r.hashtable_entries),
            str(r.predicted_hashtable_entries),
            f"{r.image_bytes / kib:,.0f}",
            f"{r.predicted_image_bytes / kib:,.0f}",
            str(r.cow_pages),
            f"{r.fleet_bytes / MIB:.1f}",
            f"{r.fleet_bytes / r.vms / kib:,.0f}",
        )
    t.caption = (
        "pool pages: hashtable_entries; image: every VM's private image pages + the pool "
        "(pagemap), predicted by dksm analyze; run-time copies: pool pages guests wrote "
        "(cowprobe); fleet: Pss_Anon of all processes + pool"
    )
    return t
