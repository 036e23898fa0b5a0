"""A built microVM and its vCPU loops.

Each vCPU runs ``KVM_RUN`` on a thread of its own and dispatches its exits to the
port and MMIO buses; the thread that calls :meth:`MicroVm.run` (or the fleet's
worker) waits for them and is the one that stops them.  A process whose only VM
has one vCPU may instead run that vCPU's loop on its main thread
(:meth:`MicroVm.run_here`), sparing a thread's memory; a signal handler then stops
the VM through :meth:`MicroVm.request_stop`, which takes no lock.  The virtio
devices' queues are served on threads of their own, started with the vCPUs and
stopped after them, before guest RAM is unmapped.  The application processors start blocked
inside ``KVM_RUN``: the in-kernel LAPIC holds them until the guest's bootstrap
processor sends INIT and SIPI, as on a PC.

Stopping.  A guest that halted with interrupts on, or an application processor never
started, never exits by itself, so :meth:`MicroVm.finish` sets ``immediate_exit`` on
every vCPU (honoured by one about to enter the guest) and kicks every vCPU thread
with a signal (which interrupts one inside).  Whatever ends the VM -- the guest's
own shutdown on any vCPU, a fault, a timeout, a signal to the VMM -- ends all its
vCPUs together.

Waiting for a vCPU uses an event each vCPU thread sets when its loop has returned,
never ``Thread.join``.  SIGTERM reaches the VMM as an exception raised in the waiting
thread, and in Python 3.11 an exception that interrupts ``join`` marks the thread
finished although it still runs (the interrupted wait releases the lock the living
thread holds): the VMM then unmapped ``kvm_run`` and guest RAM under a running vCPU
and died of SIGSEGV.  An interrupted ``Event.wait`` leaves nothing behind.

A kick is sent only to a thread that has not exited: a thread announces its exit
under its kick lock, and the kicker signals under the same lock, so ``pthread_kill``
never names a thread whose identity the C library may already have freed.

Exclusive sections.  An instruction the VMM executes for the guest (the emulation
fallback) is not atomic for the other vCPUs.  For a locked one the VMM first holds
them outside the guest (:meth:`MicroVm.exclusive`): each vCPU checks before entering
the guest whether another holds the VM, and parks until it is released.

Pausing.  :meth:`MicroVm.pause` is the same hold taken by the VMM rather than by a
vCPU: every vCPU is kicked out of the guest and parks at its next entry until
:meth:`MicroVm.resume`.  A paused guest executes nothing (its timers do not fire
either), and the pause returns only once every vCPU is outside.

Why one module over 500 lines: the vCPU loop and :class:`MicroVm`'s stopping,
exclusive sections and pausing are one protocol over one condition variable and
the per-thread kick lock; every rule above is kept by code on both sides of it.
The instruction emulator it calls on emulation failures lives elsewhere.
"""

from __future__ import annotations

import contextlib
import enum
import threading
import time
from collections.abc import Iterator

from dksm.devices.bus import MmioBus, PortBus
from dksm.devices.i8042 import I8042
from dksm.devices.serial import Serial
from dksm.kvm import abi, exits
from dksm.kvm.system import Kvm, KvmError, Vcpu, Vm
from dksm.memory.guest_memory import GuestMemory
from dksm.value import Value

TYPE_CHECKING = False  # typing's, without importing typing (see the dksm package)
if TYPE_CHECKING:
    from typing import Protocol

    from dksm.vmm.emulation import EmulationFallback

    class DeviceThreads(Protocol):
        """A device served on threads of its own: started with the vCPUs, closed once
        they are all out of the guest and before guest RAM is unmapped."""

        def start(self) -> None: ...

        def close(self) -> None: ...


if TYPE_CHECKING:
    import signal
else:
    import _signal as signal  # as dksm.cli.main does: signal's functions, without enum

KICK_SIGNAL = signal.SIGUSR1
KICK_INTERVAL_S = 0.02
# How long a pause waits for every vCPU to leave the guest (Firecracker waits 30 s for
# its vCPUs' answers, and a kicked vCPU leaves within microseconds).
PAUSE_TIMEOUT_S = 30.0


class _VmmHold:
    """The holder of a VM paused by the VMM itself (no vCPU holds it)."""


_VMM_HOLD = _VmmHold()


class ExitCause(enum.Enum):
    """Why a VM stopped; the CLI maps each to its exit status."""

    GUEST_SHUTDOWN = "guest requested shutdown"
    TRIPLE_FAULT = "triple fault"
    EMULATION_FAILURE = "KVM could not emulate an instruction"
    INTERNAL_ERROR = "KVM internal error"
    FAIL_ENTRY = "KVM failed to enter the guest"
    HALTED = "guest halted"
    TIMEOUT = "timeout"
    INTERRUPTED = "interrupted by signal"
    VMM_ERROR = "VMM error"
    HOST_IO_ERROR = "host I/O error"  # a device's host side failed (console on a full disk)


class Outcome(Value):
    """Why a VM ended, and what its vCPUs did until then."""

    __slots__ = ("cause", "detail", "emulated", "exits", "registers")

    def __init__(
        self,
        cause: ExitCause,
        detail: str,
        registers: str = "",
        exits: dict[str, int] | None = None,
        # Instructions executed in user space, by mnemonic.
        emulated: dict[str, int] | None = None,
    ) -> None:
        self.cause = cause
        self.detail = detail
        self.registers = registers
        self.exits = {} if exits is None else exits
        self.emulated = {} if emulated is None else emulated

    def describe(self) -> str:
        return f"{self.cause.value}: {self.detail}" if self.detail else self.cause.value


def install_kick_handler() -> None:
    # The handler does nothing: its only job is to make the signal interrupt
    # KVM_RUN (EINTR) instead of killing the process.
    if threading.current_thread() is threading.main_thread() and signal.getsignal(KICK_SIGNAL) in (
        signal.SIG_DFL,
        None,
    ):
        signal.signal(KICK_SIGNAL, lambda _signum, _frame: None)


def format_registers(vcpu: Vcpu) -> str:
    try:
        regs = vcpu.get_regs()
        sregs = vcpu.get_sregs()
    except KvmError as exc:
        return f"(registers unavailable: {exc})"
    names = abi.REGS_NAMES.split()
    lines = [f"vcpu {vcpu.index}:"]
    for i in range(0, len(names), 4):
        lines.append("  ".join(f"{n:>6}={getattr(regs, n):016x}" for n in names[i : i + 4]))
    lines.append(
        f"   cr0={sregs.cr0:016x}     cr2={sregs.cr2:016x}     cr3={sregs.cr3:016x}"
        f"     cr4={sregs.cr4:016x}"
    )
    lines.append(f"  efer={sregs.efer:016x}  cs.sel={sregs.cs.selector:04x}")
    return "\n".join(lines)


def _exit_name(reason: int) -> str:
    return (
        abi.ExitReason(reason).name if reason in abi.ExitReason._value2member_map_ else str(reason)
    )


class VcpuThread:
    """One vCPU's loop: ``KVM_RUN``, its exits, and the emulation fallback for it."""

    def __init__(self, machine: MicroVm, vcpu: Vcpu) -> None:
        self.machine = machine
        self.vcpu = vcpu
        self.exit_counts: dict[str, int] = {}
        # Port IO is the hot path: plain integers, not the dictionary above.
        self.io_in = 0
        self.io_out = 0
        # Executes what the host's KVM cannot emulate (SSE on PVM hosts).  Made at
        # the first emulation failure, so VMs that never need it (hardware KVM,
        # guests without SSE) do not even import it.
        self.emulation: EmulationFallback | None = None
        self._thread: threading.Thread | None = None
        self._kick_lock = threading.Lock()
        self._exited = False
        self._loop_returned = threading.Event()  # set once the vCPU is outside for good

    # -- the thread -----------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._main, name=f"vcpu{self.vcpu.index}", daemon=True
        )
        self._thread.start()

    def run_here(self) -> None:
        """Run the loop on the calling thread until it returns (the VM has ended): for a
        process whose only VM has this one vCPU, which then needs no thread of its own
        (no stack, thread state or allocator arena of its own, measured at ~200 KiB of
        a fleet worker's memory)."""
        self._thread = threading.current_thread()
        self._main()

    def _launched(self) -> bool:
        # A thread whose start() was interrupted before the OS thread existed never
        # runs: it has no ident.  One that has an ident runs until its loop returns
        # (a thread too young to have one finds the VM finished and touches nothing).
        return self._thread is not None and self._thread.ident is not None

    def alive(self) -> bool:
        """The loop may still touch the vCPU (launched and not yet returned)."""
        return self._launched() and not self._loop_returned.is_set()

    def join(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` seconds; True once the loop has returned."""
        if not self._launched():
            return True
        return self._loop_returned.wait(timeout)

    @property
    def done(self) -> bool:
        """The loop has returned (or never started); the vCPU is outside the guest."""
        return self._exited or not self._launched()

    def kick(self) -> None:
        """Interrupt ``KVM_RUN`` if the thread is inside it; safe at any moment."""
        with self._kick_lock:
            thread = self._thread
            if (
                not self._exited
                and thread is not None
                and thread.ident is not None
                and thread is not threading.current_thread()
            ):
                signal.pthread_kill(thread.ident, KICK_SIGNAL)

    def _main(self) -> None:
        try:
            self._dispatch_exits()
        except Exception as exc:  # a VMM bug must still end the VM with a reason
            self.machine.finish(ExitCause.VMM_ERROR, f"{type(exc).__name__}: {exc}")
        finally:
            with self._kick_lock:
                self._exited = True
            self._loop_returned.set()
            self.machine.vcpu_exited()

    # -- exits ----------------------------------------------------------------

    def _count(self, name: str) -> None:
        self.exit_counts[name] = self.exit_counts.get(name, 0) + 1

    def _dispatch_exits(self) -> None:
        machine = self.machine
        vcpu = self.vcpu
        run = vcpu.run_state
        bus = machine.bus
        mapping = vcpu.run_bytes
        decode = exits.decode
        while not machine.finished:
            machine.checkpoint(self)
            if not vcpu.run():
                if machine.stop_request is not None:  # see MicroVm.request_stop
                    machine.finish(*machine.stop_request)
                continue  # interrupted: the loop condition decides
            exit_ = decode(run, mapping)
            if isinstance(exit_, exits.IoExit):
                port, size, data = exit_.port, exit_.size, exit_.data
                if exit_.is_write:
                    for i in range(0, size * exit_.count, size):
                        bus.write(port, size, int.from_bytes(data[i : i + size], "little"))
                    self.io_out += 1
                else:
                    for i in range(0, size * exit_.count, size):
                        data[i : i + size] = bus.read(port, size).to_bytes(size, "little")
                    self.io_in += 1
                continue
            if isinstance(exit_, exits.MmioExit):
                self._mmio(exit_)
                continue
            self._count(_exit_name(run.exit_reason))
            self._stop_or_resume(exit_)

    def _mmio(self, mmio: exits.MmioExit) -> None:
        bus = self.machine.mmio_bus
        data = mmio.data  # at most 8 bytes: the part of a longer access that fits
        size = len(data)
        if mmio.is_write:
            self._count("MMIO_WRITE")
            bus.write(mmio.address, size, int.from_bytes(data, "little"))
        else:
            self._count("MMIO_READ")
            data[:] = bus.read(mmio.address, size).to_bytes(size, "little")

    def _stop_or_resume(self, exit_: exits.VcpuExit) -> None:
        """Every exit but I/O: most end the VM, with their reason."""
        machine = self.machine
        vcpu = self.vcpu
        match exit_:
            case exits.Interrupted():
                return
            case exits.Shutdown():
                machine.finish(ExitCause.TRIPLE_FAULT, self._rip_detail(), format_registers(vcpu))
            case exits.SystemEvent(type=kind):
                machine.finish(ExitCause.GUEST_SHUTDOWN, f"system event {kind}")
            case exits.EmulationFailure():
                self._emulation_failure()
            case exits.InternalError(suberror=suberror):
                machine.finish(
                    ExitCause.INTERNAL_ERROR,
                    f"suberror {suberror} {self._rip_detail()}",
                    format_registers(vcpu),
                )
            case exits.FailEntry(hardware_reason=code):
                machine.finish(
                    ExitCause.FAIL_ENTRY, f"hardware reason {code:#x}", format_registers(vcpu)
                )
            case exits.Halted():
                machine.finish(ExitCause.HALTED, self._rip_detail())
            case _:
                machine.finish(
                    ExitCause.INTERNAL_ERROR,
                    f"unexpected exit reason {vcpu.run_state.exit_reason}",
                    format_registers(vcpu),
                )

    def _rip_detail(self) -> str:
        try:
            return f"at rip {self.vcpu.get_regs().rip:#x} (vcpu {self.vcpu.index})"
        except KvmError:
            return ""

    def _emulation_failure(self) -> None:
        machine = self.machine
        from dksm.vmm.emulation import EmulationError, EmulationFallback

        if self.emulation is None:
            self.emulation = EmulationFallback(
                machine.kvm,
                self.vcpu,
                machine.memory.view(),
                machine.memory.host_address,
                exclusive=(lambda: machine.exclusive(self)) if machine.smp else None,
            )
        try:
            self.emulation.handle()
            return  # done: the loop re-enters the guest past the instruction
        except EmulationError as exc:
            detail = str(exc)
        machine.finish(ExitCause.EMULATION_FAILURE, detail, format_registers(self.vcpu))


class MicroVm:
    """One VM: its KVM handles, RAM, devices and vCPUs.  Close it when done."""

    def __init__(
        self,
        kvm: Kvm,
        vm: Vm,
        memory: GuestMemory,
        vcpus: list[Vcpu],
        bus: PortBus,
        serial: Serial,
        mmio_bus: MmioBus | None = None,
        devices: list[DeviceThreads] | None = None,
    ) -> None:
        if not vcpus:
            raise ValueError("a VM needs at least one vCPU")
        self.kvm = kvm
        self.vm = vm
        self.memory = memory
        self.vcpus = vcpus
        self.bus = bus
        self.serial = serial
        self.mmio_bus = mmio_bus if mmio_bus is not None else MmioBus()
        self.devices = devices if devices is not None else []
        self.keyboard: I8042 | None = None  # set by the builder
        self.threads = [VcpuThread(self, vcpu) for vcpu in vcpus]
        self._outcome: Outcome | None = None
        # Asked for by a signal handler that may have interrupted this very thread: the
        # vCPU loop finishes the VM with it (see request_stop).
        self.stop_request: tuple[ExitCause, str] | None = None
        self._lock = threading.Lock()
        self._started = False
        # Exclusive sections and pauses: who holds the VM, and who is parked for it.
        self._hold = threading.Condition()
        self._holder: VcpuThread | _VmmHold | None = None
        self._parked: set[VcpuThread] = set()

    @property
    def vcpu(self) -> Vcpu:
        """The bootstrap processor."""
        return self.vcpus[0]

    @property
    def smp(self) -> bool:
        return len(self.vcpus) > 1

    # -- stopping ---------------------------------------------------------------

    def finish(self, cause: ExitCause, detail: str = "", registers: str = "") -> None:
        """Record why the VM ends (the first reason wins) and make every vCPU stop."""
        with self._lock:
            if self._outcome is None:
                self._outcome = Outcome(
                    cause, detail, registers, self._exit_counts(), self._emulated_counts()
                )
        for vcpu in self.vcpus:
            vcpu.run_state.immediate_exit = 1
        for thread in self.threads:
            thread.kick()
        with self._hold:
            self._hold.notify_all()  # parked vCPUs see the end

    def stop(self, cause: ExitCause, detail: str = "") -> None:
        """Stop from another thread: record the cause and kick until every vCPU yields."""
        self.finish(cause, detail)
        while not all(thread.join(KICK_INTERVAL_S) for thread in self.threads):
            for thread in self.threads:
                thread.kick()

    def request_stop(self, cause: ExitCause, detail: str = "") -> None:
        """Stop from a signal handler of the thread that runs the vCPU loop
        (:meth:`run_here`): the handler may run while that thread holds a lock
        :meth:`finish` takes, so it only records the request and makes the vCPU leave
        the guest; the loop finishes the VM with it."""
        if self.stop_request is None:
            self.stop_request = (cause, detail)
        for vcpu in self.vcpus:
            vcpu.run_state.immediate_exit = 1

    def vcpu_exited(self) -> None:
        with self._hold:
            self._hold.notify_all()  # a holder may be waiting for this vCPU

    @property
    def finished(self) -> bool:
        return self._outcome is not None

    def io_counts(self) -> tuple[int, int]:
        """Port reads and writes the guest made so far, over all vCPUs."""
        return sum(t.io_in for t in self.threads), sum(t.io_out for t in self.threads)

    def exit_counts(self) -> dict[str, int]:
        """Non-IO exits so far by name, over all vCPUs (safe while they run)."""
        return self._exit_counts()

    def _exit_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for thread in self.threads:
            for name, n in thread.exit_counts.copy().items():
                counts[name] = counts.get(name, 0) + n
        return counts

    def _emulated_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for thread in self.threads:
            if thread.emulation is not None:
                for name, n in thread.emulation.counts.items():
                    counts[name] = counts.get(name, 0) + n
        return counts

    # -- exclusive sections -------------------------------------------------------

    def checkpoint(self, thread: VcpuThread) -> None:
        """Called by each vCPU before it enters the guest: park while another holds
        the VM (the read outside the lock is a shortcut; the loop rechecks)."""
        if self._holder is None or self._holder is thread:
            return
        with self._hold:
            while self._holder is not None and self._holder is not thread and not self.finished:
                self._parked.add(thread)
                self._hold.notify_all()
                self._hold.wait()
            self._parked.discard(thread)

    @contextlib.contextmanager
    def exclusive(self, thread: VcpuThread) -> Iterator[None]:
        """Hold every other vCPU of this VM outside the guest for the block."""
        others = [t for t in self.threads if t is not thread]
        with self._hold:
            while self._holder is not None and not self.finished:
                self._parked.add(thread)  # another holder waits for us: count as parked
                self._hold.notify_all()
                self._hold.wait()
            self._parked.discard(thread)
            self._holder = thread
        try:
            for other in others:
                other.vcpu.run_state.immediate_exit = 1
                other.kick()
            with self._hold:
                self._hold.wait_for(
                    lambda: self.finished or all(t in self._parked or t.done for t in others)
                )
            yield
        finally:
            with self._hold:
                self._holder = None
                for other in others:
                    other.vcpu.run_state.immediate_exit = 0
                self._hold.notify_all()
            if self.finished:  # ended meanwhile: finish() may have set the flags first
                for other in others:
                    other.vcpu.run_state.immediate_exit = 1
                    other.kick()

    # -- pausing ----------------------------------------------------------------

    @property
    def paused(self) -> bool:
        return self._holder is _VMM_HOLD

    def pause(self, timeout: float = PAUSE_TIMEOUT_S) -> bool:
        """Hold every vCPU outside the guest until :meth:`resume`.  True once all of
        them are out (or the VM has ended); False if one did not leave in time, in
        which case the VM is resumed again."""
        with self._hold:
            if self._holder is _VMM_HOLD:
                return True
            # An exclusive section in progress ends first (it is microseconds long).
            while self._holder is not None and not self.finished:
                self._hold.wait()
            self._holder = _VMM_HOLD
        for thread in self.threads:
            thread.vcpu.run_state.immediate_exit = 1
            thread.kick()
        with self._hold:
            outside = self._hold.wait_for(
                lambda: self.finished or all(t in self._parked or t.done for t in self.threads),
                timeout,
            )
        if not outside:
            self.resume()
        return outside

    def resume(self) -> None:
        """Let the vCPUs of a paused VM enter the guest again."""
        with self._hold:
            if self._holder is not _VMM_HOLD:
                return
            self._holder = None
            for thread in self.threads:
                thread.vcpu.run_state.immediate_exit = 0
            self._hold.notify_all()
        if self.finished:  # ended meanwhile: finish() may have set the flags first
            for thread in self.threads:
                thread.vcpu.run_state.immediate_exit = 1
                thread.kick()

    # -- running ----------------------------------------------------------------

    def start(self) -> None:
        """Start the vCPU threads; the guest runs until :meth:`stop` or its own end."""
        install_kick_handler()
        self._started = True
        for device in self.devices:
            device.start()
        for thread in self.threads:
            thread.start()

    def run_here(self) -> None:
        """Like :meth:`start`, but the vCPU's loop runs on the calling thread, which
        must be the main thread, until the VM ends: for a VM of one vCPU whose
        process hosts nothing else.  Stop it from a signal handler with
        :meth:`request_stop`."""
        if self.smp:
            raise ValueError("a VM of several vCPUs runs them on threads of their own")
        install_kick_handler()
        self._started = True
        for device in self.devices:
            device.start()
        self.threads[0].run_here()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds for the VM to end; True if it has."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self.threads:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not thread.join(left):
                return False
        return True

    @property
    def outcome(self) -> Outcome | None:
        """Why the VM ended, once all its vCPUs have stopped."""
        if any(thread.alive() for thread in self.threads):
            return None
        return self._outcome

    def run(self, timeout: float | None = None) -> Outcome:
        """Run until the guest stops, ``timeout`` seconds pass, or :meth:`stop`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self.start()
            while True:
                wait = 0.5 if deadline is None else max(0.0, deadline - time.monotonic())
                if self.wait(min(wait, 0.5)):
                    break
                if self.finished:  # ended from inside: make sure every vCPU heard it
                    for thread in self.threads:
                        thread.kick()
                if deadline is not None and time.monotonic() >= deadline:
                    self.stop(ExitCause.TIMEOUT, f"no exit within {timeout:g} s")
        except KeyboardInterrupt:
            self.stop(ExitCause.INTERRUPTED, "SIGINT or SIGTERM")
        assert self._outcome is not None
        return self._outcome

    def close(self) -> None:
        if any(thread.alive() for thread in self.threads):
            self.stop(ExitCause.VMM_ERROR, "closed while running")
        for device in self.devices:  # their threads touch guest RAM: stop them first
            device.close()
        self.devices = []
        for vcpu in self.vcpus:
            vcpu.close()
        self.vm.close()
        self.memory.close()
        self.kvm.close()

    def __enter__(self) -> MicroVm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
