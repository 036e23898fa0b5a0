"""Thin, safe objects over ``/dev/kvm``: :class:`Kvm`, :class:`Vm` and :class:`Vcpu`.

Each object owns one file descriptor and closes it; each method is one ioctl with
its struct.  ``KVM_RUN`` is issued through libc rather than :func:`fcntl.ioctl`
because Python retries a system call interrupted by a signal (PEP 475), and an
interrupted ``KVM_RUN`` is exactly how a VMM stops a vCPU whose guest halted.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os

from dksm.error import DksmError
from dksm.kvm import abi

TYPE_CHECKING = False  # typing's, without importing typing (see the dksm package)
if TYPE_CHECKING:
    from typing import Self

KVM_DEVICE = "/dev/kvm"

_libc = ctypes.CDLL("libc.so.6", use_errno=True)  # find_library would spawn ldconfig
_libc.ioctl.restype = ctypes.c_int
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


class KvmError(DksmError):
    """KVM is missing, refused a request, or behaved unexpectedly."""


def _ioctl(
    fd: int, request: int, arg: int | ctypes.Structure | bytearray = 0, what: str = ""
) -> int:
    try:
        return (
            fcntl.ioctl(fd, request, arg, True)
            if not isinstance(arg, int)
            else fcntl.ioctl(fd, request, arg)
        )
    except OSError as exc:
        name = what or f"ioctl {request:#x}"
        raise KvmError(f"{name} failed: {exc.strerror}") from exc


class Kvm:
    """The ``/dev/kvm`` system handle."""

    def __init__(self, path: str = KVM_DEVICE) -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise KvmError(f"cannot open {path}: {exc.strerror}") from exc
        try:
            version = _ioctl(self.fd, abi.KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")
            if version != abi.KVM_API_VERSION:
                raise KvmError(f"KVM API version {version}, expected {abi.KVM_API_VERSION}")
        except BaseException:
            os.close(self.fd)
            raise

    def check_extension(self, capability: int) -> int:
        """``KVM_CHECK_EXTENSION``: 0 if unsupported, else a capability-specific value."""
        return _ioctl(self.fd, abi.KVM_CHECK_EXTENSION, capability, "KVM_CHECK_EXTENSION")

    def vcpu_mmap_size(self) -> int:
        return _ioctl(self.fd, abi.KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")

    def supported_cpuid(self, max_entries: int = 80) -> list[abi.CpuidEntry2]:
        """The host's supported CPUID leaves, growing the buffer on E2BIG."""
        while True:
            cpuid = abi.cpuid2_struct(max_entries)()
            cpuid.nent = max_entries
            try:
                fcntl.ioctl(self.fd, abi.KVM_GET_SUPPORTED_CPUID, cpuid, True)
            except OSError as exc:
                if exc.errno == errno.E2BIG and max_entries < 4096:
                    max_entries *= 2
                    continue
                raise KvmError(f"KVM_GET_SUPPORTED_CPUID failed: {exc.strerror}") from exc
            count: int = cpuid.nent
            entries = cpuid.entries
            return [abi.CpuidEntry2.from_buffer_copy(entries[i]) for i in range(count)]

    def create_vm(self) -> Vm:
        return Vm(_ioctl(self.fd, abi.KVM_CREATE_VM, 0, "KVM_CREATE_VM"), self)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Vm:
    """One KVM virtual machine."""

    def __init__(self, fd: int, kvm: Kvm) -> None:
        """Own ``fd`` from here: it is closed if this raises."""
        self.fd = fd
        self.kvm = kvm
        try:
            os.set_inheritable(fd, False)
        except BaseException:
            os.close(fd)
            raise

    def set_user_memory_region(self, slot: int, guest_addr: int, size: int, host_addr: int) -> None:
        region = abi.UserspaceMemoryRegion(
            slot=slot,
            flags=0,
            guest_phys_addr=guest_addr,
            memory_size=size,
            userspace_addr=host_addr,
        )
        _ioctl(self.fd, abi.KVM_SET_USER_MEMORY_REGION, region, "KVM_SET_USER_MEMORY_REGION")

    def set_tss_addr(self, address: int) -> None:
        # The argument is an unsigned long; fcntl.ioctl would pass a C int.
        if _libc.ioctl(self.fd, abi.KVM_SET_TSS_ADDR, address) < 0:
            raise KvmError(f"KVM_SET_TSS_ADDR failed: {os.strerror(ctypes.get_errno())}")

    def create_irqchip(self) -> None:
        _ioctl(self.fd, abi.KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP")

    def create_pit2(self) -> None:
        config = abi.PitConfig(flags=abi.KVM_PIT_SPEAKER_DUMMY)
        _ioctl(self.fd, abi.KVM_CREATE_PIT2, config, "KVM_CREATE_PIT2")

    def irq_line(self, irq: int, level: int) -> None:
        _ioctl(self.fd, abi.KVM_IRQ_LINE, abi.IrqLevel(irq=irq, level=level), "KVM_IRQ_LINE")

    def register_ioeventfd(self, fd: int, address: int, length: int, datamatch: int) -> None:
        """Make a guest write of ``datamatch`` (``length`` bytes) at MMIO ``address``
        signal eventfd ``fd`` inside KVM, without an exit to the VMM."""
        request = abi.IoEventFd(
            datamatch=datamatch,
            addr=address,
            len=length,
            fd=fd,
            flags=abi.KVM_IOEVENTFD_FLAG_DATAMATCH,
        )
        _ioctl(self.fd, abi.KVM_IOEVENTFD, request, "KVM_IOEVENTFD")

    def register_irqfd(self, fd: int, gsi: int) -> None:
        """Make a write to eventfd ``fd`` raise interrupt ``gsi`` (an edge) inside KVM."""
        _ioctl(self.fd, abi.KVM_IRQFD, abi.IrqFd(fd=fd, gsi=gsi), "KVM_IRQFD")

    def create_vcpu(self, index: int) -> Vcpu:
        # The mapping's size is asked first: nothing is held yet if that fails.
        mmap_size = self.kvm.vcpu_mmap_size()
        fd = _ioctl(self.fd, abi.KVM_CREATE_VCPU, index, "KVM_CREATE_VCPU")
        return Vcpu(fd, index, mmap_size)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Vcpu:
    """One virtual CPU and its shared ``kvm_run`` page."""

    def __init__(self, fd: int, index: int, mmap_size: int) -> None:
        """Own ``fd`` from here: it is closed if this raises."""
        self.fd = fd
        self.index = index
        try:
            os.set_inheritable(fd, False)
        except BaseException:
            os.close(fd)
            raise
        # Mapped through libc, not the mmap module: ctypes views of a Python mmap
        # pin it (exported buffers) for as long as any of them lives.
        addr = _libc.mmap(None, mmap_size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            err = ctypes.get_errno()
            os.close(fd)
            raise KvmError(f"mapping kvm_run failed: {os.strerror(err)}")
        self._run_addr: int = addr
        self._run_size = mmap_size
        self.run_state = abi.Run.from_address(addr)
        # All of the mapping as bytes, for exits.decode: an I/O exit's data is a
        # slice of it (bounded by the mapping) rather than a view made per exit.
        self.run_bytes = memoryview((ctypes.c_char * mmap_size).from_address(addr)).cast("B")

    def run(self) -> bool:
        """Enter the guest until the next exit.

        Returns False when the call was interrupted by a signal (or by
        ``immediate_exit``) before or during guest execution, True on a real exit.
        """
        if _libc.ioctl(self.fd, abi.KVM_RUN, 0) == 0:
            return True
        err = ctypes.get_errno()
        if err == errno.EINTR:
            return False
        if err == errno.EAGAIN:
            return False
        raise KvmError(f"KVM_RUN failed: {os.strerror(err)}")

    def get_regs(self) -> abi.Regs:
        regs = abi.Regs()
        _ioctl(self.fd, abi.KVM_GET_REGS, regs, "KVM_GET_REGS")
        return regs

    def set_regs(self, regs: abi.Regs) -> None:
        _ioctl(self.fd, abi.KVM_SET_REGS, regs, "KVM_SET_REGS")

    def get_sregs(self) -> abi.Sregs:
        sregs = abi.Sregs()
        _ioctl(self.fd, abi.KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
        return sregs

    def set_sregs(self, sregs: abi.Sregs) -> None:
        _ioctl(self.fd, abi.KVM_SET_SREGS, sregs, "KVM_SET_SREGS")

    def get_fpu(self) -> abi.Fpu:
        fpu = abi.Fpu()
        _ioctl(self.fd, abi.KVM_GET_FPU, fpu, "KVM_GET_FPU")
        return fpu

    def set_fpu(self, fpu: abi.Fpu) -> None:
        _ioctl(self.fd, abi.KVM_SET_FPU, fpu, "KVM_SET_FPU")

    def set_msrs(self, entries: list[tuple[int, int]]) -> None:
        self.set_msrs_table(abi.msrs_table(entries))

    def set_msrs_table(self, msrs: ctypes.Structure) -> None:
        """``KVM_SET_MSRS`` with a table made by :func:`abi.msrs_table` (perhaps in
        another process, before it forked this one)."""
        count: int = msrs.nmsrs
        written = _ioctl(self.fd, abi.KVM_SET_MSRS, msrs, "KVM_SET_MSRS")
        if written != count:
            bad: int = msrs.entries[written].index
            raise KvmError(f"KVM_SET_MSRS wrote {written} of {count} MSRs (MSR {bad:#x} refused)")

    def set_cpuid(self, entries: list[abi.CpuidEntry2]) -> None:
        self.set_cpuid_table(abi.cpuid2_table(entries))

    def set_cpuid_table(self, cpuid: ctypes.Structure) -> None:
        """``KVM_SET_CPUID2`` with a table made by :func:`abi.cpuid2_table`."""
        _ioctl(self.fd, abi.KVM_SET_CPUID2, cpuid, "KVM_SET_CPUID2")

    def tsc_khz(self) -> int:
        """The guest TSC's frequency in kHz (``KVM_GET_TSC_KHZ``)."""
        return _ioctl(self.fd, abi.KVM_GET_TSC_KHZ, 0, "KVM_GET_TSC_KHZ")

    def get_lapic(self) -> abi.LapicState:
        lapic = abi.LapicState()
        _ioctl(self.fd, abi.KVM_GET_LAPIC, lapic, "KVM_GET_LAPIC")
        return lapic

    def set_lapic(self, lapic: abi.LapicState) -> None:
        _ioctl(self.fd, abi.KVM_SET_LAPIC, lapic, "KVM_SET_LAPIC")

    @property
    def run_address(self) -> int:
        """The host address of the ``kvm_run`` mapping (for views of ``kvm_run.s``)."""
        return self._run_addr

    def get_xsave(self, xsave: abi.Xsave | bytearray) -> None:
        """Fill ``xsave`` (4096 bytes) with the vCPU's x87/SSE/AVX state, in the
        standard XSAVE format."""
        _ioctl(self.fd, abi.KVM_GET_XSAVE, xsave, "KVM_GET_XSAVE")

    def set_xsave(self, xsave: abi.Xsave | bytearray) -> None:
        _ioctl(self.fd, abi.KVM_SET_XSAVE, xsave, "KVM_SET_XSAVE")

    def get_xcrs(self) -> abi.Xcrs:
        xcrs = abi.Xcrs()
        _ioctl(self.fd, abi.KVM_GET_XCRS, xcrs, "KVM_GET_XCRS")
        return xcrs

    def get_vcpu_events(self) -> abi.VcpuEvents:
        events = abi.VcpuEvents()
        _ioctl(self.fd, abi.KVM_GET_VCPU_EVENTS, events, "KVM_GET_VCPU_EVENTS")
        return events

    def set_vcpu_events(self, events: abi.VcpuEvents) -> None:
        _ioctl(self.fd, abi.KVM_SET_VCPU_EVENTS, events, "KVM_SET_VCPU_EVENTS")

    def translate(self, linear_address: int) -> abi.Translation:
        tr = abi.Translation(linear_address=linear_address)
        _ioctl(self.fd, abi.KVM_TRANSLATE, tr, "KVM_TRANSLATE")
        return tr

    def close(self) -> None:
        if self.fd >= 0:
            self.run_bytes.release()
            _libc.munmap(self._run_addr, self._run_size)
            os.close(self.fd)
            self.fd = -1
