"""The post-boot merge: once a guest says its boot is complete, the pages of its
kernel image that it rewrote while booting are handed back to the page pool, once,
by the VMM itself (no daemon, no scanning).

Linux patches its own code and ``__ro_after_init`` data while it boots
(alternatives, paravirt, static calls, jump labels: :mod:`dksm.analyze.kernel_patching`
names them), and each page it writes becomes a private copy of the pool page the
loader mapped.  Identical kernels patched on identical virtual hardware write
identical bytes, so the first VM's copies become new pool pages and every later
VM's copies find them there: :meth:`dksm.dedup.pool.Lease.merge`.

The trigger is a line on the guest's console (the shipped Linux guest's ``/init``
prints one).  The merge runs on the vCPU thread that wrote it, inside the serial
write, so that vCPU is outside the guest; with one vCPU no one else writes guest
RAM meanwhile, which ``merge()`` requires, so VMs with more vCPUs are refused.
Which pages: those of the load-time pool spans that pagemap says are no longer
the pool's file pages, read through a pagemap opened when the VM is built (a
confined VMM cannot open it later).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from dksm.error import DksmError
from dksm.memory.page_states import PAGE_SIZE, Pagemap, PageState

TYPE_CHECKING = False  # typing's, without importing typing (see the dksm package)
if TYPE_CHECKING:
    from dksm.dedup.pool import Lease
    from dksm.devices.serial import ByteSink
    from dksm.memory.guest_memory import GuestMemory

# A trigger that was never seen must not keep the whole console in memory.
TRIGGER_LIMIT = 4096
# The VMs of one process share its pool handle: their merges take turns.
_MERGING = threading.Lock()


class BootMergeError(DksmError):
    """The post-boot merge cannot be set up for this VM; the message says why."""


@dataclass
class BootMergeResult:
    """What one post-boot merge did."""

    copied: int = 0  # kernel pages that were private copies when the guest said so
    merged: int = 0  # of them, found in the pool (another VM had stored them)
    stored: int = 0  # of them, new pool pages
    cpu_s: float = 0.0  # this thread's CPU time, pagemap read included
    at_s: float = 0.0  # seconds from the first console byte to the trigger
    pages: list[int] = field(default_factory=list)  # guest addresses of the copies


class BootMerge:
    """A console sink that watches for ``trigger`` and then merges once.

    Wraps the VM's real console: every byte goes through unchanged.  :meth:`attach`
    gives it the VM's memory and pool lease once they exist (before the guest runs).
    """

    def __init__(self, sink: ByteSink, trigger: bytes, vcpu_count: int) -> None:
        if not trigger or len(trigger) > TRIGGER_LIMIT:
            raise BootMergeError(
                f"the post-boot merge's trigger must be 1 to {TRIGGER_LIMIT} bytes of console text"
            )
        if vcpu_count != 1:
            raise BootMergeError(
                "the post-boot merge needs a VM with one vCPU (merging guest RAM while "
                "another vCPU runs could lose its writes)"
            )
        self.sink = sink
        self.trigger = trigger
        self.result: BootMergeResult | None = None
        self._tail = b""
        self._first_byte: float | None = None
        self._memory: GuestMemory | None = None
        self._lease: Lease | None = None
        self._pagemap: Pagemap | None = None

    def attach(self, memory: GuestMemory, lease: Lease, pid: int) -> None:
        try:
            self._pagemap = Pagemap(pid)
        except OSError as exc:
            raise BootMergeError(f"cannot read this process's pagemap: {exc.strerror}") from exc
        self._memory = memory
        self._lease = lease

    def close(self) -> None:
        if self._pagemap is not None:
            self._pagemap.close()
            self._pagemap = None

    def write(self, data: bytes, /) -> object:
        written = self.sink.write(data)
        if self.result is None and self._pagemap is not None:
            if self._first_byte is None:
                self._first_byte = time.monotonic()
            seen = self._tail + data
            if self.trigger in seen:
                self.result = self._merge(time.monotonic() - self._first_byte)
            else:
                self._tail = seen[-(len(self.trigger) - 1) :] if len(self.trigger) > 1 else b""
        return written

    def _merge(self, at_s: float) -> BootMergeResult:
        assert self._memory is not None and self._lease is not None
        assert self._pagemap is not None
        with _MERGING:
            return self._merge_copies(at_s)

    def _merge_copies(self, at_s: float) -> BootMergeResult:
        assert self._memory is not None and self._lease is not None
        assert self._pagemap is not None
        started = time.thread_time()
        result = BootMergeResult(at_s=at_s)
        base = self._memory.host_address
        for start, end in self._memory.shared_spans:
            states = self._pagemap.states(base + start, (end - start) // PAGE_SIZE)
            run_start: int | None = None
            for i, state in enumerate([*states, None]):
                copied = state == PageState.ANONYMOUS
                if copied and run_start is None:
                    run_start = i
                elif not copied and run_start is not None:
                    merged = self._lease.merge(
                        base + start + run_start * PAGE_SIZE, (i - run_start) * PAGE_SIZE
                    )
                    result.copied += i - run_start
                    result.pages.extend(start + j * PAGE_SIZE for j in range(run_start, i))
                    result.merged += merged.pages_merged
                    result.stored += merged.pages_new
                    run_start = None
        result.cpu_s = time.thread_time() - started
        return result
