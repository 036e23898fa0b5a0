"""Many microVMs from one prepared interpreter: a supervisor forks worker processes,
each hosting one or more VMs.

Why fork: a fresh Python interpreter with dksm imported costs ~10 MiB of private
memory, more than a unikernel's shared code saves.  Forked workers share the
supervisor's pages copy-on-write and pay for what they write, which in Python 3.11
(no immortal objects) is every page holding an object their code touches.  So the
supervisor does all it can once, before forking: imports, parses each image,
references each VM's pool pages, plans each distinct config's build
(:func:`dksm.vmm.builder.plan_build`), rehearses a build so that the interpreter
specialises its code in shared pages (:meth:`FleetLauncher._rehearse`), collects,
fills the allocator's free blocks and freezes the collector's objects, and forks
with nothing in between (:mod:`dksm.fleet.worker_fork`).  A worker then only
copies, maps and issues ioctls.

``vms_per_worker`` trades isolation for density.  A worker runs K VMs, each on a
vCPU thread of its own (the GIL is released inside ``KVM_RUN``): a guest's fault
or an exception in the VMM ends only its own VM, but killing the worker ends its K
VMs.  With K = 1 every VM has its own process, like Firecracker, and pays for its
own interpreter pages: measured at 1,000 idle VMs, 2.4 MiB of host memory per VM,
against 0.4 MiB with K = 8 (the default).  A worker of one VM with one vCPU and no
device threads runs that vCPU on its main thread (:func:`_run_alone`), and each
VM's info file is a template the supervisor filled but for three integers
(:meth:`dksm.fleet.instance.Instance.info_template`).  Either way the supervisor
reaps, records why, and sweeps the pool so the leases of dead VMs are released.

Workers report each VM's events (booted: its first complete console line; ended:
its outcome file is written) through one shared pipe, as 8-byte records: writes
that small are atomic on a pipe, so records from many workers never interleave.

Workers are confined (:mod:`dksm.vmm.confinement`) once all their VMs are built and
before any of them runs; the supervisor is not, as it must sweep the pools.  A
confined worker opens no file, so each VM's log and outcome files are opened while
it is built.  Its seccomp program, which names its pid, is compiled by the
supervisor and comes with the "go": compiling it in the worker would cost each
worker about 0.9 MiB of private memory.  Nor may a confined worker remove the vsock
sockets its VMs listened on: a worker with vsock devices writes each one down on a
pipe of its own as it makes it (:mod:`dksm.vmm.socket_cleanup`), and the supervisor
removes them once it has reaped the worker.

Why one module over 500 lines: it holds both ends of one protocol, the supervisor's
(fork, send the go with the worker's seccomp program, read event records) and the
worker's (host its VMs, report them); the record formats and the order of the
steps change together on both sides, so they are read together.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import json
import os
import select
import signal
import struct
import time
import traceback
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, NoReturn

from dksm.dedup.mapping import ReferencedPages, SlotMapper
from dksm.dedup.owner import ProcessIdentity
from dksm.dedup.pool import Lease, PagePool
from dksm.error import DksmError
from dksm.fleet.directory import LIVE_STATES, FleetDirectory, Member, VmOutcome
from dksm.fleet.instance import Instance, InstanceSpec
from dksm.fleet.worker_fork import (
    fill_allocator_holes,
    fork_worker,
    single_threaded,
    trim_heap,
    wait_single_threaded,
)
from dksm.loader.elf import load_elf, preload_images
from dksm.loader.initrd import place_initrd, preload_initrds, read_initrd
from dksm.loader.segment import Segment, shareable_span
from dksm.vmm.builder import BuildPlan, build, plan_build
from dksm.vmm.confinement import Confinement
from dksm.vmm.device_manager import device_kinds
from dksm.vmm.exit_status import ExitStatus, status_for
from dksm.vmm.machine import ExitCause, MicroVm
from dksm.vmm.socket_cleanup import RECORD_MAX, remove_reported, report_to

if TYPE_CHECKING:
    from dksm.memory.guest_memory import PageSharer

DEFAULT_VMS_PER_WORKER = 8
EVENT_RECORD = struct.Struct("<II")  # VM index, event
EVENT_BOOTED = 0
EVENT_ENDED = 1
EVENT_HELD = 2  # the guest shut down; its memory is kept until the fleet stops
GO = b"g"  # then the length (u32) and bytes of the worker's seccomp program
GO_HEADER = struct.Struct("<cI")
SIGTERM_DETAIL = "fleet stopped (SIGTERM)"


class FleetError(DksmError):
    """A fleet could not be started or managed."""


class _ConsoleLog:
    """The console sink of a fleet VM: its log file, plus a "booted" event to the
    supervisor at the first end of line."""

    def __init__(self, log_fd: int, event_fd: int, index: int) -> None:
        self.log_fd = log_fd
        self.event_fd = event_fd
        self.index = index
        self.booted = False

    def write(self, data: bytes, /) -> int:
        written = os.write(self.log_fd, data)
        if not self.booted and b"\n" in data:
            self.booted = True
            os.write(self.event_fd, EVENT_RECORD.pack(self.index, EVENT_BOOTED))
        return written


def _raise_interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


class _NoConsole:
    """The console of a rehearsal VM, whose guest never runs."""

    def write(self, data: bytes, /) -> int:
        return len(data)


_NO_CONSOLE = _NoConsole()
REHEARSALS = 16  # enough calls for 3.11 to specialise what a build runs
REHEARSAL_THREADS_TIMEOUT = 2.0  # seconds for the rehearsals' vCPU threads to be gone


class _VmOrder:
    """What the supervisor computes for one VM before forking its worker, so that
    the worker only uses it: the pages referenced for it, the config-only part of
    its build, the names of its files."""

    __slots__ = ("index", "info", "info_template", "log", "outcome", "plan", "sharer", "spec")

    def __init__(
        self,
        index: int,
        spec: InstanceSpec,
        sharer: PageSharer | None,
        plan: BuildPlan | None,
        files: FleetDirectory,
    ) -> None:
        self.index = index
        self.spec = spec
        self.sharer = sharer
        self.plan = plan  # None: the worker plans (and reports the error planning met)
        self.log = str(files.vm_log(index))
        self.outcome = str(files.vm_outcome(index))
        self.info = str(files.vm_info(index))
        self.info_template = Instance.info_template(spec)


class _HostedVm:
    """One VM inside a worker: its instance, console log and outcome file, built
    when made and started by :meth:`start`."""

    def __init__(self, order: _VmOrder, event_fd: int, hold: bool = False) -> None:
        index = order.index
        self.index = index
        self.event_fd = event_fd
        self.hold = hold
        self.held = False
        self.instance: Instance | None = None
        create = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        self.log_fd = os.open(order.log, create, 0o644)
        # Empty until the VM ends: the supervisor reads it only after the "ended"
        # event, or after the worker died (an empty file then says as little as none).
        self.outcome_fd = os.open(order.outcome, create, 0o644)
        self.status = ExitStatus.VMM_ERROR
        try:
            console = _ConsoleLog(self.log_fd, event_fd, index)
            self.instance = Instance(order.spec, console, sharer=order.sharer, plan=order.plan)
            self.instance.write_info(order.info, order.info_template)
        except DksmError as exc:
            self.finish(ExitStatus.ERROR, "error", str(exc))
        except Exception as exc:
            os.write(self.log_fd, traceback.format_exc().encode())
            self.finish(ExitStatus.VMM_ERROR, "vmm error", f"{type(exc).__name__}: {exc}")

    def start(self) -> None:
        if self.instance is not None:
            self.instance.vm.start()

    @property
    def running(self) -> bool:
        return self.instance is not None

    def poll(self, stopping: bool = False) -> None:
        """If the VM has ended, close it (releasing its lease) and report.

        A fleet that holds its VMs keeps a guest that shut down mapped as it was at
        its end (reported as held) until the fleet stops: run-to-completion guests
        can then be measured as a fleet, as if they went on serving."""
        if self.instance is None:
            return
        outcome = self.instance.vm.outcome
        if outcome is None:
            return
        status = status_for(outcome.cause)
        if self.hold and status == ExitStatus.OK and not stopping:
            if not self.held:
                self.held = True
                self._write_outcome(status, outcome.cause.value, outcome.detail)
                os.write(self.event_fd, EVENT_RECORD.pack(self.index, EVENT_HELD))
            return
        # A held VM ends as its guest ended; its outcome is written already.
        self.finish(status, outcome.cause.value, outcome.detail)

    def _write_outcome(self, status: ExitStatus, cause: str, detail: str) -> None:
        """Once, through the file opened at build (a confined worker opens nothing)."""
        if self.outcome_fd < 0:
            return
        outcome = VmOutcome(cause, detail, int(status))
        try:
            os.write(self.outcome_fd, json.dumps(outcome.to_json()).encode())
        finally:
            os.close(self.outcome_fd)
            self.outcome_fd = -1

    def finish(self, status: ExitStatus, cause: str, detail: str) -> None:
        self.status = status
        if self.instance is not None:
            instance, self.instance = self.instance, None
            instance.close()
        with contextlib.suppress(OSError):
            self._write_outcome(status, cause, detail)
            os.write(self.event_fd, EVENT_RECORD.pack(self.index, EVENT_ENDED))
            os.close(self.log_fd)


def _worker_main(
    group: Sequence[_VmOrder],
    files: FleetDirectory,
    event_fd: int,
    go_fd: int,
    hold: bool,
    confinement: Confinement | None,
) -> NoReturn:
    """The body of a forked worker: build ``group``'s VMs, confine itself, run them
    until they end; never returns."""
    status = ExitStatus.VMM_ERROR
    vms: list[_HostedVm] = []
    try:
        signal.signal(signal.SIGTERM, _raise_interrupt)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides
        # Map nothing before the supervisor has made this process the owner of the
        # leases covering its pool pages; no "go" (the supervisor died) means stop.
        program = _read_go(go_fd)
        if program is None:
            os._exit(int(ExitStatus.ERROR))
        os.close(go_fd)
        vms = [_HostedVm(order, event_fd, hold) for order in group]
        if confinement is not None:
            try:
                confinement.apply(program)
            except DksmError as exc:
                for vm in vms:
                    vm.finish(ExitStatus.ERROR, "error", str(exc))
        trim_heap()  # what building used and freed is this worker's own
        try:
            alone = vms[0].instance.vm if len(vms) == 1 and vms[0].instance else None
            # Not with device threads: SIGTERM could reach one of them instead, and
            # leave this thread in KVM_RUN.
            if alone is not None and not alone.smp and not alone.devices:
                _run_alone(alone)
            else:
                for vm in vms:
                    vm.start()
            while any(vm.running for vm in vms):
                if all(vm.held or not vm.running for vm in vms):
                    time.sleep(0.5)  # only held VMs: nothing runs until SIGTERM
                for vm in vms:
                    if vm.instance is not None and not vm.held:
                        vm.instance.vm.wait(0.05 if len(vms) > 1 else 0.5)
                        vm.poll()
        except KeyboardInterrupt:
            for vm in vms:
                if vm.instance is not None:
                    vm.instance.vm.stop(ExitCause.INTERRUPTED, SIGTERM_DETAIL)
                    vm.poll(stopping=True)
        status = max((vm.status for vm in vms), default=ExitStatus.OK)
    except BaseException:
        with contextlib.suppress(BaseException):
            files.worker_error(os.getpid()).write_text(traceback.format_exc())
    finally:
        os._exit(int(status))


def _run_alone(machine: MicroVm) -> None:
    """Run a worker's only VM, of one vCPU, on the worker's main thread until it ends:
    a thread of its own would cost the worker ~200 KiB.  SIGTERM then asks the vCPU
    loop to stop the VM (the handler interrupts the loop itself, so it may not take
    the VM's locks), and is raised as :class:`KeyboardInterrupt` once the loop has
    returned, as the worker's other waits get it."""

    def stop(_signum: int, _frame: FrameType | None) -> None:
        machine.request_stop(ExitCause.INTERRUPTED, SIGTERM_DETAIL)

    signal.signal(signal.SIGTERM, stop)
    try:
        machine.run_here()
    finally:
        signal.signal(signal.SIGTERM, _raise_interrupt)
    if machine.stop_request is not None:
        raise KeyboardInterrupt


def _read_exactly(fd: int, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _read_go(go_fd: int) -> bytes | None:
    """The worker's seccomp program (empty when unconfined) once the supervisor says
    go; None if it died first."""
    header = _read_exactly(go_fd, GO_HEADER.size)
    if len(header) != GO_HEADER.size:
        return None
    go, length = GO_HEADER.unpack(header)
    program = _read_exactly(go_fd, length)
    return program if go == GO and len(program) == length else None


def _read_outcome(files: FleetDirectory, index: int) -> tuple[str, str] | None:
    """(state, reason) from a VM's outcome file, or None if it wrote none."""
    outcome = files.read_outcome(index)
    if outcome is None:
        return None
    if outcome.status == ExitStatus.OK:
        return "exited", outcome.reason
    if outcome.status == ExitStatus.INTERRUPTED:
        return "stopped", outcome.reason
    return "failed", outcome.reason


def _describe_wait_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"worker killed by signal {signal.Signals(os.WTERMSIG(status)).name}"
    return f"worker exited with status {os.WEXITSTATUS(status)} without a report"


class FleetLauncher:
    """Forks and supervises fleet workers; lives in the supervisor process."""

    def __init__(
        self,
        files: FleetDirectory,
        vms_per_worker: int = DEFAULT_VMS_PER_WORKER,
        *,
        hold: bool = False,
        confinement: Confinement | None,
    ) -> None:
        """``hold``: keep each VM whose guest shuts down mapped until the fleet stops.
        ``confinement``: what each worker gives up before its VMs run; None runs them
        with the supervisor's privileges."""
        if vms_per_worker < 1:
            raise FleetError(f"VMs per worker must be at least 1, not {vms_per_worker}")
        self.files = files
        self.vms_per_worker = vms_per_worker
        self.hold = hold
        self.confinement = confinement
        self.members: list[Member] = []  # by VM index
        self.workers: dict[int, list[Member]] = {}  # live worker pid -> its VMs
        self._events_r, self._events_w = os.pipe()
        self._events_buffer = b""
        self._pools: dict[tuple[str, Path | None], PagePool] = {}
        self._pages_fds: dict[tuple[str, Path | None], int] = {}
        self._leases: dict[int, tuple[PagePool, Lease]] = {}  # by VM index
        # Per image (with its initrd) and domain: the pages referenced for its first VM
        # in launch().
        self._first_of_image: dict[
            tuple[str, Path | None, str, int, str | None], dict[bytes, ReferencedPages]
        ] = {}
        self._plans: dict[str, BuildPlan | None] = {}  # by config, during launch()
        # Live worker pid -> the read end of the pipe its vsock sockets are reported on.
        self._socket_reports: dict[int, int] = {}

    def launch(self, specs: Sequence[tuple[str, InstanceSpec]]) -> None:
        """Fork workers for every (label, spec), ``vms_per_worker`` VMs each."""
        self._prepare_for_fork(specs)
        base = len(self.members)
        indexed = [(base + i, label, spec) for i, (label, spec) in enumerate(specs)]
        # All pool work first, then all forks, then all hand-overs: every page the
        # supervisor writes after a fork is copied, and the copy left behind is
        # private to the workers already forked.
        orders = [
            _VmOrder(i, spec, self._reference_pages(i, spec), self._plan(spec), self.files)
            for i, _, spec in indexed
        ]
        groups = [
            (
                indexed[start : start + self.vms_per_worker],
                orders[start : start + self.vms_per_worker],
            )
            for start in range(0, len(indexed), self.vms_per_worker)
        ]
        kinds = [
            {k for _, _, spec in group for k in device_kinds(spec.config)} for group, _ in groups
        ]
        forked: list[tuple[int, int]] = []  # (pid, go pipe) per group
        self._rehearse(orders)
        gc.collect()
        fill_allocator_holes()
        gc.freeze()
        trim_heap()
        # Between two forks the supervisor does as little as it can: each page it
        # writes there is copied once for every worker forked before.
        bare = single_threaded()
        try:
            for (_, hosted), group_kinds in zip(groups, kinds, strict=True):
                go_r, go_w = os.pipe()
                reports = self._socket_report_pipe(len(hosted)) if "vsock" in group_kinds else None
                pid = fork_worker(bare)
                if pid == 0:
                    os.close(self._events_r)
                    os.close(go_w)
                    for fd in self._socket_reports.values():  # other workers' pipes
                        os.close(fd)
                    if reports is not None:
                        os.close(reports[0])
                        report_to(reports[1])
                    _worker_main(
                        hosted, self.files, self._events_w, go_r, self.hold, self.confinement
                    )
                os.close(go_r)
                if reports is not None:
                    os.close(reports[1])
                    self._socket_reports[pid] = reports[0]
                forked.append((pid, go_w))
        finally:  # the workers forked are supervised even if a later fork failed
            now = time.time()
            for (group, _), (pid, _) in zip(groups, forked, strict=False):
                members = [Member(i, label, pid, "booting", now) for i, label, _ in group]
                self.members.extend(members)
                self.workers[pid] = members
        for (group, _), (pid, go_w), group_kinds in zip(groups, forked, kinds, strict=True):
            self._hand_over(pid, [i for i, _, _ in group])
            program = b""
            if self.confinement is not None:  # with the calls of the group's devices
                program = self.confinement.filter_program(pid, group_kinds)
            with contextlib.suppress(BrokenPipeError):  # a worker that already died
                os.write(go_w, GO_HEADER.pack(GO, len(program)) + program)
            os.close(go_w)
        # The first VMs' leases may be released from now on: nothing may be referenced
        # again through them.
        self._first_of_image.clear()
        self._plans.clear()

    @staticmethod
    def _socket_report_pipe(vms: int) -> tuple[int, int]:
        """A pipe for a worker of ``vms`` VMs to report its vsock sockets on: large
        enough for one record per VM, since the supervisor reads it only once the
        worker has ended (a full pipe would stop the worker building)."""
        read_end, write_end = os.pipe()
        os.set_blocking(read_end, False)  # a stray holder of the write end never stalls a reap
        needed = vms * RECORD_MAX
        with contextlib.suppress(OSError):  # the default is 64 KiB: 500 VMs
            if needed > fcntl.fcntl(write_end, fcntl.F_GETPIPE_SZ):
                fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, needed)
        return read_end, write_end

    def _rehearse(self, orders: Sequence[_VmOrder]) -> None:
        """Build a VM of the first order's plan a few times, start it and stop it, and
        close it, before forking; the guest never runs (the VM is stopped before its
        vCPU threads start, so none enters it).

        Why: Python 3.11 specialises a function's bytecode in place after its first
        calls, writing into its code object (counters, then the specialised
        instructions).  Run here first, those writes land in the supervisor's pages,
        which the workers then share, instead of in every worker's own copy.
        Measured at 64 one-VM workers: ~3,380 KiB of a worker's own memory without,
        ~3,000 KiB with, for ~0.2 s of the supervisor's time.  Only VMs without
        virtio devices are rehearsed: a device's backend (a tap, a vsock socket) is
        the VM's alone."""
        plan = next((o.plan for o in orders if o.plan is not None), None)
        if plan is None or plan.config.virtio_device_count:
            return
        try:
            for _ in range(REHEARSALS):
                vm = build(plan.config, serial_sink=_NO_CONSOLE, plan=plan)
                try:
                    vm.finish(ExitCause.INTERRUPTED, "rehearsal")  # before any vCPU starts
                    vm.start()
                    vm.stop(ExitCause.INTERRUPTED, "rehearsal")
                finally:
                    vm.close()
        except DksmError:
            return  # the workers meet it, and report it
        finally:
            wait_single_threaded(REHEARSAL_THREADS_TIMEOUT)

    def _plan(self, spec: InstanceSpec) -> BuildPlan | None:
        """The config-only part of the VM's build, made once per distinct config; None
        if the config is wrong (the worker then meets and reports the same error)."""
        key = json.dumps(spec.config.to_dict(), sort_keys=True)
        if key not in self._plans:
            try:
                self._plans[key] = plan_build(spec.config, vcpu_state=True)
            except DksmError:
                self._plans[key] = None
        return self._plans[key]

    def _pool(self, spec: InstanceSpec) -> PagePool:
        key = (spec.domain, spec.pool_root)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = PagePool.open(spec.domain, spec.pool_root)
            self._pages_fds[key] = pool.pages_fd()
        return pool

    def _reference_pages(self, index: int, spec: InstanceSpec) -> PageSharer | None:
        """Reference the VM's read-only pages under a lease of its own, held by the
        supervisor until the worker exists to own it; the worker only maps them.

        The first VM of an image has its pages hashed, compared and stored; the
        others of that image take references to the same slots, which the first
        VM's lease keeps alive throughout :meth:`launch`."""
        if not spec.dedup.uses_pool:
            return None
        pool = self._pool(spec)
        lease = pool.lease()
        self._leases[index] = (pool, lease)
        config = spec.config
        key = (spec.domain, spec.pool_root, config.kernel_path, config.mem_size, config.initrd_path)
        first = self._first_of_image.get(key)
        by_content: dict[bytes, ReferencedPages] = {}
        if first is not None:
            for content, held in first.items():
                referenced = lease.reference_again(held)
                if referenced is not None:  # None: the pool's run switch is off
                    by_content[content] = referenced
        else:
            image = load_elf(config.kernel_path, config.mem_size)  # preloaded
            segments: list[Segment] = list(image.segments)
            if config.initrd_path:  # preloaded too: its pages are shared like the image's
                initrd = read_initrd(config.initrd_path, config.mem_size)
                segments.append(place_initrd(initrd, config.mem_size, image))
            for segment in segments:
                start, end = shareable_span(segment)
                if end > start:
                    offset = start - segment.guest_addr
                    # A view, not a slice: the key shares the preloaded image's bytes.
                    view = memoryview(segment.data)[offset : offset + end - start]
                    referenced = lease.reference_pages(view)
                    if referenced is not None:
                        by_content[view] = referenced  # type: ignore[index]
            self._first_of_image[key] = by_content
        return SlotMapper(self._pages_fds[(spec.domain, spec.pool_root)], by_content)

    def _hand_over(self, pid: int, indexes: list[int]) -> None:
        owner = ProcessIdentity.of(pid)
        for index in indexes:
            if index in self._leases:
                pool, lease = self._leases[index]
                if owner is not None:  # a child that already died: the sweep has it
                    pool.hand_over(lease, owner)

    def _release(self, index: int) -> None:
        """Drop a VM's references once its pages are unmapped (VM or worker ended)."""
        held = self._leases.pop(index, None)
        if held is not None:
            held[1].release()

    def _prepare_for_fork(self, specs: Sequence[tuple[str, InstanceSpec]]) -> None:
        # Everything workers would otherwise each do for themselves is done once
        # here, so that its pages are shared: imports, image parsing, CPUID.
        from dksm.vmm.builder import preload_host_cpuid
        from dksm.vmm.device_manager import import_device_modules

        if any(s.config.virtio_device_count for _, s in specs):
            import_device_modules()
        preload_images({(s.config.kernel_path, s.config.mem_size) for _, s in specs})
        preload_initrds(
            {(s.config.initrd_path, s.config.mem_size) for _, s in specs if s.config.initrd_path}
        )
        preload_host_cpuid()
        if self.confinement is not None:
            self.confinement.prepare(load_now=True)  # shared by every worker

    def _collect_events(self, wait: float) -> None:
        readable, _, _ = select.select([self._events_r], [], [], wait)
        if not readable:
            return
        self._events_buffer += os.read(self._events_r, 65536)
        usable = len(self._events_buffer) - len(self._events_buffer) % EVENT_RECORD.size
        now = time.time()
        for index, event in EVENT_RECORD.iter_unpack(self._events_buffer[:usable]):
            if not 0 <= index < len(self.members):
                continue
            member = self.members[index]
            if event == EVENT_BOOTED and member.state == "booting":
                member.state = "running"
                member.booted_at = now
            elif event == EVENT_HELD and member.state in ("booting", "running"):
                result = _read_outcome(self.files, index)
                member.state = "held"
                member.reason = result[1] if result else ""
                member.ended_at = now
            elif event == EVENT_ENDED:
                self._ended(member, _read_outcome(self.files, index))
        self._events_buffer = self._events_buffer[usable:]

    def _ended(self, member: Member, result: tuple[str, str] | None) -> None:
        self._release(member.index)  # its worker reports the end after unmapping
        if member.state not in LIVE_STATES:
            return
        member.state, member.reason = result or ("failed", "ended without a report")
        member.ended_at = time.time()

    def reap(self) -> list[Member]:
        """Collect workers that ended; sweep the pools their leases were in."""
        ended: list[Member] = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            self._collect_events(0)
            self._remove_sockets(pid)
            for member in self.workers.pop(pid, []):
                if member.state in LIVE_STATES:
                    result = _read_outcome(self.files, member.index)
                    self._ended(member, result or ("failed", _describe_wait_status(status)))
                    ended.append(member)
        if ended:
            self.sweep_pools()
        return ended

    def _remove_sockets(self, pid: int) -> None:
        """Remove the vsock sockets an ended worker reported (and only those)."""
        fd = self._socket_reports.pop(pid, None)
        if fd is not None:
            remove_reported(fd)
            os.close(fd)

    def sweep_pools(self) -> None:
        for pool in self._pools.values():
            pool.sweep()

    def close(self) -> None:
        """Release what the supervisor still holds; call after :meth:`stop_all`."""
        for index in list(self._leases):
            self._release(index)
        for fd in self._pages_fds.values():
            os.close(fd)
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
        self._pages_fds.clear()

    def wait_booted(self, timeout: float) -> None:
        """Return when every VM is running or has ended; raise on timeout."""
        deadline = time.monotonic() + timeout
        while any(m.state == "booting" for m in self.members):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                booting = sum(m.state == "booting" for m in self.members)
                raise FleetError(f"{booting} VMs had not booted after {timeout:g} s")
            self._collect_events(min(remaining, 0.2))
            self.reap()

    def poll(self, wait: float) -> None:
        self._collect_events(wait)
        self.reap()

    def alive(self) -> list[Member]:
        return [m for m in self.members if m.state in LIVE_STATES]

    def stop_all(self, grace: float = 10.0) -> None:
        """SIGTERM every worker, SIGKILL the ones still there after ``grace``."""
        for pid in list(self.workers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self.workers and time.monotonic() < deadline:
            self._collect_events(0.02)
            self.reap()
        for pid in list(self.workers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        while self.workers:
            time.sleep(0.01)
            self.reap()
        self._collect_events(0)
        self.sweep_pools()

    def snapshot(self) -> list[Member]:
        """A copy of every member as it is now (the launcher goes on changing its own)."""
        return [replace(m) for m in self.members]
