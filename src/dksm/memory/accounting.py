"""What processes and the page pool cost the host, read from ``/proc`` and tmpfs.

The measure used everywhere in dksm (fleet experiment, density):

    fleet memory = sum over its processes of Pss_Anon
                   + every byte the page pool holds on tmpfs, counted once.

Pss splits each shared page among its users, so summing it over processes counts
every anonymous frame once: guest RAM, its copy-on-write copies of pool pages, KSM
pages, and the interpreter's heap, which forked workers share until they write it.
tmpfs pages are left out of the per-process sums (Pss_Shmem) and added as the
pool's allocated blocks instead: a pool page costs its frame whether or not any
guest has touched it yet, and this counts it exactly once either way.

File-backed pages (libpython, extension modules) are reported apart (Pss_File) and
not summed in: they are page cache shared with every other process that maps the
same files, so their Pss moves whenever an unrelated Python process starts or exits
on the host, which would make fleets measured minutes apart incomparable.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

KIB = 1024


@dataclass(frozen=True)
class ProcessMemory:
    pid: int
    rss: int
    pss: int
    pss_anon: int
    pss_file: int
    pss_shmem: int
    ksm: int

    @property
    def accounted(self) -> int:
        """This process's share of the fleet measure (tmpfs and file pages excluded)."""
        return self.pss_anon


def process_memory(pid: int) -> ProcessMemory | None:
    """``/proc/PID/smaps_rollup`` in bytes, or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields: dict[bytes, int] = {}
    for line in text.splitlines()[1:]:
        name, _, rest = line.partition(b":")
        parts = rest.split()
        if parts and parts[-1] == b"kB":
            fields[name] = int(parts[0]) * KIB
    if not fields:  # a zombie has an empty rollup
        return None
    return ProcessMemory(
        pid=pid,
        rss=fields.get(b"Rss", 0),
        pss=fields.get(b"Pss", 0),
        pss_anon=fields.get(b"Pss_Anon", 0),
        pss_file=fields.get(b"Pss_File", 0),
        pss_shmem=fields.get(b"Pss_Shmem", 0),
        ksm=fields.get(b"KSM", 0),
    )


@dataclass(frozen=True)
class MappingMemory:
    """One mapping of a process, from ``/proc/PID/smaps`` (sizes in bytes)."""

    start: int
    end: int
    path: str  # the backing file, or "" / "[heap]" and the like
    rss: int
    pss: int

    def within(self, start: int, length: int) -> bool:
        return self.start >= start and self.end <= start + length


def process_mappings(pid: int) -> list[MappingMemory]:
    """Every mapping of ``pid`` with its Rss and Pss ([] if the process is gone)."""
    found: list[MappingMemory] = []
    head: list[bytes] | None = None
    rss = 0
    try:
        with open(f"/proc/{pid}/smaps", "rb") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return found
    for line in text.splitlines():
        first = line.split(maxsplit=1)[0] if line else b""
        if b"-" in first and not first.endswith(b":"):  # a mapping's header line
            head = line.split(maxsplit=5)
            rss = 0
        elif head is not None and first == b"Rss:":
            rss = int(line.split()[1]) * KIB
        elif head is not None and first == b"Pss:":
            lo, hi = (int(x, 16) for x in head[0].split(b"-"))
            path = head[5].decode(errors="replace").strip() if len(head) > 5 else ""
            found.append(MappingMemory(lo, hi, path, rss, int(line.split()[1]) * KIB))
            head = None
    return found


def page_cache_bytes(path: Path) -> int:
    """Bytes of the file at ``path`` held in the host's page cache right now."""
    from dksm.memory.host_mapping import PAGE_SIZE, resident_pages

    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return resident_pages(fd, os.fstat(fd).st_size) * PAGE_SIZE
    finally:
        os.close(fd)


def tmpfs_bytes(path: Path) -> int:
    """Bytes allocated by every file under ``path`` (0 if it does not exist)."""
    total = 0
    if path.is_file():
        return path.stat().st_blocks * 512
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:
                continue
    return total


@dataclass(frozen=True)
class FleetMemory:
    processes: int
    process_bytes: int  # sum of Pss_Anon
    pool_bytes: int
    file_bytes: int = 0  # sum of Pss_File: reported, not part of the total

    @property
    def total(self) -> int:
        return self.process_bytes + self.pool_bytes


def fleet_memory(pids: Iterable[int], pool_dirs: Iterable[Path] = ()) -> FleetMemory:
    found = [m for m in (process_memory(pid) for pid in pids) if m is not None]
    return FleetMemory(
        processes=len(found),
        process_bytes=sum(m.accounted for m in found),
        pool_bytes=sum(tmpfs_bytes(d) for d in pool_dirs),
        file_bytes=sum(m.pss_file for m in found),
    )
