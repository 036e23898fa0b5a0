"""A built microVM and its vCPU loop.

The vCPU runs ``KVM_RUN`` on its own thread and dispatches exits to the port bus;
the calling thread waits for it and is the one that stops it.  That split makes
stopping race-free: a guest that halted with interrupts on never exits by itself,
so :meth:`MicroVm.stop` sets ``immediate_exit`` (honoured if the vCPU is about to
enter the guest) and signals the vCPU thread (which interrupts it if it is inside),
repeating until the loop has noticed.
"""

from __future__ import annotations

import enum
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dksm.devices.bus import PortBus
from dksm.devices.serial import Serial
from dksm.kvm import abi
from dksm.kvm.system import Kvm, KvmError, Vcpu, Vm
from dksm.memory.guest_memory import GuestMemory

if TYPE_CHECKING:
    from dksm.vmm.emulation import EmulationFallback

KICK_SIGNAL = signal.SIGUSR1
KICK_INTERVAL_S = 0.02


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


@dataclass(frozen=True)
class Outcome:
    cause: ExitCause
    detail: str
    registers: str = ""
    exits: dict[str, int] = field(default_factory=dict)
    emulated: dict[str, int] = field(default_factory=dict)  # by mnemonic, in user space

    def describe(self) -> str:
        return f"{self.cause.value}: {self.detail}" if self.detail else self.cause.value


def _install_kick_handler() -> None:
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
    lines = []
    for i in range(0, len(names), 4):
        lines.append("  ".join(f"{n:>6}={getattr(regs, n):016x}" for n in names[i : i + 4]))
    lines.append(
        f"   cr0={sregs.cr0:016x}     cr2={sregs.cr2:016x}     cr3={sregs.cr3:016x}"
        f"     cr4={sregs.cr4:016x}"
    )
    lines.append(f"  efer={sregs.efer:016x}  cs.sel={sregs.cs.selector:04x}")
    return "\n".join(lines)


class MicroVm:
    """One VM: its KVM handles, RAM, devices, and one vCPU.  Close it when done."""

    def __init__(
        self, kvm: Kvm, vm: Vm, memory: GuestMemory, vcpu: Vcpu, bus: PortBus, serial: Serial
    ) -> None:
        self.kvm = kvm
        self.vm = vm
        self.memory = memory
        self.vcpu = vcpu
        self.bus = bus
        self.serial = serial
        self._outcome: Outcome | None = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.exit_counts: dict[str, int] = {}
        # Executes what the host's KVM cannot emulate (SSE on PVM hosts).  Made at
        # the first emulation failure, so VMs that never need it (hardware KVM,
        # guests without SSE) do not even import it.
        self.emulation: EmulationFallback | None = None

    # -- stopping ---------------------------------------------------------------

    def finish(self, cause: ExitCause, detail: str = "", registers: str = "") -> None:
        """Record why the VM ends (the first reason wins) and make the vCPU stop."""
        with self._lock:
            if self._outcome is None:
                emulated = dict(self.emulation.counts) if self.emulation is not None else {}
                self._outcome = Outcome(cause, detail, registers, dict(self.exit_counts), emulated)
        self.vcpu.run_state.immediate_exit = 1

    def stop(self, cause: ExitCause, detail: str = "") -> None:
        """Stop from another thread: record the cause and kick until the vCPU yields."""
        self.finish(cause, detail)
        thread = self._thread
        while thread is not None and thread.is_alive():
            if thread.ident is not None and thread is not threading.current_thread():
                signal.pthread_kill(thread.ident, KICK_SIGNAL)
            thread.join(KICK_INTERVAL_S)

    @property
    def finished(self) -> bool:
        return self._outcome is not None

    # -- running ----------------------------------------------------------------

    def start(self) -> None:
        """Start the vCPU thread; the guest runs until :meth:`stop` or its own end."""
        _install_kick_handler()
        self._thread = threading.Thread(target=self._vcpu_loop, name="vcpu0", daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds for the VM to end; True if it has."""
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    @property
    def outcome(self) -> Outcome | None:
        """Why the VM ended, once its vCPU has stopped."""
        if self._thread is not None and self._thread.is_alive():
            return None
        return self._outcome

    def run(self, timeout: float | None = None) -> Outcome:
        """Run until the guest stops, ``timeout`` seconds pass, or :meth:`stop`."""
        self.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                wait = 0.5 if deadline is None else max(0.0, deadline - time.monotonic())
                if self.wait(min(wait, 0.5)):
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    self.stop(ExitCause.TIMEOUT, f"no exit within {timeout:g} s")
        except KeyboardInterrupt:
            self.stop(ExitCause.INTERRUPTED, "SIGINT or SIGTERM")
        assert self._outcome is not None
        return self._outcome

    def _count(self, name: str) -> None:
        self.exit_counts[name] = self.exit_counts.get(name, 0) + 1

    def _vcpu_loop(self) -> None:
        try:
            self._dispatch_exits()
        except Exception as exc:  # a VMM bug must still end the VM with a reason
            self.finish(ExitCause.VMM_ERROR, f"{type(exc).__name__}: {exc}")

    def _dispatch_exits(self) -> None:
        vcpu = self.vcpu
        run = vcpu.run_state
        bus = self.bus
        while self._outcome is None:
            if not vcpu.run():
                continue  # interrupted: the loop condition decides
            reason = run.exit_reason
            if reason == abi.ExitReason.IO:
                io = run.exit.io
                size = io.size
                data = vcpu.io_data(io.data_offset, size * io.count)
                for i in range(io.count):
                    chunk = data[i * size : (i + 1) * size]
                    if io.direction == abi.KVM_EXIT_IO_OUT:
                        bus.write(io.port, size, int.from_bytes(chunk, "little"))
                    else:
                        chunk[:] = bus.read(io.port, size).to_bytes(size, "little")
                continue
            self._count(
                abi.ExitReason(reason).name
                if reason in abi.ExitReason._value2member_map_
                else str(reason)
            )
            if reason == abi.ExitReason.MMIO:
                mmio = run.exit.mmio
                if not mmio.is_write:
                    for i in range(mmio.len):
                        mmio.data[i] = 0xFF
                continue
            if reason == abi.ExitReason.SHUTDOWN:
                self.finish(ExitCause.TRIPLE_FAULT, self._rip_detail(), format_registers(vcpu))
            elif reason == abi.ExitReason.SYSTEM_EVENT:
                self.finish(ExitCause.GUEST_SHUTDOWN, f"system event {run.exit.system_event.type}")
            elif reason == abi.ExitReason.INTERNAL_ERROR:
                self._internal_error()
            elif reason == abi.ExitReason.FAIL_ENTRY:
                code = run.exit.fail_entry.hardware_entry_failure_reason
                self.finish(
                    ExitCause.FAIL_ENTRY, f"hardware reason {code:#x}", format_registers(vcpu)
                )
            elif reason == abi.ExitReason.HLT:
                self.finish(ExitCause.HALTED, self._rip_detail())
            elif reason == abi.ExitReason.INTR:
                continue
            else:
                self.finish(
                    ExitCause.INTERNAL_ERROR,
                    f"unexpected exit reason {reason}",
                    format_registers(vcpu),
                )

    def _rip_detail(self) -> str:
        try:
            return f"at rip {self.vcpu.get_regs().rip:#x}"
        except KvmError:
            return ""

    def _internal_error(self) -> None:
        internal = self.vcpu.run_state.exit.internal
        if internal.suberror == abi.KVM_INTERNAL_ERROR_EMULATION:
            from dksm.vmm.emulation import EmulationError, EmulationFallback

            if self.emulation is None:
                self.emulation = EmulationFallback(
                    self.kvm, self.vcpu, self.memory.view(), self.memory.host_address
                )
            try:
                self.emulation.handle()
                return  # done: the loop re-enters the guest past the instruction
            except EmulationError as exc:
                detail = str(exc)
            self.finish(ExitCause.EMULATION_FAILURE, detail, format_registers(self.vcpu))
        else:
            self.finish(
                ExitCause.INTERNAL_ERROR,
                f"suberror {internal.suberror} {self._rip_detail()}",
                format_registers(self.vcpu),
            )

    def close(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self.stop(ExitCause.VMM_ERROR, "closed while running")
        self.vcpu.close()
        self.vm.close()
        self.memory.close()
        self.kvm.close()

    def __enter__(self) -> MicroVm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
