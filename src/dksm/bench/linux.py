"""How much of a Linux kernel stays shared: a fleet of Linux VMs, page by page.

Each VM boots the fetched Debian cloud kernel with the busybox initramfs
(:mod:`dksm.guests.linux`) until the kernel runs ``/init``, and ends (``reboot -f``,
or on a PVM host the panic of an init whose system calls fail, with ``panic=1``); its RAM
stays mapped until the experiment has looked at it, as a held fleet's does.  The
VMs run in this process, one vCPU thread each, so that their memory can be read
page by page.  Per mode:

- **at load**: the kernel's read-only pages the loader mapped from the pool (the
  read-only ``PT_LOAD``: ``.text``, ``.rodata`` and what the linker put with them);
- **after boot**: the state of each of those pages from ``/proc/PID/pagemap``
  (:mod:`dksm.memory.page_states`): still the pool's frame (read, or never
  touched), or a private copy; with KSM, ``/proc/kpageflags`` says which copies
  KSM merged;
- **why**: every copied page of the first VM compared with the image's bytes and
  explained by the kernel's own patch-site tables (:mod:`dksm.analyze.kernel_patching`);
  whether the other VMs' copies hold the same bytes as the first's (identical
  patching on identical virtual hardware);
- **post-boot merge** (mode ``dksm+merge``): when a VM's kernel says it runs
  ``/init``, the VMM hands the kernel's copied pages to the pool's ``merge()`` once
  (:mod:`dksm.fleet.boot_merge`, what ``dksm run --merge-after`` does).  Pages
  rewritten with their original bytes find their pool page again; patched pages
  are stored once and shared by every later VM.
- **KSM** (modes ``ksm`` and ``dksm+ksm``): guest RAM advised mergeable; once every
  VM has ended, ksmd runs at the given rate in a saved-and-restored session,
  sampled until its counters stop changing; its CPU time is ksmd's.  KSM is
  host-wide, so the session is kept to that post-boot pass rather than held
  through boots that take minutes each; the final state is what KSM reaches
  either way, the CPU is what one pass over booted guests costs.

Memory is the process's anonymous PSS plus the pool's bytes on tmpfs
(:mod:`dksm.memory.accounting`), so the interpreter's own pages are in every mode;
it is sampled every few seconds from the first boot to the end, for
:func:`plot`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from dksm.analyze.kernel_patching import explain_pages, kernel_layout
from dksm.dedup.pool import PagePool
from dksm.error import DksmError
from dksm.fleet.instance import DedupMode, Instance, InstanceSpec
from dksm.guests import linux
from dksm.loader.elf import load_elf
from dksm.loader.segment import PAGE_SIZE, shareable_span
from dksm.memory.accounting import process_memory
from dksm.memory.page_states import PageState, page_states
from dksm.vmm.config import VmConfig
from dksm.vmm.machine import ExitCause

MIB = 1 << 20
LINUX_MEM_MIB = 128
# The kernel's line before /init: its patching is done (and on a PVM host /init's
# first system call fails, docs/BOOT.md), so boots are timed and merged here.
BOOTED = linux.KERNEL_BOOTED.encode()
MERGE_MODE = "dksm+merge"
MODES = ("none", "dksm", MERGE_MODE, "ksm", "dksm+ksm")
KSM_SAMPLE_S = 1.0
MEMORY_SAMPLE_S = 5.0
STOP_WAIT_S = 60.0
KSM_SETTLED_S = 10.0
KPAGEFLAGS = "/proc/kpageflags"
KPF_KSM = 1 << 21
PFN_MASK = (1 << 55) - 1


class LinuxBenchError(DksmError):
    """The Linux sharing experiment could not run; the message says why."""


class BootWatch:
    """A VM's console: kept in memory, with the time of the first byte and of the
    kernel's "Run /init" line."""

    def __init__(self, tee: BinaryIO | None = None) -> None:
        self.started = time.monotonic()
        self.tee = tee  # a log file the console is also written to, as it comes
        self.text = bytearray()
        self.first_byte_s: float | None = None
        self.banner_s: float | None = None

    def write(self, data: bytes, /) -> int:
        if self.first_byte_s is None:
            self.first_byte_s = time.monotonic() - self.started
        if self.tee is not None:
            self.tee.write(data)
        self.text += data
        if self.banner_s is None and BOOTED in self.text[-len(data) - len(BOOTED) :]:
            self.banner_s = time.monotonic() - self.started
        return len(data)


@dataclass
class VmResult:
    """One VM's boot and its kernel pages."""

    boot_s: float | None
    first_output_s: float | None
    cause: str
    pages_at_load: int
    states: dict[str, int]
    copied_at_merge: int = 0  # kernel pages that were copies when the kernel had booted
    merged: int = 0  # of them, found in the pool by the post-boot merge
    stored: int = 0  # of them, new pool pages
    merge_cpu_s: float = 0.0


@dataclass
class ModeResult:
    mode: str
    instances: int
    vms: list[VmResult]
    memory_mib: float
    pool_mib: float
    ksm_cpu_s: float = 0.0
    ksm_pages_sharing: int = 0
    ksm_settled_s: float = 0.0
    identical_copies: int = 0  # pages VMs 1.. wrote (copied or merged) equal to VM 0's
    why_copied: dict[str, object] = field(default_factory=dict)
    ksm_started_s: float = 0.0  # when ksmd was switched on, since the first boot
    # (seconds since the first boot, memory in MiB): process Pss_Anon + pool bytes
    samples: list[tuple[float, float]] = field(default_factory=list)


def _kernel_ranges(kernel: str, mem_size: int) -> tuple[list[tuple[int, int]], dict[int, bytes]]:
    """Guest ranges the pool shares, and the image's bytes of each such page."""
    ranges = []
    original: dict[int, bytes] = {}
    for segment in load_elf(kernel, mem_size).segments:
        start, end = shareable_span(segment)
        if end > start:
            ranges.append((start, end))
            for address in range(start, end, PAGE_SIZE):
                offset = address - segment.guest_addr
                original[address] = segment.data[offset : offset + PAGE_SIZE]
    return ranges, original


def _states(instance: Instance, ranges: list[tuple[int, int]]) -> dict[int, PageState]:
    base = instance.vm.memory.host_address
    out: dict[int, PageState] = {}
    for start, end in ranges:
        for i, state in enumerate(
            page_states(os.getpid(), base + start, (end - start) // PAGE_SIZE)
        ):
            out[start + i * PAGE_SIZE] = state
    return out


def _ksm_pages(addresses: list[int]) -> int:
    """How many of these host addresses (this process) are KSM pages now."""
    if not addresses:
        return 0
    count = 0
    with open(f"/proc/{os.getpid()}/pagemap", "rb") as pagemap, open(KPAGEFLAGS, "rb") as flags:
        for address in addresses:
            pagemap.seek(address // PAGE_SIZE * 8)
            entry = int.from_bytes(pagemap.read(8), "little")
            if not entry >> 63:
                continue
            flags.seek((entry & PFN_MASK) * 8)
            if int.from_bytes(flags.read(8), "little") & KPF_KSM:
                count += 1
    return count


def run_mode(
    mode: str,
    count: int,
    *,
    kernel: str,
    initrd: str,
    boot_args: str = linux.BOOT_ARGS,
    mem_mib: int = LINUX_MEM_MIB,
    pool_root: Path | None = None,
    timeout: float = 3600.0,
    ksm_settings: dict[str, int] | None = None,
    console_dir: Path | None = None,
    log: Callable[[str], None] = lambda _line: None,
) -> ModeResult:
    """Boot ``count`` Linux VMs in ``mode`` and look at their kernel pages."""
    if mode not in MODES:
        raise LinuxBenchError(f"unknown mode '{mode}'; choose from {', '.join(MODES)}")
    dedup = DedupMode.DKSM if mode == MERGE_MODE else DedupMode.parse(mode)
    config = VmConfig(kernel_path=kernel, initrd_path=initrd, boot_args=boot_args, mem_mib=mem_mib)
    ranges, original = _kernel_ranges(kernel, config.mem_size)
    domain = f"linux-bench-{os.getpid()}-{mode.replace('+', '-')}"
    results: list[VmResult] = []
    instances: list[Instance] = []
    watches: list[BootWatch] = []
    samples: list[tuple[float, float]] = []
    with contextlib.ExitStack() as stack:
        spec = InstanceSpec(config=config, dedup=dedup, domain=domain, pool_root=pool_root)
        # One pool handle for the process (LMDB must not be opened twice in one
        # process); a lease per VM, released after its VM is closed.
        pool = stack.enter_context(contextlib.closing(PagePool.open(domain, pool_root)))
        for index in range(count):
            vm_result = VmResult(None, None, "", 0, {})
            lease = pool.lease()
            stack.callback(lease.release)
            tee = None
            if console_dir is not None:
                name = f"{mode.replace('+', '-')}-x{count}-vm{index}.log"
                tee = stack.enter_context(open(console_dir / name, "wb", buffering=0))
            watch = BootWatch(tee)
            sharer = lease if dedup.uses_pool else None
            merge_after = BOOTED if mode == MERGE_MODE else None
            instance = stack.enter_context(
                Instance(spec, watch, sharer=sharer, merge_after=merge_after)
            )
            vm_result.pages_at_load = instance.vm.memory.pages_shared
            instances.append(instance)
            watches.append(watch)
            results.append(vm_result)
        log(f"{mode} x{count}: booting")
        started = time.monotonic()

        def sample() -> None:
            usage = process_memory(os.getpid())
            total = (usage.pss_anon if usage else 0) + pool.stats().file_blocks_bytes
            samples.append((time.monotonic() - started, total / MIB))

        for instance, watch in zip(instances, watches, strict=True):
            watch.started = time.monotonic()
            instance.vm.start()
        deadline = started + timeout
        for index, instance in enumerate(instances):
            while not instance.vm.wait(min(MEMORY_SAMPLE_S, max(0.0, deadline - time.monotonic()))):
                sample()
                if time.monotonic() >= deadline:
                    instance.vm.stop(ExitCause.TIMEOUT, f"no exit within {timeout:g} s")
                    instance.vm.wait(STOP_WAIT_S)
                    break
            outcome = instance.vm.outcome
            results[index].cause = outcome.describe() if outcome else "?"
            results[index].boot_s = watches[index].banner_s
            results[index].first_output_s = watches[index].first_byte_s
            merge = instance.boot_merge.result if instance.boot_merge else None
            if merge is not None:
                results[index].copied_at_merge = merge.copied
                results[index].merged = merge.merged
                results[index].stored = merge.stored
                results[index].merge_cpu_s = merge.cpu_s
            log(
                f"{mode} x{count}: vm {index}: {results[index].cause}, kernel booted after "
                f"{watches[index].banner_s} s"
            )
        sample()
        ksm_cpu = ksm_pages_sharing = settled = ksm_started = 0.0
        if dedup.uses_ksm:
            from dksm.dedup import ksm

            with ksm.KsmSession() as session:
                ksm_started = time.monotonic() - started
                ksm_cpu_before = ksm.ksmd_cpu_seconds()
                session.apply(run=1, **(ksm_settings or {}))
                settled = _wait_ksm_settled(log, sample)
                ksm_cpu = ksm.ksmd_cpu_seconds() - ksm_cpu_before
                ksm_pages_sharing = ksm.read_counters().get("pages_sharing", 0)
                result = _measure(mode, count, instances, results, ranges, original, pool)
        else:
            result = _measure(mode, count, instances, results, ranges, original, pool)
        sample()
        result.ksm_cpu_s = ksm_cpu
        result.ksm_pages_sharing = int(ksm_pages_sharing)
        result.ksm_settled_s = settled
        result.ksm_started_s = ksm_started
        result.samples = samples
    with contextlib.closing(PagePool.open(domain, pool_root)) as pool:
        pool.purge()  # every lease is released: the domain's pool goes too
    return result


def _wait_ksm_settled(log: Callable[[str], None], sample: Callable[[], None]) -> float:
    """Sample KSM until pages_sharing has not changed for a while; seconds taken."""
    from dksm.dedup import ksm

    started = time.monotonic()
    last = -1
    stable_since = started
    full_scans = ksm.read_counters().get("full_scans", 0)
    while True:
        time.sleep(KSM_SAMPLE_S)
        sample()
        counters = ksm.read_counters()
        sharing = counters.get("pages_sharing", 0)
        now = time.monotonic()
        if sharing != last:
            last, stable_since = sharing, now
        if now - stable_since >= KSM_SETTLED_S and counters.get("full_scans", 0) >= full_scans + 3:
            log(f"ksm settled: pages_sharing {sharing}")
            return stable_since - started


def _measure(
    mode: str,
    count: int,
    instances: Sequence[Instance],
    results: list[VmResult],
    ranges: list[tuple[int, int]],
    original: dict[int, bytes],
    pool: PagePool,
) -> ModeResult:
    first_copies: dict[int, bytes] = {}
    identical = 0
    explained: list[tuple[int, bytes, bytes]] = []
    for index, instance in enumerate(instances):
        states = _states(instance, ranges)
        tally: dict[str, int] = {}
        copied = [a for a, s in states.items() if s == PageState.ANONYMOUS]
        for state in states.values():
            tally[state.value] = tally.get(state.value, 0) + 1
        base = instance.vm.memory.host_address
        if mode in ("ksm", "dksm+ksm"):
            tally["merged by KSM"] = _ksm_pages([base + a for a in copied]) if copied else 0
        results[index].states = tally
        merge = instance.boot_merge.result if instance.boot_merge else None
        # With the post-boot merge, the pages the boot copied hold what the guest
        # wrote (now from the pool), unless written again since (then copied again).
        written = sorted(set(copied) | set(merge.pages if merge else ()))
        for address in written:
            current = instance.vm.memory.read(address, PAGE_SIZE)
            if index == 0:
                first_copies[address] = current
                explained.append((address, original[address], current))
            elif first_copies.get(address) == current:
                identical += 1
    usage = process_memory(os.getpid())
    pool_bytes = pool.stats().file_blocks_bytes
    why = (
        explain_pages(
            kernel_layout(Path(instances[0].spec.config.kernel_path).read_bytes()), explained
        ).to_json()
        if explained
        else {}
    )
    return ModeResult(
        mode=mode,
        instances=count,
        vms=results,
        memory_mib=(usage.pss_anon if usage else 0) / MIB,
        pool_mib=pool_bytes / MIB,
        identical_copies=identical,
        why_copied=why,
    )


def plot(results: Sequence[ModeResult], path: Path) -> None:
    """Memory over time, one line per mode and fleet size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for r in results:
        if r.samples:
            ax.plot(
                [t / 60 for t, _ in r.samples],
                [mib for _, mib in r.samples],
                label=f"{r.mode}, {r.instances} VM{'s' if r.instances > 1 else ''}",
                linewidth=2,
            )
    ax.set_title(
        "Linux microVMs (Debian cloud kernel): memory from load to after boot", fontsize=10
    )
    ax.set_xlabel("minutes since the VMs started")
    ax.set_ylabel("memory (MiB: Pss_Anon + pool)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
