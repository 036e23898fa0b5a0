"""The fallback's long tail: SIMD instructions dksm has no hand-written code for,
executed by the Unicorn engine when it is installed.

Unicorn is GPL-2.0 and optional (the ``emulation`` extra); this module is imported
only when an instruction needs it, and dksm works without it (those instructions
then stop the VM with a clear message, as any other unknown one).

What it is trusted with, and why: legacy-encoded XMM integer, shuffle and move
instructions (SSSE3, SSE4.1/4.2 and the SSE2 forms dksm lacks: ``pshufb``,
``palignr``, ``pinsrw``, ``pmulld``, ``ptest``, ...), whose results depend on
registers and memory only.  Not floating point: Unicorn 2 (QEMU 5) neither sets
MXCSR's exception flags nor raises unmasked SIMD exceptions, so its results there
are not exact.  Not MMX or x87: their state is not transferred.

One engine per VM, created at the first use: guest RAM is mapped into it without
copying (``mem_map_ptr`` at guest-physical 0), and it walks the guest's own page
tables (CR0, CR3, CR4, EFER are handed over each time, which also flushes its TLB).
Each instruction costs a few hundred µs, mostly register transfer through the
Python binding: right for a long tail, which is why the common families are
hand-written.
"""

from __future__ import annotations

import importlib

from dksm.vmm.emulation import VcpuCpu
from dksm.x86emu.cpu import ExecutionError
from dksm.x86emu.registers import RFLAGS, RIP

TYPE_CHECKING = False  # typing's, without importing typing (see the dksm package)
if TYPE_CHECKING:
    from typing import Any

EFER_MSR = 0xC0000080
# struct kvm_regs order (rax rbx rcx rdx rsi rdi rsp rbp r8-r15 rip rflags).
_GPR_NAMES = (
    *("RAX", "RBX", "RCX", "RDX", "RSI", "RDI", "RSP", "RBP"),
    *(f"R{i}" for i in range(8, 16)),
)


def available() -> bool:
    """Whether the Unicorn engine can be imported (it is loaded only when needed)."""
    try:
        importlib.import_module("unicorn")
    except ImportError:
        return False
    return True


class UnicornExecutor:
    """One Unicorn engine over a VM's guest RAM."""

    def __init__(self, ram_address: int, ram_size: int) -> None:
        # Imported as untyped modules: the package is optional and has no stubs.
        unicorn: Any = importlib.import_module("unicorn")
        x86_const: Any = importlib.import_module("unicorn.x86_const")
        self._unicorn = unicorn
        self._uc: Any = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
        # A CPU model with SSSE3 and SSE4.1/4.2 (the default qemu64 lacks them).
        self._uc.ctl_set_cpu_model(x86_const.UC_CPU_X86_HASWELL)
        self._uc.mem_map_ptr(0, ram_size, unicorn.UC_PROT_ALL, ram_address)
        self._gprs = [getattr(x86_const, f"UC_X86_REG_{name}") for name in _GPR_NAMES]
        self._xmms = [getattr(x86_const, f"UC_X86_REG_XMM{i}") for i in range(16)]
        self._c = x86_const
        self._exception: int | None = None
        self._uc.hook_add(unicorn.UC_HOOK_INTR, self._on_exception)

    def _on_exception(self, uc: Any, number: int, user_data: object) -> None:
        self._exception = number
        uc.emu_stop()

    def execute(self, cpu: VcpuCpu, length: int) -> None:
        """Execute the ``length``-byte instruction at the vCPU's RIP, and move RIP past it."""
        uc, c = self._uc, self._c
        regs = cpu.regs
        sregs = cpu.sregs
        vec = cpu.vector()
        for number, reg in enumerate(self._gprs):
            uc.reg_write(reg, regs[number])
        rip = regs[RIP]
        uc.reg_write(c.UC_X86_REG_RFLAGS, regs[RFLAGS])
        uc.reg_write(c.UC_X86_REG_FS_BASE, sregs.fs.base)
        uc.reg_write(c.UC_X86_REG_GS_BASE, sregs.gs.base)
        uc.reg_write(c.UC_X86_REG_MSR, (EFER_MSR, sregs.efer))
        uc.reg_write(c.UC_X86_REG_CR4, sregs.cr4)
        uc.reg_write(c.UC_X86_REG_CR3, sregs.cr3)
        uc.reg_write(c.UC_X86_REG_CR0, sregs.cr0)
        before = [vec.xmm(i) for i in range(16)]
        for i, reg in enumerate(self._xmms):
            uc.reg_write(reg, before[i])
        uc.reg_write(c.UC_X86_REG_MXCSR, vec.mxcsr)
        # The guest may have rewritten its code since Unicorn last translated it.
        uc.ctl_remove_cache(rip, rip + length)
        self._exception = None
        try:
            uc.emu_start(rip, 0, count=1)
        except self._unicorn.UcError as exc:
            raise ExecutionError("-", f"the Unicorn engine stopped: {exc}") from exc
        if self._exception is not None:
            raise ExecutionError(f"#{self._exception}", "exception raised by the instruction")
        if uc.reg_read(c.UC_X86_REG_RIP) != rip + length:
            raise ExecutionError("-", "the Unicorn engine did not run exactly one instruction")
        # Registers back (memory was written in place).
        for number, reg in enumerate(self._gprs):
            regs[number] = uc.reg_read(reg)
        regs[RFLAGS] = uc.reg_read(c.UC_X86_REG_RFLAGS)
        regs[RIP] = rip + length
        for i, reg in enumerate(self._xmms):
            value = uc.reg_read(reg)
            if value != before[i]:
                vec.set_xmm(i, value)
        mxcsr = uc.reg_read(c.UC_X86_REG_MXCSR)
        if mxcsr != vec.mxcsr:
            vec.set_mxcsr(mxcsr)
