"""Operands: where an instruction's memory operand is, and reading and writing it.

Shared by every instruction family; each check raises :class:`ExecutionError`
before anything is changed (see :mod:`dksm.x86emu.execute`).
"""

from __future__ import annotations

from dksm.x86emu.cpu import ExecutionError
from dksm.x86emu.decode import Instruction
from dksm.x86emu.opcodes import NO_REGISTER, RIP_BASE
from dksm.x86emu.registers import (
    CR0_EM,
    CR0_TS,
    CR4_OSFXSR,
    CR4_OSXSAVE,
    ENCODING_TO_INDEX,
    MASK32,
    MASK64,
    RIP,
)

TYPE_CHECKING = False  # typing's, without importing typing (see the dksm package)
if TYPE_CHECKING:
    from dksm.x86emu.cpu import Cpu


def effective_address(cpu: Cpu, insn: Instruction) -> int:
    """The linear address of the instruction's memory operand."""
    mem = insn.memory
    assert mem is not None
    regs = cpu.regs
    address = mem.disp
    if mem.base == RIP_BASE:
        address += regs[RIP] + insn.length
    elif mem.base != NO_REGISTER:
        address += regs[ENCODING_TO_INDEX[mem.base]]
    if mem.index != NO_REGISTER:
        address += regs[ENCODING_TO_INDEX[mem.index]] * mem.scale
    address &= MASK32 if mem.address32 else MASK64
    if mem.segment in ("fs", "gs"):
        address = (address + cpu.segment_base(mem.segment)) & MASK64
    return address


def aligned_address(cpu: Cpu, insn: Instruction, alignment: int) -> int:
    address = effective_address(cpu, insn)
    if address % alignment:
        raise ExecutionError(
            "#GP", f"{insn.mnemonic} needs a {alignment}-byte aligned operand, got {address:#x}"
        )
    return address


def load_operand(cpu: Cpu, insn: Instruction, size: int, alignment: int = 1) -> int:
    """The r/m source: an XMM register's low ``size`` bytes, or memory."""
    if insn.rm != NO_REGISTER:
        return cpu.vector().xmm(insn.rm) & ((1 << (8 * size)) - 1)
    address = aligned_address(cpu, insn, alignment)
    return int.from_bytes(cpu.read(address, size), "little")


def store_operand(cpu: Cpu, insn: Instruction, value: int, size: int, alignment: int = 1) -> None:
    address = aligned_address(cpu, insn, alignment)
    cpu.write(address, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))


def read_gpr(cpu: Cpu, number: int) -> int:
    return cpu.regs[ENCODING_TO_INDEX[number]]


def write_gpr(cpu: Cpu, number: int, value: int, size: int) -> None:
    # A 32-bit write zero-extends into the full 64-bit register.
    cpu.regs[ENCODING_TO_INDEX[number]] = value & (MASK64 if size == 8 else MASK32)


def check_sse(cpu: Cpu, insn: Instruction) -> None:
    cr0 = cpu.cr0
    if cr0 & CR0_EM or not cpu.cr4 & CR4_OSFXSR:
        raise ExecutionError("#UD", f"{insn.mnemonic} with SSE not enabled (CR0.EM or CR4.OSFXSR)")
    if cr0 & CR0_TS:
        raise ExecutionError("#NM", f"{insn.mnemonic} with CR0.TS set (lazy FPU switch)")


def check_xsave(cpu: Cpu, insn: Instruction) -> None:
    if not cpu.cr4 & CR4_OSXSAVE:
        raise ExecutionError("#UD", f"{insn.mnemonic} with CR4.OSXSAVE clear")
    if insn.mnemonic != "xgetbv" and cpu.cr0 & CR0_TS:
        raise ExecutionError("#NM", f"{insn.mnemonic} with CR0.TS set (lazy FPU switch)")
