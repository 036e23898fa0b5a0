"""Looking at running VMs from outside, as a user or an auditor would: guest RAM
through /proc/PID/mem, pool mappings through /proc/PID/smaps."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dksm.fleet.directory import VmInfo
from dksm.loader.elf import load_elf
from dksm.loader.segment import shareable_span
from dksm.memory.accounting import process_mappings

PAGE = 4096


def read_guest(info: VmInfo | dict[str, Any], guest_addr: int, length: int) -> bytes:
    """Guest-physical bytes of a running VM, read from its VMM's address space
    (``info``: a fleet VM's, or what ``dksm run --info-file`` wrote)."""
    if isinstance(info, dict):
        info = VmInfo.from_json(info)
    fd = os.open(f"/proc/{info.pid}/mem", os.O_RDONLY)
    try:
        return os.pread(fd, length, info.ram_host_address + guest_addr)
    finally:
        os.close(fd)


def readonly_pages(image: Path, mem_size: int = 16 << 20) -> dict[int, bytes]:
    """Guest address -> content of every page the pool may share, by the loader's rule."""
    pages: dict[int, bytes] = {}
    for seg in load_elf(str(image), mem_size).segments:
        start, end = shareable_span(seg)
        for addr in range(start, end, PAGE):
            offset = addr - seg.guest_addr
            pages[addr] = seg.data[offset : offset + PAGE]
    return pages


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    path: str
    rss_kb: int
    pss_kb: int


def mappings_of(pid: int, path_prefix: str) -> list[Mapping]:
    """The mappings of ``pid`` whose backing file starts with ``path_prefix``."""
    return [
        Mapping(m.start, m.end, m.path, m.rss // 1024, m.pss // 1024)
        for m in process_mappings(pid)
        if m.path.startswith(path_prefix)
    ]
