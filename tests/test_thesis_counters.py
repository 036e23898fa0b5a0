"""The DKSM thesis's counters as its /sys/kernel/mm/dksm files read them, and the KSM
baseline's scope: all guest RAM advised, or only the image's code."""

from __future__ import annotations

import contextlib
import io
import uuid

from dksm.dedup.pool import PagePool
from dksm.fleet.instance import DedupMode, Instance, InstanceSpec, KsmScope
from dksm.guests import resolve_image_path
from dksm.memory.host_mapping import PAGE_SIZE, map_anonymous, unmap, view
from dksm.vmm.config import VmConfig

from conftest import dksm, requires_kvm, requires_root

THESIS_FILES = [
    "run",
    "pages_scanned",
    "pages_merged",
    "merging_failed",
    "hashtable_entries",
    "hashtable_size",
]


@requires_root
def test_pool_stats_sysfs_prints_the_thesis_files_in_order() -> None:
    domain = f"sysfs-{uuid.uuid4().hex[:8]}"
    count = 8
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(contextlib.closing(PagePool.open(domain)))
        for _ in range(3):  # three processes' worth of the same 8 pages
            address = map_anonymous(count * PAGE_SIZE)
            region = view(address, count * PAGE_SIZE)
            for index in range(count):
                region[index * PAGE_SIZE : index * PAGE_SIZE + 8] = index.to_bytes(8, "little")
            lease = stack.enter_context(pool.lease())
            stack.callback(unmap, address, count * PAGE_SIZE)  # before the lease goes
            lease.merge(address, count * PAGE_SIZE)
        done = dksm("pool", "stats", "--domain", domain, "--sysfs")
        stats = pool.stats()
    assert done.returncode == 0, done.stderr
    lines = [line.split() for line in done.stdout.splitlines()]
    assert [name for name, _ in lines] == THESIS_FILES
    values = {name: int(value) for name, value in lines}
    assert values == {
        "run": 1,
        "pages_scanned": 3 * count,
        "pages_merged": 2 * count,
        "merging_failed": 0,
        "hashtable_entries": count,
        "hashtable_size": stats.hashtable_size,
    }
    assert stats.hashtable_size >= count
    both = dksm("pool", "stats", "--domain", domain, "--sysfs", "--json")
    assert both.returncode == 2 and "not allowed with" in both.stderr
    with contextlib.closing(PagePool.open(domain)) as pool:
        pool.purge()


def _advised_ranges(start: int, length: int) -> list[tuple[int, int]]:
    """Guest ranges of the mappings in [start, start+length) that carry KSM's flag."""
    found, current = [], None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                current = (lo, hi) if start <= lo and hi <= start + length else None
            elif head == "VmFlags:" and current is not None and " mg" in line:
                found.append((current[0] - start, current[1] - start))
    return found


@requires_kvm
def test_ksm_scope_text_advises_only_the_image_code() -> None:
    config = VmConfig(resolve_image_path("hello"), mem_mib=16)
    scopes = {}
    for scope in KsmScope:
        spec = InstanceSpec(config, DedupMode.KSM, ksm_scope=scope)
        with Instance(spec, io.BytesIO()) as instance:
            memory = instance.vm.memory
            scopes[scope] = (
                _advised_ranges(memory.host_address, memory.size),
                list(memory.code_ranges),
                memory.size,
            )
    ram, _, size = scopes[KsmScope.RAM]
    assert ram == [(0, size)]
    text, code, _ = scopes[KsmScope.TEXT]
    assert code and text == code  # the .text pages, and nothing else
    assert code[0][0] == 0x100000 and code[0][1] - code[0][0] < 1 << 20
