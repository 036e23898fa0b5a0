"""Guest RAM between guard pages: the RAM of VMs mapped one after another in one
process (a fleet worker's) stays one mapping each, which is what lets smaps charge
each guest its own pages, and a host access just past one VM's RAM faults instead
of reaching another's."""

from __future__ import annotations

import ctypes
import faulthandler
import os
import signal

from dksm.memory.accounting import process_mappings
from dksm.memory.guest_memory import GuestMemory
from dksm.memory.host_mapping import PAGE_SIZE

MIB = 1 << 20


def test_each_guests_ram_is_a_mapping_of_its_own() -> None:
    memories = [GuestMemory(4 * MIB) for _ in range(4)]
    try:
        for memory in memories:
            memory.write(0, b"\1" * PAGE_SIZE)  # touched, as a booted guest's is
            memory.write(memory.size - PAGE_SIZE, b"\1" * PAGE_SIZE)
        maps = process_mappings(os.getpid())
        for memory in memories:
            start, end = memory.host_address, memory.host_address + memory.size
            overlapping = [m for m in maps if m.start < end and m.end > start]
            assert overlapping, "the RAM is not mapped"
            assert all(m.within(start, memory.size) for m in overlapping), (
                "a mapping reaches past this guest's RAM"
            )
            assert sum(m.rss for m in overlapping) == 2 * PAGE_SIZE
            guards = [m for m in maps if m.end == start or m.start == end]
            assert len(guards) == 2 and all(m.rss == 0 for m in guards)
    finally:
        for memory in memories:
            memory.close()


def test_a_write_just_past_the_ram_faults() -> None:
    memory = GuestMemory(MIB)
    pid = os.fork()
    if pid == 0:
        faulthandler.disable()  # the fault is the point: no report of it in the test log
        ctypes.memset(memory.host_address + memory.size, 1, 1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    memory.close()
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSEGV
